"""The portfolio stage (DESIGN: one key, ``"portfolio"``, sees everything): the production strategy
(and, with the optimizer, its paper variants) on the stream of scored primary rows and 1m bars,
with the data-quality gate fed by data-gap events, late trades and dead letters. Pure logic.

Data quality of a primary bar [start, end) of an instrument:
- ``data_gap``: a data-gap event of that instrument overlaps the bar (from_ts < end and to_ts > start);
- ``late_rate``: late trades of the instrument inside the bar / (trades + late) above ``max_late_rate``;
- ``dead_letter_rate``: dead letters / (dead letters + decoded trades) over the last
  ``dead_window`` batches above ``max_dead_rate`` (dead letters rarely know their instrument, so this
  one is global and counted per source batch).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from operators.bars import Bar
from operators.decision import Decision, StrategyConfig
from operators.events import Event
from operators.optimizer import Optimizer, OptimizerConfig, Promotion, apply_promotion
from operators.signals import ScoredRow
from operators.strategy import StrategyEngine

PORTFOLIO_KEY = "portfolio"


@dataclass(frozen=True)
class QualityConfig:
    max_late_rate: float = 0.05
    max_dead_rate: float = 0.05
    dead_window: int = 20  # batches
    gap_memory_ms: int = 7 * 86_400_000  # forget gap events older than this (event time)


@dataclass(frozen=True)
class BatchQuality:
    """What one decoded batch held: valid trades and dead letters (the decode step emits it)."""

    trades: int
    dead: int


@dataclass
class DataQuality:
    cfg: QualityConfig = field(default_factory=QualityConfig)
    gaps: dict = field(default_factory=dict)  # instrument -> list of (from_ts, to_ts)
    late: dict = field(default_factory=dict)  # instrument -> {minute start: late count}
    trades: dict = field(default_factory=dict)  # instrument -> {minute start: trades in the 1m bar}
    batches: deque = field(default_factory=deque)  # (trades, dead)

    def on_event(self, ev: Event) -> None:
        if ev.kind == "data_gap" and ev.from_ts is not None and ev.to_ts is not None:
            spans = self.gaps.setdefault(f"{ev.exchange}:{ev.symbol}", [])
            spans.append((ev.from_ts, ev.to_ts))
            horizon = ev.to_ts - self.cfg.gap_memory_ms
            spans[:] = [s for s in spans if s[1] >= horizon]

    def on_late(self, instrument: str, late_ts: list[int]) -> None:
        d = self.late.setdefault(instrument, {})
        for ts in late_ts:
            m = ts - ts % 60_000
            d[m] = d.get(m, 0) + 1

    def on_bar(self, bar: Bar) -> None:
        d = self.trades.setdefault(bar.instrument, {})
        d[bar.start] = bar.trades
        cutoff = bar.start - 86_400_000  # a day of minutes is plenty for any primary bar
        for book in (d, self.late.get(bar.instrument, {})):
            for m in [m for m in book if m < cutoff]:
                del book[m]

    def on_batch(self, b: BatchQuality) -> None:
        self.batches.append((b.trades, b.dead))
        while len(self.batches) > self.cfg.dead_window:
            self.batches.popleft()

    def verdict(self, instrument: str, start: int, end: int) -> Optional[str]:
        for lo, hi in self.gaps.get(instrument, ()):
            if lo < end and hi > start:
                return "data_gap"
        late = sum(v for m, v in self.late.get(instrument, {}).items() if start <= m < end)
        if late:
            trades = sum(v for m, v in self.trades.get(instrument, {}).items() if start <= m < end)
            if late / (trades + late) > self.cfg.max_late_rate:
                return "late_rate"
        dead = sum(d for _, d in self.batches)
        good = sum(t for t, _ in self.batches)
        if dead and dead / (dead + good) > self.cfg.max_dead_rate:
            return "dead_letter_rate"
        return None


@dataclass
class Sequencer:
    """Puts the instruments' streams into one event-time order before the portfolio sees them.

    Bytewax delivers different instruments' items to the portfolio key in whatever order their
    workers produce them; a shared book (equity, positions, one bandit) would then depend on it:
    instrument B's bar from 10:07 could move equity before A's decision at 10:05. Here a 1m bar or
    scored row ending at t is released only when every active instrument has shown a bar ending
    after t, and released items are ordered by (t, bars before scored rows, instrument). An
    instrument whose newest bar is more than ``idle_ms`` behind the newest of all is not waited for.
    Used for replays (deterministic rows); live runs skip it to keep decision latency low.
    """

    idle_ms: int = 600_000
    last_end: dict = field(default_factory=dict)  # instrument -> newest 1m bar end seen
    buffer: list = field(default_factory=list)  # (t, rank, instrument, n, item)
    n: int = 0

    def push(self, item) -> list:
        if isinstance(item, Bar):
            inst, t, rank = item.instrument, item.end, 0
            self.last_end[inst] = max(self.last_end.get(inst, t), t)
        else:
            inst, t, rank = item.instrument, item.end, 1
        self.n += 1
        self.buffer.append((t, rank, inst, self.n, item))
        return self._release()

    def _release(self) -> list:
        if not self.last_end:
            return []
        newest = max(self.last_end.values())
        active = [e for e in self.last_end.values() if e >= newest - self.idle_ms]
        watermark = min(active)
        ready = [b for b in self.buffer if b[0] < watermark]
        if not ready:
            return []
        self.buffer = [b for b in self.buffer if b[0] >= watermark]
        ready.sort(key=lambda b: b[:4])
        return [b[4] for b in ready]

    def flush(self) -> list:
        out = [b[4] for b in sorted(self.buffer, key=lambda b: b[:4])]
        self.buffer = []
        return out


@dataclass
class Portfolio:
    """Production strategy, the optimizer's paper variants (when on) and the data-quality tracker.
    Output records: Decision, Fill, EquityPoint and RiskEvent of every strategy, VariantMetrics on
    the optimizer's schedule, and a promotion Event when a variant replaces production's config.

    Variants run beside production on the same rows and bars with their own engines (own book,
    bandit and random generator): production's rows are the same with the optimizer on or off."""

    production: StrategyEngine
    quality: DataQuality = field(default_factory=DataQuality)
    optimizer: Optional[Optimizer] = None
    pending: Optional[Promotion] = None  # decided at a bar's end, applied before the next bar's rows

    @classmethod
    def create(cls, cfg: StrategyConfig, quality: QualityConfig = QualityConfig(), strategy_id: str = "ensemble",
               optimizer: Optional[OptimizerConfig] = None, primary_tf: str = "5m",
               overlay_tfs: tuple = ("15m", "1h")) -> "Portfolio":
        opt = None
        if optimizer is not None and optimizer.enabled:
            opt = Optimizer(optimizer, cfg, strategy_id=strategy_id, primary_tf=primary_tf, overlay_tfs=overlay_tfs)
        return cls(StrategyEngine(cfg, origin="production", strategy_id=strategy_id, variant_id="base"),
                   DataQuality(quality), opt)

    def engines(self) -> list[StrategyEngine]:
        return [self.production] + (self.optimizer.engines() if self.optimizer is not None else [])

    def on_scored(self, row: ScoredRow, now_ms: int) -> list:
        out: list = self._swap(row.end)
        q = self.quality.verdict(row.instrument, row.start, row.end)
        for e in self.engines():
            for rec in e.on_scored(row, q, now_ms):
                if isinstance(rec, Decision) and row.closed_at:
                    rec.latency_ms = float(now_ms - row.closed_at)
                out.append(rec)
        return out + self._optimize(out, row.end)

    def on_bar(self, bar: Bar) -> list:
        self.quality.on_bar(bar)
        out: list = []
        for e in self.engines():
            out.extend(e.on_bar(bar))
        return out + self._optimize(out, None)

    def _optimize(self, records: list, bar_end: Optional[int]) -> list:
        """Feed the optimizer; at a primary bar boundary, emit metrics when due and apply a promotion."""
        opt = self.optimizer
        if opt is None:
            return []
        opt.observe(records)
        if bar_end is None or not opt.metrics_due():
            return []
        out: list = list(opt.metrics(bar_end))
        if self.pending is None:
            self.pending = opt.maybe_promote(bar_end)
        return out

    def _swap(self, row_end: int) -> list:
        """A promotion decided at the end of bar t switches production before the first row of a
        later bar: every instrument's bar t is decided under the old config, the next under the new
        one. Open positions stay (optimizer.apply_promotion: the new config's exits manage them)."""
        promo = self.pending
        if promo is None or row_end <= promo.ts:
            return []
        self.pending = None
        out = []
        swapped = apply_promotion(self.production, promo)
        if swapped is not None:
            self.production = swapped
            out.append(promo.as_event())
        self.optimizer.refill(promo.ts)
        return out

    def reset_kill_switch(self, ts_ms: int, by: str, strategy: str = "production") -> list:
        return [e.reset_kill_switch(ts_ms, by) for e in self.engines()
                if strategy in ("all", e.origin, e.strategy_id)]
