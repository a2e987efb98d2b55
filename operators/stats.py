"""Performance statistics (SPEC §7, DESIGN room ``stats``): returns, Sharpe, Sortino, drawdown,
trade statistics, signal flip rate, latency percentiles, the Probabilistic and Deflated Sharpe
ratios, and probability scores (Brier, log loss). Pure functions on sequences plus two small
streaming accumulators (``ReturnStats``, ``TradeStats``) whose state is a handful of numbers, so
an optimizer can keep one per variant and bytewax can snapshot it every epoch for free.

Conventions
-----------
- Returns are SIMPLE per-period returns ``r_t = E_t / E_{t-1} - 1`` of an equity curve.
- Sharpe and Sortino use a zero risk-free rate / zero target. ``periods_per_year`` annualises by
  ``sqrt(periods_per_year)``; 1-minute equity marks of a market that trades around the clock
  give ``MINUTES_PER_YEAR`` = 365 * 24 * 60 = 525,600 (as ``operators.strategy``).
- A statistic that is undefined for the data (no trades, fewer than two returns, zero
  dispersion, no losing trade for the profit factor) is ``None``, never 0 or inf: a ``None``
  is written as NULL and never passes a promotion gate.
- PSR / DSR work on the NON-annualised per-period Sharpe ratio and the number of returns ``n``
  it was measured on (Bailey & López de Prado 2012, 2014).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

MINUTES_PER_YEAR = 365 * 24 * 60
EULER_GAMMA = 0.5772156649015329  # Euler-Mascheroni constant

__all__ = [
    "MINUTES_PER_YEAR", "EULER_GAMMA", "simple_returns", "sharpe", "sortino", "downside_deviation",
    "max_drawdown", "profit_factor", "win_rate", "avg_pnl", "flip_rate", "latency_percentiles",
    "moments", "psr", "expected_max_sharpe", "deflated_sharpe", "psr_from_returns",
    "brier_score", "log_loss", "hac_se", "newey_west_lags", "SharpeDiff", "sharpe_difference_test",
    "trial_weight", "ReturnStats", "TradeStats",
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
    sd = float(r.std(ddof=1))
    if not sd > 1e-15:
        return None
    return float(r.mean()) / sd * math.sqrt(periods_per_year)


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
# PSR / DSR
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


def psr(sr: float, sr_star: float, n: int, skew: float = 0.0, kurt: float = 3.0) -> Optional[float]:
    """Probabilistic Sharpe Ratio (Bailey & López de Prado 2012): the probability that the true
    per-period Sharpe ratio exceeds ``sr_star`` given the estimate ``sr`` from ``n`` returns with
    sample skewness ``skew`` and non-excess kurtosis ``kurt``:

        PSR(SR*) = Phi( (SR - SR*) * sqrt(n - 1) / sqrt(1 - skew * SR + (kurt - 1) / 4 * SR^2) )

    ``sr`` and ``sr_star`` are NOT annualised. None for n < 2. If the variance term is not
    positive (only for degenerate moments), the result is 1, 0.5 or 0 by the sign of SR - SR*.

    >>> round(psr(0.1, 0.0, 101), 4)            # normal returns: Phi(0.1 * 10 / sqrt(1.005))
    0.8407
    """
    if n is None or n < 2 or sr is None or sr_star is None:
        return None
    den = 1.0 - skew * sr + (kurt - 1.0) / 4.0 * sr * sr
    diff = sr - sr_star
    if not den > 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    from scipy.stats import norm  # lazy: scipy.stats costs ~1 s to import

    return float(norm.cdf(diff * math.sqrt(n - 1) / math.sqrt(den)))


def expected_max_sharpe(n_trials: int, var_sr: float) -> float:
    """Expected maximum of ``n_trials`` Sharpe ratio estimates whose true value is 0 (the null),
    when the estimates have variance ``var_sr`` across trials (Bailey & López de Prado 2014,
    "The Deflated Sharpe Ratio", from the extreme-value approximation of the max of normals):

        E[max SR] = sqrt(V) * ( (1 - gamma) * Phi^-1(1 - 1/N) + gamma * Phi^-1(1 - 1/(N e)) )

    gamma = Euler-Mascheroni, e = Euler's number. One trial (or none) has nothing to select from:
    0. Same units as the Sharpe ratios V was measured on (per period, here).
    """
    if n_trials is None or n_trials <= 1 or var_sr is None or not var_sr > 0:
        return 0.0
    n = float(n_trials)
    from scipy.stats import norm

    z = (1.0 - EULER_GAMMA) * norm.ppf(1.0 - 1.0 / n) + EULER_GAMMA * norm.ppf(1.0 - 1.0 / (n * math.e))
    return float(math.sqrt(var_sr) * z)


def deflated_sharpe(sr: float, n: int, skew: float, kurt: float, n_trials: int, var_sr: float,
                    benchmark_sr: float = 0.0) -> Optional[float]:
    """Deflated Sharpe Ratio: ``PSR(SR0)`` with ``SR0 = max(benchmark_sr, E[max SR])`` -- the
    observed (per-period) ``sr`` must beat both the benchmark (e.g. production's Sharpe over the
    same minutes) and what the best of ``n_trials`` skill-less trials would show by luck."""
    sr0 = max(benchmark_sr, expected_max_sharpe(n_trials, var_sr))
    return psr(sr, sr0, n, skew, kurt)


def psr_from_returns(returns: Sequence[float], sr_star: float = 0.0) -> Optional[float]:
    """PSR of a return series against a per-period benchmark ``sr_star`` (batch form)."""
    r = np.asarray(returns, dtype=float)
    sr = sharpe(r)
    if sr is None:
        return None
    s, k = moments(r)
    return psr(sr, sr_star, r.size, s, k)


# --------------------------------------------------------------------------------------------
# the mean of a dependent series
# --------------------------------------------------------------------------------------------

def hac_se(x: Sequence[float], lags: int) -> Optional[float]:
    """Standard error of the mean of a serially dependent series: Newey & West (1987), Bartlett
    weights ``1 - l / (lags + 1)``, ``sqrt(LRV / n)`` with
    ``LRV = g_0 + 2 sum_{l=1..lags} w_l g_l`` and ``g_l = sum_t (x_t - m)(x_{t-l} - m) / n``.
    Overlapping labels (a horizon of h bars) or persistent positions make neighbours correlated,
    which the i.i.d. formula ``sd / sqrt(n)`` ignores (too small a standard error, too many false
    discoveries). None for fewer than two values.

    >>> round(hac_se([1.0, -1.0, 1.0, -1.0], 0), 6)     # lags 0: the i.i.d. formula with ddof 0
    0.5
    """
    v = np.asarray(x, dtype=float)
    n = v.size
    if n < 2:
        return None
    d = v - v.mean()
    lrv = float(d @ d) / n
    for lag in range(1, min(int(lags), n - 1) + 1):
        lrv += 2.0 * (1.0 - lag / (lags + 1.0)) * float(d[lag:] @ d[:-lag]) / n
    return math.sqrt(max(lrv, 0.0) / n)


def newey_west_lags(n: int) -> int:
    """The Newey & West (1994) rule of thumb for the Bartlett kernel: floor(4 (n / 100)^(2/9))."""
    return int(4 * (max(n, 1) / 100.0) ** (2.0 / 9.0))


@dataclass(frozen=True)
class SharpeDiff:
    """The paired test of two Sharpe ratios on the same periods (``sharpe_difference_test``)."""

    n: int            # paired returns
    sr_a: float       # per-period Sharpe ratios (population sd)
    sr_b: float
    diff: float       # sr_a - sr_b
    se: float         # HAC standard error of diff
    z: float
    p: float          # one-sided p-value of "sr_a > sr_b" (H0: sr_a <= sr_b), Student t with ``df``
    lags: int
    df: float


def sharpe_difference_test(a: Sequence[float], b: Sequence[float], lags: Optional[int] = None) -> Optional[SharpeDiff]:
    """Ledoit & Wolf (2008), "Robust performance hypothesis testing with the Sharpe ratio", Journal
    of Empirical Finance 15(5), 850-859, section 3.1: the HAC inference for the difference of the
    Sharpe ratios of two strategies whose returns ``a`` and ``b`` are observed over the SAME periods.

    With u = (mean a, mean b, mean a^2, mean b^2) and f(u) = SR_a - SR_b, the delta method gives
    se(f) = sqrt(grad' Psi grad / n), Psi the long-run covariance of the moment vector
    (a - mean a, b - mean b, a^2 - mean a^2, b^2 - mean b^2), estimated here with the Bartlett kernel
    (Newey-West; ``lags`` default ``newey_west_lags(n)``) rather than the paper's prewhitened QS
    kernel. The pairing matters: two strategies trading the same market share most of their noise,
    which the difference cancels; the kernel handles autocorrelation and volatility clustering,
    the fourth moments fat tails. None with fewer than 3 pairs or a constant series.

    Small samples: LW (section 4) find the HAC test liberal, and so it was here, in the far tail
    where a deflated gate lives: on 288 paired 5m returns of strategies exposed to a t(5) GARCH
    market (kurtosis ~12), 5,000 null draws rejected 0.34% of the time at the 0.16% level. The
    p-value is therefore read from a Student t with df = n / (2 (lags + 1)) (the number of roughly
    independent blocks the long-run variance is estimated from): 5.5%, 0.9% and 0.14% at the 5%,
    1% and 0.16% levels on the same draws. (LW's own remedy, a studentized block bootstrap, costs a
    thousand resamples per test.)

    >>> t = sharpe_difference_test([0.01, 0.02, -0.01, 0.03, 0.0, 0.02], [0.0, 0.01, -0.01, 0.0, -0.01, 0.01], 0)
    >>> round(float(t.diff), 4), t.p < 0.5
    (0.8682, True)
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"sharpe_difference_test needs two series of the same length, got {x.shape} and {y.shape}")
    n = x.size
    if n < 3:
        return None
    ma, mb, ga, gb = x.mean(), y.mean(), (x * x).mean(), (y * y).mean()
    va, vb = ga - ma * ma, gb - mb * mb
    if not (va > 1e-30 and vb > 1e-30):
        return None
    sa, sb = ma / math.sqrt(va), mb / math.sqrt(vb)
    grad = np.array([ga / va ** 1.5, -gb / vb ** 1.5, -ma / (2 * va ** 1.5), mb / (2 * vb ** 1.5)])
    u = np.column_stack([x - ma, y - mb, x * x - ga, y * y - gb])
    L = newey_west_lags(n) if lags is None else int(lags)
    psi = u.T @ u / n
    for lag in range(1, min(L, n - 1) + 1):
        g = u[lag:].T @ u[:-lag] / n
        psi += (1.0 - lag / (L + 1.0)) * (g + g.T)
    var = float(grad @ psi @ grad) / n
    if not var > 0:
        return None
    se = math.sqrt(var)
    from scipy.stats import t as student

    z = (sa - sb) / se
    df = max(n / (2.0 * (L + 1)), 2.0)
    return SharpeDiff(n=n, sr_a=float(sa), sr_b=float(sb), diff=float(sa - sb), se=se, z=float(z),
                      p=float(student.sf(z, df)), lags=L, df=df)


def trial_weight(k: int, batch: int) -> float:
    """The share of a family-wise error budget alpha that the k-th trial (1-based) of a search
    running ``batch`` trials at a time may spend: 1 / (2 batch) for the first batch, half that for
    the next, and so on. The weights sum to 1 over an unbounded run, so testing trial k at level
    alpha * w_k keeps the chance that ANY skill-less trial passes, ever, below alpha (weighted
    Bonferroni, by Boole's inequality; Holm 1979 for weights, Foster & Stine 2008 "alpha-investing"
    for spending over a sequence of tests). Later trials pay for the search that came before them.

    >>> [trial_weight(k, 2) for k in (1, 2, 3, 4, 5)]
    [0.25, 0.25, 0.125, 0.125, 0.0625]
    """
    if k < 1 or batch < 1:
        raise ValueError(f"trial_weight: k and batch must be >= 1, got {k}, {batch}")
    return 0.5 ** ((k - 1) // batch + 1) / batch


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


def log_loss(probs, labels, eps: float = 1e-15) -> Optional[float]:
    """Multiclass log loss ``-mean_i log(p_i,y_i)`` with probabilities clipped to [eps, 1]
    (natural log). None for n = 0."""
    p, y = _probs_labels(probs, labels)
    if y.size == 0:
        return None
    py = np.clip(p[np.arange(y.size), y], eps, 1.0)
    return float(-np.mean(np.log(py)))


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
        sd = self.std()
        if sd is None or not sd > 1e-15:
            return None
        return self.mean / sd * math.sqrt(periods_per_year)

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
