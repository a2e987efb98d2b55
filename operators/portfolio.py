"""The portfolio stage (one key, ``"portfolio"``, sees everything): the production strategy
(and, with the optimizer, its paper variants) on the stream of scored primary rows and 1m bars,
with the data-quality gate fed by data-gap events, late trades and dead letters. Pure logic.

Data quality of a primary bar [start, end) of an instrument:
- ``data_gap``: a data-gap event of that instrument overlaps the bar (from_ts < end and to_ts > start);
- ``late_rate``: late trades of the instrument inside the bar / (trades + late) above ``max_late_rate``
  (behind the watermark or refused by a closed window; timestamp outliers are not counted: their ts
  does not say which bar they belong to);
- ``dead_letter_rate``: dead letters / (dead letters + decoded trades) over the last
  ``dead_window`` batches above ``max_dead_rate`` (dead letters rarely know their instrument, so this
  one is global and counted per source batch, so it depends on where batches are cut).

Late counts and data-gap events reach the portfolio inside the instrument's 1m bars
(``Bar.news``, ``operators.chunk_news.carry_news``), so they are applied at the same point of the
event-time order whatever the partitions, processes and batch cuts.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Optional

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from operators.bars import Bar
from operators.decision import Decision
from operators.events import split_instrument
from operators.optimizer import Optimizer, OptimizerConfig, Promotion, apply_promotion
from operators.records import DAY_MS, MINUTE_MS, Event
from operators.signals import ScoredRow
from operators.strategy import StrategyEngine
from operators.strategy_config import StrategyConfig

PORTFOLIO_KEY = "portfolio"


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class QualityConfig:
    """The data-quality gate's limits (see the module docstring); a bad value raises
    ``pydantic.ValidationError`` naming the field."""

    max_late_rate: Annotated[float, Field(ge=0)] = 0.05
    max_dead_rate: Annotated[float, Field(ge=0)] = 0.05
    dead_window: Annotated[int, Field(ge=0)] = 20  # batches
    gap_memory_ms: Annotated[int, Field(ge=0)] = 7 * DAY_MS  # forget gap events older than this (event time)


@dataclass(frozen=True)
class BatchQuality:
    """What one decoded batch held: valid trades and dead letters (the decode step emits it)."""

    trades: int
    dead: int


@dataclass(frozen=True)
class News:
    """Data-quality news of one instrument outside its bars (``trades.LateCount`` and data-gap
    ``Event`` items a window could no longer take)."""

    instrument: str
    items: tuple


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

    def on_news(self, instrument: str, items: tuple) -> None:
        """What a bar (or ``News``) carried: late counts per minute and data-gap events."""
        for x in items:
            if isinstance(x, Event):
                self.on_event(x)
            else:  # trades.LateCount
                self._add_late(instrument, x.minute, x.n)

    def on_late(self, instrument: str, late_ts: list[int]) -> None:
        for ts in late_ts:
            self._add_late(instrument, ts - ts % MINUTE_MS, 1)

    def _add_late(self, instrument: str, minute: int, n: int) -> None:
        d = self.late.setdefault(instrument, {})
        d[minute] = d.get(minute, 0) + n

    def on_bar(self, bar: Bar) -> None:
        d = self.trades.setdefault(bar.instrument, {})
        d[bar.start] = bar.trades
        cutoff = bar.start - DAY_MS  # a day of minutes is plenty for any primary bar
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
    """Puts the instruments' streams into one event-time order before the portfolio sees them, so
    a shared book (equity, positions, guards, one bandit, the optimizer) is a function of the input
    alone, whatever the partition count, process count, batch cut or arrival order.

    What it relies on (``dataflows.pipeline``): an instrument's 1m bars reach the portfolio on the
    same path as its scored rows, in event-time order, and the 1m bar ending ``t`` comes after every
    other item of that instrument ending at or before ``t``. So once instrument X's bar ending
    ``t`` is here, nothing of X ending at or before ``t`` is still to come: X's *progress* is ``t``.

    Release rule: an item ending at ``t`` is released once every instrument of the *universe* has
    progress ``>= t``; released items are ordered by (t, 1m bars before scored rows, instrument).
    The universe is known before the first trade (the synthetic symbols, the instruments of a replay
    tape, the ccxt feeds, a Kafka run's ``--instruments``): an instrument is waited for before its
    first bar, so a partition read late cannot fall behind what the book already did. Without a
    declared universe (Kafka without ``--instruments``) instruments join at their first item, which
    depends on arrival order: recorded as an ``instrument_joined`` event naming where the book was.

    An instrument that never trades again holds the book until the end of the input (replays: the
    rest is released in order at EOF). Live (``wait_ms`` set): when the release has been held for
    ``wait_ms`` of wall time, the instruments holding it are declared silent (``instrument_silent``
    event) and the book moves on without them; a silent instrument's next item makes it wait again
    (``instrument_back``), and its items that end before where the book already is are applied on
    arrival. So a live run is deterministic up to when instruments are declared silent.
    """

    universe: tuple = ()
    wait_ms: Optional[int] = None
    progress: dict = field(default_factory=dict)  # instrument -> end of its newest 1m bar here
    buffer: list = field(default_factory=list)  # heap of (t, rank, instrument, n, item); n: ties never reach item
    n: int = 0
    released: Optional[int] = None  # every item ending at or before this has been released
    silent: dict = field(default_factory=dict)  # instrument -> its progress when declared silent
    held_since: Optional[int] = None  # wall ms: since when a release has been held (live)

    def push(self, item, now_ms: int = 0) -> list:
        """Take one item (a 1m Bar or a ScoredRow); returns events (joins, returns) it causes.
        Call ``release`` once the batch is in."""
        inst, t = item.instrument, item.end
        events: list = []
        if inst not in self.progress and inst not in self.universe and self.released is not None \
                and t <= self.released:  # the book is past its first item: where it joins depends on arrival
            events.append(self._event("instrument_joined", inst, now_ms, t,
                                      f"not in the declared instruments; its first item (end {t}) came after "
                                      f"the book had reached {self.released}: applied out of order"))
        if inst in self.silent:
            events.append(self._event("instrument_back", inst, now_ms, t,
                                      f"silent since {self.silent.pop(inst)}; waited for again"))
        if isinstance(item, Bar):  # the marker: nothing of this instrument ending at or before t is to come
            self.progress[inst] = max(self.progress.get(inst, t), t)
        elif inst not in self.progress and inst not in self.universe:
            self.progress[inst] = t - 1  # a newcomer is waited for from now on
        self.n += 1
        at = self.released if self.released is not None and t <= self.released else t  # behind the book: next
        heapq.heappush(self.buffer, (at, 0 if isinstance(item, Bar) else 1, inst, self.n, item))
        return events

    def watermark(self) -> Optional[int]:
        waited = [i for i in {*self.universe, *self.progress} if i not in self.silent]
        if not waited:
            return None
        if any(i not in self.progress for i in waited):
            return None
        return min(self.progress[i] for i in waited)

    def release(self, now_ms: int = 0) -> list:
        """Items (and silent events, live) that can go to the book now, in order."""
        out: list = []
        w = self.watermark()
        if self.wait_ms is not None and self.buffer and (w is None or self.buffer[0][0] > w):
            if self.held_since is None:
                self.held_since = now_ms
            elif now_ms - self.held_since >= self.wait_ms:
                out.extend(self._declare_silent(now_ms))
                w = self.watermark()
                self.held_since = None
        if self.released is not None:  # items behind the book (a silent one back, a late joiner) go now
            w = self.released if w is None else max(w, self.released)
        if w is None:
            return out
        if not self.buffer or self.buffer[0][0] > w:
            return out
        while self.buffer and self.buffer[0][0] <= w:  # in (t, rank, instrument) order
            out.append(heapq.heappop(self.buffer)[4])
        self.released = w if self.released is None else max(self.released, w)
        self.held_since = now_ms if (self.wait_ms is not None and self.buffer) else None
        return out

    def _declare_silent(self, now_ms: int) -> list:
        """The instruments that hold back the oldest waiting item go silent."""
        oldest = self.buffer[0][0]
        out = []
        for i in sorted({*self.universe, *self.progress}):
            if i not in self.silent and self.progress.get(i, -1) < oldest:
                self.silent[i] = self.progress.get(i)
                out.append(self._event("instrument_silent", i, now_ms, self.progress.get(i),
                                       f"nothing for {self.wait_ms} ms of wall time: the book goes on without it"))
        return out

    def next_check(self) -> Optional[int]:
        """Live: the wall ms at which a held release declares the laggards silent."""
        if self.wait_ms is None or self.held_since is None or not self.buffer:
            return None
        return self.held_since + self.wait_ms

    def flush(self) -> list:
        out = [heapq.heappop(self.buffer)[4] for _ in range(len(self.buffer))]
        if out:
            self.released = max(self.released or 0, max(x.end for x in out))
        return out

    @staticmethod
    def _event(kind: str, instrument: str, now_ms: int, t: Optional[int], reason: str) -> Event:
        ex, sym = split_instrument(instrument)
        return Event(kind=kind, ts=t if t is not None else now_ms, exchange=ex, symbol=sym, to_ts=t,
                     reason=reason, source="pipeline")


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
        if bar.news:
            self.quality.on_news(bar.instrument, bar.news)
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


def upgrade_sequencer(old, new: Sequencer) -> Sequencer:
    """A ``Sequencer`` snapshotted by the previous release (``last_end``; its buffer held the same
    ``(t, rank, instrument, n, item)`` tuples, as a list)."""
    new.progress = dict(getattr(old, "last_end", {}))
    new.buffer = sorted(getattr(old, "buffer", []), key=lambda b: b[:4])  # a sorted list is a heap
    new.n = getattr(old, "n", len(new.buffer))
    return new
