"""Metric inputs of one strategy, updated record by record: equity curves, trades, flips, latency.

Metrics (all from the records, per strategy; ``operators.stats`` has the formulas):

- equity curve: one value per distinct mark time (a 1m bar end), the LAST mark of that time
  (``EquityPoint``s of several instruments share a ts); a mark older than the newest time
  updates the newest value, like ``StrategyEngine.sharpe``. Per-minute simple returns, the open
  minute included. Sharpe = mean / sd(ddof=1) x sqrt(periods_per_year); Sortino = mean /
  downside deviation (target 0, over all returns) x sqrt(periods_per_year).
- ROI = last equity / initial_equity - 1; max drawdown over every mark, from a peak that starts at
  initial_equity (as the engine's risk state).
- trades, win rate, average PnL, profit factor: exit ``Fill``s (``realised_pnl`` is the trade's
  net PnL, both fees); a trade closes when its exit fill is observed.
- flip rate: per instrument, decisions with side 0 dropped, share of consecutive signalled
  decisions whose side changed; pooled over instruments (flips / pairs).
- latency p50 / p99: ``Decision.latency_ms`` of the last ``latency_window`` decisions.
- per-bar returns (``PeriodCurve``, ``paired``): the input of the paired test against production
  (``operators.optimizer.core``).

State is O(1) per strategy (streaming moments, counters, a bounded latency window), so bytewax
snapshots it cheaply every epoch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from operators import stats
from operators.decision import Decision
from operators.paper import EquityPoint, Fill


@dataclass
class Curve:
    """Per-minute returns of one equity curve: one value per distinct mark time (the latest mark
    wins), the return of a minute pushed when a later minute starts; the open minute is added at
    read time (``returns``)."""

    ts: Optional[int] = None
    eq: float = 0.0
    prev: Optional[float] = None
    ret: stats.ReturnStats = field(default_factory=stats.ReturnStats)

    def mark(self, ts: int, equity: float) -> None:
        if self.ts is None:
            self.ts, self.eq = ts, equity
            return
        if ts > self.ts:
            if self.prev is not None and self.prev > 0:
                self.ret.push(self.eq / self.prev - 1.0)
            self.prev = self.eq
            self.ts = ts
        self.eq = equity

    def returns(self) -> stats.ReturnStats:
        open_r = self.eq / self.prev - 1.0 if self.prev is not None and self.prev > 0 else None
        return self.ret.plus(open_r)


@dataclass
class Track:
    """Everything the metrics of one strategy need, updated record by record."""

    initial_equity: float
    window: int = 1024
    started_ms: Optional[int] = None
    equity: Optional[float] = None
    peak: float = 0.0
    max_dd: float = 0.0
    curve: Curve = field(default_factory=Curve)
    trades: stats.TradeStats = field(default_factory=stats.TradeStats)
    last_side: dict = field(default_factory=dict)   # instrument -> last non-zero decision side
    flips: int = 0
    pairs: int = 0
    latencies: deque = field(default_factory=deque)
    config_hash: str = ""
    variant_id: str = ""

    def __post_init__(self) -> None:
        self.peak = max(self.peak, self.initial_equity)
        if self.latencies.maxlen != self.window:
            self.latencies = deque(self.latencies, maxlen=self.window)

    def start(self, ts: int) -> None:
        if self.started_ms is None:
            self.started_ms = ts

    def on_equity(self, p: EquityPoint) -> None:
        self.start(p.ts)
        self.equity = p.equity
        self.peak = max(self.peak, p.equity)
        if self.peak > 0:
            self.max_dd = max(self.max_dd, (self.peak - p.equity) / self.peak)
        self.curve.mark(p.ts, p.equity)

    def on_fill(self, f: Fill) -> bool:
        self.start(f.ts)
        if f.realised_pnl is None:
            return False
        self.trades.push(f.realised_pnl)
        return True

    def on_decision(self, d: Decision) -> None:
        self.start(d.ts)
        self.latencies.append(float(d.latency_ms))
        if d.side:
            inst = f"{d.exchange}:{d.symbol}"
            last = self.last_side.get(inst)
            if last is not None:
                self.pairs += 1
                self.flips += int(d.side != last)
            self.last_side[inst] = d.side

    def flip_rate(self) -> Optional[float]:
        return self.flips / self.pairs if self.pairs else None


@dataclass
class PeriodCurve:
    """Per-bar returns of one equity curve: the equity at the end of each ``period_ms`` period (the
    last mark in it wins), the return of a period pushed when a later period starts; ``returns``
    maps period index -> return. Periods without marks carry the last equity (a zero return)."""

    period_ms: int
    cur: Optional[int] = None       # the open period
    eq: float = 0.0                 # its latest equity
    prev: Optional[float] = None    # equity at the end of the period before it
    returns: dict = field(default_factory=dict)

    def mark(self, ts: int, equity: float) -> None:
        k = (ts - 1) // self.period_ms  # a mark at a bar's end belongs to that bar's period
        if self.cur is None:
            self.cur, self.eq = k, equity
            return
        if k > self.cur:
            for j in range(self.cur, k):  # close the open period, and any empty ones after it
                if self.prev is not None and self.prev > 0:
                    self.returns[j] = self.eq / self.prev - 1.0
                self.prev = self.eq
            self.cur = k
        self.eq = equity

    def since(self, first: int) -> None:
        """Forget the returns of periods before ``first``."""
        for k in [k for k in self.returns if k < first]:
            del self.returns[k]


def paired(variant: PeriodCurve, production: PeriodCurve) -> tuple[np.ndarray, np.ndarray]:
    """The two return series over the closed periods both have, in period order."""
    ks = sorted(k for k in variant.returns if k in production.returns)
    return (np.array([variant.returns[k] for k in ks], dtype=float),
            np.array([production.returns[k] for k in ks], dtype=float))
