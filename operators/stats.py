"""Performance statistics, the one definition of each: returns, Sharpe (``sharpe``,
``sharpe_from_moments``), Sortino, drawdown, trade statistics, signal flip rate, latency
percentiles, moments, and probability scores (Brier, log loss). Pure functions on sequences plus
two small streaming accumulators (``ReturnStats``, ``TradeStats``) whose state is a handful of
numbers, so an optimizer can keep one per variant and bytewax can snapshot it every epoch for free.
Inference on Sharpe ratios (PSR, DSR, the paired difference test) is in
``operators.sharpe_inference``.

Conventions
-----------
- Returns are SIMPLE per-period returns ``r_t = E_t / E_{t-1} - 1`` of an equity curve.
- Sharpe and Sortino use a zero risk-free rate / zero target. ``periods_per_year`` annualises by
  ``sqrt(periods_per_year)``; 1-minute equity marks of a market that trades around the clock
  give ``operators.records.MINUTES_PER_YEAR`` = 365 * 24 * 60 = 525,600 (as ``operators.strategy``).
- A statistic that is undefined for the data (no trades, fewer than two returns, zero
  dispersion, no losing trade for the profit factor) is ``None``, never 0 or inf: a ``None``
  is written as NULL and never passes a promotion gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "simple_returns", "sharpe", "sharpe_from_moments", "sortino", "downside_deviation", "max_drawdown",
    "profit_factor", "win_rate", "avg_pnl", "flip_rate", "latency_percentiles", "moments", "brier_score",
    "log_loss", "ReturnStats", "TradeStats",
]


# --------------------------------------------------------------------------------------------
# returns, Sharpe, Sortino, drawdown
# --------------------------------------------------------------------------------------------

def simple_returns(equity: Sequence[float]) -> np.ndarray:
    """Per-period simple returns of an equity curve: ``r_t = E_t / E_{t-1} - 1`` for t = 1..n-1.
    A period whose previous equity is not positive has no defined return and is skipped.

    >>> simple_returns([100.0, 110.0, 99.0]).round(6).tolist()
    [0.1, -0.1]
    """
    e = np.asarray(equity, dtype=float)
    if e.size < 2:
        return np.empty(0)
    prev, cur = e[:-1], e[1:]
    ok = prev > 0
    return cur[ok] / prev[ok] - 1.0


def sharpe_from_moments(n: int, mean: float, var: float, periods_per_year: float = 1.0) -> Optional[float]:
    """Annualised Sharpe ratio ``mean / sqrt(var) * sqrt(periods_per_year)`` of ``n`` returns with
    sample mean ``mean`` and sample variance ``var`` (ddof=1); zero risk-free rate. None with
    fewer than two returns or zero dispersion. Every Sharpe ratio of the project is this one:
    ``sharpe`` (a sequence), ``ReturnStats.sharpe`` (streaming) and ``StrategyEngine.sharpe``.

    >>> round(sharpe_from_moments(2, 0.02, 2e-4), 6)
    1.414214
    >>> sharpe_from_moments(1, 0.02, 0.0) is None
    True
    """
    if n < 2:
        return None
    sd = math.sqrt(var)
    if not sd > 1e-15:
        return None
    return mean / sd * math.sqrt(periods_per_year)


def sharpe(returns: Sequence[float], periods_per_year: float = 1.0) -> Optional[float]:
    """Annualised Sharpe ratio ``mean(r) / std(r, ddof=1) * sqrt(periods_per_year)`` (zero
    risk-free rate). ``periods_per_year=1`` gives the per-period ratio. None with fewer than two
    returns or zero dispersion.

    >>> round(sharpe([0.01, 0.03]), 6)      # mean 0.02, sd 0.014142
    1.414214
    """
    r = np.asarray(returns, dtype=float)
    if r.size < 2:
        return None
    return sharpe_from_moments(r.size, float(r.mean()), float(r.var(ddof=1)), periods_per_year)


def downside_deviation(returns: Sequence[float], target: float = 0.0) -> Optional[float]:
    """Target downside deviation ``sqrt( sum_t min(r_t - target, 0)^2 / n )`` over ALL n
    returns (Sortino & Price 1994): periods above the target count as zero deviation, they are
    not dropped. None for no returns."""
    r = np.asarray(returns, dtype=float)
    if r.size == 0:
        return None
    d = np.minimum(r - target, 0.0)
    return float(math.sqrt(float(np.mean(d * d))))


def sortino(returns: Sequence[float], periods_per_year: float = 1.0, target: float = 0.0) -> Optional[float]:
    """Annualised Sortino ratio ``(mean(r) - target) / DD * sqrt(periods_per_year)`` with DD the
    downside deviation relative to ``target`` (0 by default; see ``downside_deviation``). None
    with fewer than two returns or no return below the target (DD = 0).

    >>> round(sortino([0.02, -0.01, 0.02, -0.01]), 6)   # mean 0.005, DD = sqrt(2e-4/4)
    0.707107
    """
    r = np.asarray(returns, dtype=float)
    if r.size < 2:
        return None
    dd = downside_deviation(r, target)
    if dd is None or not dd > 1e-15:
        return None
    return (float(r.mean()) - target) / dd * math.sqrt(periods_per_year)


def max_drawdown(equity: Sequence[float], start_peak: Optional[float] = None) -> float:
    """Largest fall from a running peak as a fraction of that peak:
    ``max_t (P_t - E_t) / P_t`` with ``P_t = max(start_peak, E_0..E_t)``. 0 for a curve that
    never falls (or is empty). ``start_peak`` is e.g. the initial equity, so a book that loses
    from its first mark counts that loss (as ``operators.risk.RiskState`` does).

    >>> round(max_drawdown([100, 120, 90, 130, 117]), 6)   # 120 -> 90
    0.25
    """
    e = np.asarray(equity, dtype=float)
    if e.size == 0:
        return 0.0
    peak = np.maximum.accumulate(e)
    if start_peak is not None:
        peak = np.maximum(peak, start_peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = np.where(peak > 0, (peak - e) / peak, 0.0)
    return float(max(0.0, dd.max()))


# --------------------------------------------------------------------------------------------
# trade statistics
# --------------------------------------------------------------------------------------------

def profit_factor(pnls: Iterable[float]) -> Optional[float]:
    """Gross wins / gross losses = ``sum(p for p > 0) / -sum(p for p < 0)``. None when undefined:
    no trades, or no losing trade (the ratio would be infinite or 0/0).

    >>> profit_factor([100, -50, 150])
    5.0
    """
    p = np.asarray(list(pnls), dtype=float)
    loss = float(-p[p < 0].sum())
    if loss <= 0:
        return None
    return float(p[p > 0].sum()) / loss


def win_rate(pnls: Iterable[float]) -> Optional[float]:
    """Share of trades with a net PnL > 0 (a zero-PnL trade is not a win, as in the paper book).
    None without trades."""
    p = np.asarray(list(pnls), dtype=float)
    return float((p > 0).mean()) if p.size else None


def avg_pnl(pnls: Iterable[float]) -> Optional[float]:
    """Mean net PnL per closed trade (quote currency). None without trades."""
    p = np.asarray(list(pnls), dtype=float)
    return float(p.mean()) if p.size else None


def flip_rate(sides: Iterable[int]) -> Optional[float]:
    """Signal flip rate of ONE stream of decisions (one instrument): drop the decisions without a
    signal (side 0), then the share of consecutive pairs whose side differs:
    ``#{k : s_k != s_(k-1)} / (m - 1)`` over the m non-zero sides. A long, nothing, long is no
    flip; long, short is one. None with fewer than two signalled decisions.

    >>> flip_rate([1, 0, 1, -1, -1, 0, 1])     # non-zero: 1 1 -1 -1 1 -> 2 flips / 4 pairs
    0.5
    """
    s = [int(np.sign(x)) for x in sides if x]
    if len(s) < 2:
        return None
    return sum(1 for a, b in zip(s, s[1:]) if a != b) / (len(s) - 1)


def latency_percentiles(latencies: Iterable[float], qs: Sequence[float] = (50.0, 99.0)) -> list[Optional[float]]:
    """Percentiles (numpy's default linear interpolation between order statistics) of the
    latencies, one per q in ``qs`` (0-100). Nones when there is no latency."""
    x = np.asarray(list(latencies), dtype=float)
    if x.size == 0:
        return [None for _ in qs]
    return [float(v) for v in np.percentile(x, list(qs))]


# --------------------------------------------------------------------------------------------
# higher moments
# --------------------------------------------------------------------------------------------

def moments(returns: Sequence[float]) -> tuple[float, float]:
    """Sample skewness and NON-excess kurtosis as moment ratios (biased estimators, as
    ``scipy.stats.skew(bias=True)`` / ``kurtosis(fisher=False, bias=True)``):
    ``skew = m3 / m2^1.5``, ``kurt = m4 / m2^2`` with ``m_k = mean((r - mean r)^k)``. A normal
    distribution has (0, 3). These are the moments of the empirical distribution, so they obey
    ``kurt >= 1 + skew^2``, which keeps PSR's variance term positive. (0, 3) for fewer than two
    returns or zero dispersion."""
    r = np.asarray(returns, dtype=float)
    if r.size < 2:
        return 0.0, 3.0
    d = r - r.mean()
    m2 = float(np.mean(d ** 2))
    if not m2 > 0:
        return 0.0, 3.0
    return float(np.mean(d ** 3)) / m2 ** 1.5, float(np.mean(d ** 4)) / m2 ** 2


# --------------------------------------------------------------------------------------------
# probability scores
# --------------------------------------------------------------------------------------------

def _probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels, dtype=int)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n, K) and labels (n,), got {p.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {p.shape[1] - 1}]")
    return p, y


def brier_score(probs, labels) -> Optional[float]:
    """Multiclass Brier score ``mean_i sum_k (p_ik - 1[y_i = k])^2`` (0 perfect, 2 worst).
    ``probs`` is (n, K), ``labels`` the class indices (n,). None for n = 0.

    >>> round(brier_score([[0.2, 0.8], [0.6, 0.4]], [1, 0]), 12)   # (0.04+0.04 + 0.16+0.16) / 2
    0.2
    """
    p, y = _probs_labels(probs, labels)
    if y.size == 0:
        return None
    onehot = np.zeros_like(p)
    onehot[np.arange(y.size), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def log_losses(probs, labels, eps: float = 1e-15) -> np.ndarray:
    """Each row's log loss ``-log(p_i,y_i)``, probabilities clipped to [eps, 1] (natural log): the
    per-row form that paired tests compare."""
    p, y = _probs_labels(probs, labels)
    return -np.log(np.clip(p[np.arange(y.size), y], eps, 1.0))


def log_loss(probs, labels, eps: float = 1e-15) -> Optional[float]:
    """Multiclass log loss: the mean of ``log_losses``. None for n = 0."""
    losses = log_losses(probs, labels, eps)
    return float(np.mean(losses)) if losses.size else None


# --------------------------------------------------------------------------------------------
# streaming accumulators
# --------------------------------------------------------------------------------------------

@dataclass
class ReturnStats:
    """Streaming moments of a return series: count, mean, central sums M2..M4 (Welford /
    Terriberry updates) and the downside sum of squares ``sum min(r, 0)^2``. O(1) state, so a
    year of minutes costs the same to snapshot as an hour. Gives the same numbers as the batch
    functions above (``sharpe``, ``sortino`` with target 0, ``moments``) up to rounding."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    down2: float = 0.0

    def push(self, r: float) -> None:
        n1 = self.n
        n = n1 + 1
        delta = r - self.mean
        dn = delta / n
        dn2 = dn * dn
        t1 = delta * dn * n1
        self.mean += dn
        self.m4 += t1 * dn2 * (n * n - 3 * n + 3) + 6 * dn2 * self.m2 - 4 * dn * self.m3
        self.m3 += t1 * dn * (n - 2) - 3 * dn * self.m2
        self.m2 += t1
        self.n = n
        if r < 0:
            self.down2 += r * r

    def plus(self, r: Optional[float]) -> "ReturnStats":
        """A copy with one more return (``None``: a plain copy)."""
        c = ReturnStats(self.n, self.mean, self.m2, self.m3, self.m4, self.down2)
        if r is not None:
            c.push(r)
        return c

    def std(self) -> Optional[float]:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n >= 2 else None

    def sharpe(self, periods_per_year: float = 1.0) -> Optional[float]:
        return sharpe_from_moments(self.n, self.mean, self.m2 / (self.n - 1) if self.n >= 2 else 0.0,
                                   periods_per_year)

    def sortino(self, periods_per_year: float = 1.0) -> Optional[float]:
        if self.n < 2 or not self.down2 > 0:
            return None
        dd = math.sqrt(self.down2 / self.n)
        if not dd > 1e-15:
            return None
        return self.mean / dd * math.sqrt(periods_per_year)

    def moments(self) -> tuple[float, float]:
        """(skewness, non-excess kurtosis), biased, as ``stats.moments``."""
        if self.n < 2 or not self.m2 > 0:
            return 0.0, 3.0
        m2 = self.m2 / self.n
        return (self.m3 / self.n) / m2 ** 1.5, (self.m4 / self.n) / m2 ** 2


@dataclass
class TradeStats:
    """Streaming closed-trade statistics from net PnLs: count, wins, gross profit / loss."""

    trades: int = 0
    wins: int = 0
    gross_profit: float = 0.0
    gross_loss: float = 0.0     # positive number: -sum of the losing PnLs

    def push(self, pnl: float) -> None:
        self.trades += 1
        if pnl > 0:
            self.wins += 1
            self.gross_profit += pnl
        elif pnl < 0:
            self.gross_loss -= pnl

    def win_rate(self) -> Optional[float]:
        return self.wins / self.trades if self.trades else None

    def avg_pnl(self) -> Optional[float]:
        return (self.gross_profit - self.gross_loss) / self.trades if self.trades else None

    def profit_factor(self) -> Optional[float]:
        return self.gross_profit / self.gross_loss if self.gross_loss > 0 else None
