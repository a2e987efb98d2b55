"""The optimizer itself: variant slots, their scoring against production, gated promotion.

psr, dsr: the paired test of the variant against production (issue 12). Both equity curves are
sampled at the end of every primary bar (the last mark of the bar wins) from the variant's start,
so the two per-bar return series cover the SAME bars; ``sharpe_inference.sharpe_difference_test``
(Ledoit & Wolf 2008: HAC delta-method test of the Sharpe difference, small-sample Student t) gives
the one-sided p-value of "the variant's Sharpe is higher". psr = 1 - p; dsr = 1 - p / w_k,
deflated for the search: variant k (the k-th ever drawn) may spend the share w_k =
``sharpe_inference.trial_weight(k, max_variants)`` of the error budget alpha = 1 -
``psr_threshold`` (1/32 each for the first 16, 1/64 for the next 16, ...; the weights sum to 1), so
dsr >= psr_threshold means p <= alpha * w_k, and the chance that any skill-less variant is ever
promoted stays below alpha however long the search runs (weighted Bonferroni). This replaces
PSR/DSR against production's *estimated* Sharpe as a fixed benchmark, which ignored that
production's Sharpe is measured with error on the same bars (and the pairing that cancels their
shared noise).

Promotion: every variant is a trial of ``min_runtime_ms`` of event time (since its first record)
and is tested ONCE, at the first ``maybe_promote`` after its trial ends (outside a cool-off): a
statistic looked at every hour until it crosses a line crosses it by luck sooner or later, a test
made once does so with the probability it states. Gates, all required: trades >= ``min_trades``;
roi >= ``min_roi``; win rate >= ``min_win_rate``; annualised Sharpe >= ``min_sharpe``; dsr >=
``psr_threshold``. Among the variants tested at that moment that pass, the highest dsr wins (then
Sharpe, then the older id); every other variant tested then retires (its one test is spent), and
``refill`` draws replacements. The optimizer takes the winner's config as the new production
config (new variants derive from it and the ``config`` column diffs against it), starts the
cool-off and marks the slot ``promoted``; the portfolio applies it (``apply_promotion``) and
refills (near the winner when ``refill_near_winner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from operators import sharpe_inference, stats
from operators.bars import TIMEFRAMES
from operators.decision import Decision
from operators.optimizer.config import OptimizerConfig
from operators.optimizer.results import Promotion, VariantMetrics, Verdict, _config_json
from operators.optimizer.sampling import Variant, draw_variant
from operators.optimizer.space import SearchSpace, SearchSpaceError, default_space
from operators.optimizer.tracking import PeriodCurve, Track, paired
from operators.paper import EquityPoint, Fill
from operators.records import HOUR_MS
from operators.strategy import StrategyEngine
from operators.strategy_config import StrategyConfig

STATUSES = ("active", "promoted", "retired")


@dataclass
class Slot:
    """One live variant: its engine, its metric inputs, its per-bar returns for the paired test."""

    variant: Variant
    engine: StrategyEngine
    track: Track
    periods: Optional[PeriodCurve] = None
    status: str = "active"
    number: int = 0

    @property
    def variant_id(self) -> str:
        return self.variant.variant_id


class Optimizer:
    """Variants, their metrics, and promotion. See the package and module docstrings.

    ``production`` is production's config now; ``primary_tf`` / ``overlay_tfs`` are the
    timeframes the pipeline computes (variants cannot use others)."""

    def __init__(self, cfg: OptimizerConfig, production: StrategyConfig, *, strategy_id: str = "ensemble",
                 space: Optional[SearchSpace] = None, primary_tf: str = "5m",
                 overlay_tfs: Iterable[str] = ("15m", "1h")) -> None:
        self.cfg = cfg
        self.base = production
        self.strategy_id = strategy_id
        self.slots: list[Slot] = []
        self.tried = 0                              # variants ever created (N of the deflation)
        self.promotions = 0
        self.last_promotion_ms: Optional[int] = None
        self.tested = 0                             # variants that had their one test
        self.now_ms: Optional[int] = None           # newest event time observed
        self.period_ms = TIMEFRAMES.get(primary_tf, 300_000)
        self._prod_periods = PeriodCurve(self.period_ms)
        self._by_id: dict[str, Slot] = {}
        self._prod: Optional[Track] = None
        self._bars_since = 0
        self._last_bar_ts: Optional[int] = None
        self._trade_closed = False
        self._grid_index = 0
        self._seen: set[str] = set()
        if not cfg.enabled:
            self.space = None
            self.dims: tuple = ()
            self.rng = None
            return
        self.space = space if space is not None else default_space(overlay_tfs)
        self.dims = self.space.validate(production, primary_tf, overlay_tfs)
        self.rng = np.random.default_rng(cfg.seed)
        self._prod = Track(production.initial_equity, cfg.latency_window, config_hash=production.config_hash())
        self._seen.add(production.config_hash())
        rejected: dict[str, int] = {}
        while len(self.slots) < cfg.max_variants:
            slot, rej = self._new_slot(None, None)
            for k, v in rej.items():
                rejected[k] = rejected.get(k, 0) + v
            if slot is None:
                break
        if not self.slots:
            raise SearchSpaceError(
                f"no variant of the search space satisfies the constraints after {cfg.max_draws} draws "
                f"(rejections: {rejected}); widen the space or relax the constraints")

    def __setstate__(self, state: dict) -> None:
        # a snapshot taken before the paired test existed (issue 12) resumes with empty per-bar
        # curves: the running trials are tested on the bars from the restart on
        self.__dict__.update(state)
        self.__dict__.setdefault("tested", 0)
        self.__dict__.setdefault("period_ms", 300_000)
        self.__dict__.setdefault("_prod_periods", PeriodCurve(self.period_ms))
        self.__dict__.pop("retired_srs", None)
        for slot in self.slots:
            if getattr(slot, "periods", None) is None:
                slot.periods = PeriodCurve(self.period_ms)
            slot.__dict__.pop("bench", None)

    # ------------------------------------------------------------------ status
    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def engines(self) -> list[StrategyEngine]:
        """The live variants' engines (empty when off). Promoted / retired slots stop running."""
        return [s.engine for s in self.slots if s.status == "active"]

    def variant(self, variant_id: str) -> Optional[Variant]:
        s = self._by_id.get(variant_id)
        return s.variant if s is not None else None

    def variant_ids(self) -> list[str]:
        return [s.variant_id for s in self.slots]

    # ------------------------------------------------------------------ variants
    def next_variant(self, near: Optional[StrategyConfig] = None, now_ms: Optional[int] = None) -> Optional[Variant]:
        """Draw the next variant from production's config (``near``: around that config) with the
        optimizer's own generator / grid position, and start it in a new slot (its engine joins
        ``engines()``). None when off or when ``max_draws`` draws found nothing new."""
        if not self.enabled:
            return None
        slot, _ = self._new_slot(near, now_ms)
        return slot.variant if slot is not None else None

    def _new_slot(self, near: Optional[StrategyConfig], now_ms: Optional[int]) -> tuple[Optional[Slot], dict]:
        vid = f"v{self.tried + 1:04d}"
        v, self._grid_index, rejected = draw_variant(
            self.dims, self.space.constraints, self.base, self.rng, variant_id=vid, mode=self.cfg.sampling,
            index=self._grid_index, seed=self.cfg.seed, near=near, near_steps=self.cfg.near_steps,
            exclude=self._seen, max_draws=self.cfg.max_draws)
        if v is None:
            return None, rejected
        self.tried += 1
        self._seen.add(v.cfg.config_hash())
        engine = StrategyEngine(v.cfg, origin="experimental", strategy_id=self.strategy_id, variant_id=vid)
        track = Track(v.cfg.initial_equity, self.cfg.latency_window, started_ms=now_ms,
                      config_hash=engine.config_hash, variant_id=vid)
        slot = Slot(v, engine, track, periods=PeriodCurve(self.period_ms), number=self.tried)
        self.slots.append(slot)
        self._by_id[vid] = slot
        return slot, rejected

    def retire(self, variant_id: str) -> bool:
        """Stop a variant (it is removed and replaced at the next ``refill``)."""
        s = self._by_id.get(variant_id)
        if s is None or s.status != "active":
            return False
        s.status = "retired"
        return True

    def refill(self, now_ms: int) -> list[str]:
        """Remove promoted / retired slots (their final Sharpe joins the trials' variance) and draw
        new variants up to ``max_variants``, near the last winner when ``refill_near_winner`` and
        there was a promotion. Returns the new variant ids."""
        if not self.enabled:
            return []
        keep = []
        for s in self.slots:
            if s.status == "active":
                keep.append(s)
                continue
            del self._by_id[s.variant_id]
        self.slots = keep
        near = self.base if (self.cfg.refill_near_winner and self.promotions) else None
        new = []
        while len(self.slots) < self.cfg.max_variants:
            slot, _ = self._new_slot(near, now_ms)
            if slot is None and near is not None:
                slot, _ = self._new_slot(None, now_ms)  # the neighbourhood is exhausted: anywhere
            if slot is None:
                break
            new.append(slot.variant_id)
        self._prune_production()
        return new

    def _prune_production(self) -> None:
        """Production's per-bar returns are kept from the oldest live variant's start on."""
        starts = [s.track.started_ms for s in self.slots if s.status == "active" and s.track.started_ms is not None]
        if starts:
            self._prod_periods.since((min(starts) - 1) // self.period_ms)

    # ------------------------------------------------------------------ records
    def observe(self, records: Iterable) -> None:
        """Feed every record the variants AND production produced (others are ignored)."""
        if not self.cfg.enabled:
            return
        for rec in records:
            origin = getattr(rec, "origin", None)
            if origin == "production":
                self._observe_production(rec)
            elif origin == "experimental":
                s = self._by_id.get(rec.variant_id)
                if s is None or s.status != "active":
                    continue
                if isinstance(rec, EquityPoint):
                    s.track.on_equity(rec)
                    s.periods.mark(rec.ts, rec.equity)
                    self._tick(rec.ts)
                elif isinstance(rec, Fill):
                    self._trade_closed |= s.track.on_fill(rec)
                    self._tick(rec.ts)
                elif isinstance(rec, Decision):
                    s.track.on_decision(rec)
                    self._tick(rec.ts)

    def _tick(self, ts: int) -> None:
        if self.now_ms is None or ts > self.now_ms:
            self.now_ms = ts

    def _observe_production(self, rec) -> None:
        p = self._prod
        if isinstance(rec, EquityPoint):
            p.on_equity(rec)
            self._prod_periods.mark(rec.ts, rec.equity)
        elif isinstance(rec, Fill):
            self._trade_closed |= p.on_fill(rec)
        elif isinstance(rec, Decision):
            p.on_decision(rec)
            if self._last_bar_ts is None or rec.ts > self._last_bar_ts:
                self._last_bar_ts = rec.ts
                self._bars_since += 1
        else:
            return
        p.config_hash = rec.config_hash
        p.variant_id = rec.variant_id
        self._tick(rec.ts)

    def metrics_due(self) -> bool:
        """A closed trade since the last ``metrics`` call, or ``metrics_every_bars`` primary bars."""
        return self.cfg.enabled and (self._trade_closed or self._bars_since >= self.cfg.metrics_every_bars)

    # ------------------------------------------------------------------ metrics
    def _row(self, t: Track, now_ms: int, *, origin: str, variant_id: str, config: str,
             status: str, psr: Optional[float] = None, dsr: Optional[float] = None) -> VariantMetrics:
        ppy = self.cfg.periods_per_year
        r = t.curve.returns()
        p50, p99 = stats.latency_percentiles(t.latencies, (50.0, 99.0))
        return VariantMetrics(
            ts=now_ms, origin=origin, strategy_id=self.strategy_id, variant_id=variant_id,
            config_hash=t.config_hash, config=config, status=status,
            runtime_ms=max(0, now_ms - t.started_ms) if t.started_ms is not None else 0,
            roi=(t.equity / t.initial_equity - 1.0) if t.equity is not None else 0.0,
            trades=t.trades.trades, win_rate=t.trades.win_rate(), avg_pnl=t.trades.avg_pnl(),
            sharpe=r.sharpe(ppy), sortino=r.sortino(ppy), profit_factor=t.trades.profit_factor(),
            max_drawdown=t.max_dd, flip_rate=t.flip_rate(), latency_p50_ms=p50, latency_p99_ms=p99,
            psr=psr, dsr=dsr)

    def trial_weight(self, slot: Slot) -> float:
        """The share of the error budget this variant's one test may spend (module docstring)."""
        return sharpe_inference.trial_weight(slot.number, self.cfg.max_variants)

    def evaluate(self, now_ms: int) -> list[Verdict]:
        """Metrics and failed gates of every variant slot (cool-off not included: see
        ``maybe_promote``). The paired test is computed on the bars so far; it counts once, when
        ``maybe_promote`` tests the variant at the end of its trial."""
        if not self.cfg.enabled:
            return []
        return [self._verdict(s, now_ms) for s in self.slots]

    def _verdict(self, s: Slot, now_ms: int) -> Verdict:
        """One slot's metrics, paired test and failed gates."""
        c = self.cfg
        alpha = 1.0 - c.psr_threshold
        test = sharpe_inference.sharpe_difference_test(*paired(s.periods, self._prod_periods))
        w = self.trial_weight(s)
        p = 1.0 - test.p if test is not None else None
        d = max(0.0, 1.0 - test.p / w) if test is not None else None
        m = self._row(s.track, now_ms, origin="experimental", variant_id=s.variant_id,
                      config=_config_json(s.variant.cfg, self.base), status=s.status, psr=p, dsr=d)
        failed = []
        if s.status != "active":
            failed.append(f"status {s.status}")
        if m.trades < c.min_trades:
            failed.append(f"trades {m.trades} < {c.min_trades}")
        if m.runtime_ms < c.min_runtime_ms:
            failed.append(f"runtime {m.runtime_ms / HOUR_MS:.1f}h < {c.min_runtime_ms / HOUR_MS:.1f}h")
        if m.roi < c.min_roi:
            failed.append(f"roi {m.roi:.4f} < {c.min_roi}")
        if m.win_rate is None or m.win_rate < c.min_win_rate:
            failed.append(f"win_rate {_fmt(m.win_rate)} < {c.min_win_rate}")
        if m.sharpe is None or m.sharpe < c.min_sharpe:
            failed.append(f"sharpe {_fmt(m.sharpe)} < {c.min_sharpe}")
        if d is None or d < c.psr_threshold:
            failed.append(f"dsr {_fmt(d)} < {c.psr_threshold}")
        return Verdict(variant_id=s.variant_id, metrics=m, test=test, weight=w, level=alpha * w,
                       failed=tuple(failed))

    def production_metrics(self, now_ms: int) -> Optional[VariantMetrics]:
        if not self.cfg.enabled:
            return None
        p = self._prod
        return self._row(p, now_ms, origin="production", variant_id=p.variant_id or "base", config="{}",
                         status="active")

    def metrics(self, now_ms: int) -> list[VariantMetrics]:
        """One row per variant slot (active, or promoted / retired until the next refill) and one
        for production (origin ``production``, psr / dsr NULL). Resets the schedule."""
        if not self.cfg.enabled:
            return []
        self._trade_closed = False
        self._bars_since = 0
        return [v.metrics for v in self.evaluate(now_ms)] + [self.production_metrics(now_ms)]

    # ------------------------------------------------------------------ promotion
    def in_cool_off(self, now_ms: int) -> bool:
        return self.last_promotion_ms is not None and now_ms < self.last_promotion_ms + self.cfg.cool_off_ms

    def maybe_promote(self, now_ms: int) -> Optional[Promotion]:
        """Test the variants whose trial has ended (runtime >= ``min_runtime_ms``), once each: the
        best that passes every gate becomes a Promotion (at most one), the others retire and new
        variants are drawn in their place. None when off, in a cool-off, or nobody passed. On a
        promotion the optimizer's production config becomes the winner's, the cool-off starts and
        the slot is marked ``promoted``; the caller swaps production's config with
        ``apply_promotion`` and refills."""
        if not self.cfg.enabled or self.in_cool_off(now_ms):
            return None
        due = [self._verdict(s, now_ms) for s in self.slots if s.status == "active"
               and s.track.started_ms is not None and now_ms - s.track.started_ms >= self.cfg.min_runtime_ms]
        if not due:
            return None
        self.tested += len(due)
        ok = [v for v in due if v.qualifies]
        order = {s.variant_id: s.number for s in self.slots}
        best = max(ok, key=lambda v: (v.metrics.dsr, v.metrics.sharpe, -order[v.variant_id])) if ok else None
        for v in due:
            if v is not best:
                self._by_id[v.variant_id].status = "retired"  # its one test is spent
        if best is None:
            self.refill(now_ms)
            return None
        slot = self._by_id[best.variant_id]
        old, new = self.base, slot.variant.cfg
        m, t = best.metrics, best.test
        c = self.cfg
        reason = (f"dsr {m.dsr:.4f} >= {c.psr_threshold}: paired Sharpe difference {t.diff:+.4f} per bar over "
                  f"{t.n} bars (se {t.se:.4f}, Ledoit-Wolf HAC, t {t.df:.0f} df), p {t.p:.2g} <= alpha x w = "
                  f"{best.level:.2g} (variant {slot.number} of the search, weight {best.weight:.4g}); "
                  f"trades {m.trades} >= {c.min_trades}; runtime {m.runtime_ms / HOUR_MS:.1f}h >= "
                  f"{c.min_runtime_ms / HOUR_MS:.1f}h; roi {m.roi:.4f} >= {c.min_roi}; win_rate {m.win_rate:.3f} >= "
                  f"{c.min_win_rate}; sharpe {m.sharpe:.2f} >= {c.min_sharpe}")
        changes = {k: [getattr(old, k), getattr(new, k)] for k in old.to_dict() if getattr(old, k) != getattr(new, k)}
        slot.status = "promoted"
        m.status = "promoted"
        self.base = new
        self._seen.add(new.config_hash())
        self.last_promotion_ms = now_ms
        self.promotions += 1
        m.config = "{}"
        return Promotion(ts=now_ms, strategy_id=self.strategy_id, variant_id=best.variant_id,
                         old_config=old.to_dict(), new_config=new.to_dict(), old_hash=old.config_hash(),
                         new_hash=new.config_hash(), changes=changes, metrics=m, reason=reason,
                         n_trials=self.tried)


def _fmt(x: Optional[float]) -> str:
    return "None" if x is None else f"{x:.4f}"
