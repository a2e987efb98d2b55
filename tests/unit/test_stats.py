"""operators.stats: hand-checkable numbers and independent numpy / scipy computations of every
statistic, the streaming accumulators against the batch functions, and the one Sharpe ratio."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from operators import stats as S


# ---------------------------------------------------------------- returns, Sharpe, Sortino, drawdown
def test_simple_returns_by_hand_and_non_positive_previous_equity_is_skipped():
    assert S.simple_returns([100.0, 110.0, 99.0]) == pytest.approx([0.1, -0.1])
    assert S.simple_returns([100.0, 0.0, 50.0]).tolist() == [-1.0]          # 0 -> 50 has no return
    assert S.simple_returns([100.0]).size == 0 and S.simple_returns([]).size == 0


def test_sharpe_by_hand_annualised_and_undefined_cases():
    # mean 0.02, sd (ddof=1) = sqrt(((-0.01)^2 + 0.01^2) / 1) = 0.0141421
    assert S.sharpe([0.01, 0.03]) == pytest.approx(0.02 / math.sqrt(2e-4))
    assert S.sharpe([0.01, 0.03], periods_per_year=525_600) == pytest.approx(math.sqrt(2) * math.sqrt(525_600))
    assert S.sharpe([0.01]) is None and S.sharpe([0.01, 0.01, 0.01]) is None and S.sharpe([]) is None
    r = np.random.default_rng(1).normal(0.001, 0.01, 500)
    assert S.sharpe(r, 252) == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(252))


def test_one_sharpe_the_sequence_form_is_the_moments_form():
    r = np.random.default_rng(4).normal(2e-4, 1e-3, 500)
    assert S.sharpe(r, 525_600) == S.sharpe_from_moments(r.size, float(r.mean()), float(r.var(ddof=1)), 525_600)
    assert S.sharpe_from_moments(2, 0.02, 2e-4) == pytest.approx(0.02 / math.sqrt(2e-4))
    assert S.sharpe_from_moments(1, 0.02, 1e-4) is None and S.sharpe_from_moments(5, 0.02, 0.0) is None


def test_sortino_uses_downside_deviation_over_all_returns_relative_to_zero():
    # returns 0.02 -0.01 0.02 -0.01: mean 0.005, DD = sqrt((0 + 1e-4 + 0 + 1e-4) / 4) = 0.0070711
    assert S.downside_deviation([0.02, -0.01, 0.02, -0.01]) == pytest.approx(math.sqrt(5e-5))
    assert S.sortino([0.02, -0.01, 0.02, -0.01]) == pytest.approx(0.005 / math.sqrt(5e-5))
    assert S.sortino([0.02, -0.01, 0.02, -0.01], 4) == pytest.approx(2 * 0.005 / math.sqrt(5e-5))
    assert S.sortino([0.01, 0.02, 0.03]) is None            # nothing below the target
    r = np.random.default_rng(2).normal(0.0005, 0.01, 400)
    independent = r.mean() / math.sqrt(np.mean(np.minimum(r, 0.0) ** 2)) * math.sqrt(525_600)
    assert S.sortino(r, 525_600) == pytest.approx(independent)
    # with a skewed series Sortino and Sharpe differ in the expected direction
    pos_skew = np.concatenate([np.full(90, -0.001), np.full(10, 0.02)])
    assert S.sortino(pos_skew) > S.sharpe(pos_skew)


def test_max_drawdown_by_hand_and_with_a_starting_peak():
    assert S.max_drawdown([100, 120, 90, 130, 117]) == pytest.approx(0.25)         # 120 -> 90
    assert S.max_drawdown([100, 101, 102]) == 0.0 and S.max_drawdown([]) == 0.0
    assert S.max_drawdown([95, 97]) == 0.0
    assert S.max_drawdown([95, 97], start_peak=100) == pytest.approx(0.05)         # lost from the start
    e = 100 * np.cumprod(1 + np.random.default_rng(3).normal(0, 0.02, 300))
    brute = max((max(e[: i + 1]) - e[i]) / max(e[: i + 1]) for i in range(len(e)))
    assert S.max_drawdown(e) == pytest.approx(brute)


# ---------------------------------------------------------------- trades, flips, latency
def test_trade_statistics_by_hand():
    pnls = [100.0, -50.0, 150.0]
    assert S.profit_factor(pnls) == pytest.approx(5.0)
    assert S.win_rate(pnls) == pytest.approx(2 / 3)
    assert S.avg_pnl(pnls) == pytest.approx(200 / 3)
    assert S.profit_factor([10.0, 5.0]) is None and S.profit_factor([]) is None     # no loss: undefined
    assert S.profit_factor([-1.0]) == 0.0
    assert S.win_rate([0.0, 1.0]) == 0.5                                             # zero is not a win
    assert S.win_rate([]) is None and S.avg_pnl([]) is None


def test_flip_rate_ignores_decisions_without_a_signal():
    assert S.flip_rate([1, 0, 1, -1, -1, 0, 1]) == pytest.approx(0.5)      # 1 1 -1 -1 1: 2 of 4
    assert S.flip_rate([1, -1, 1, -1]) == 1.0 and S.flip_rate([-1, 0, 0, -1]) == 0.0
    assert S.flip_rate([1, 0, 0]) is None and S.flip_rate([]) is None


def test_latency_percentiles_match_numpy_linear_interpolation():
    lat = [5.0, 10.0, 15.0, 20.0]
    p50, p99 = S.latency_percentiles(lat)
    assert p50 == pytest.approx(12.5) and p99 == pytest.approx(15 + 0.97 * 5)   # rank 2.97
    x = np.random.default_rng(4).exponential(3.0, 1000)
    assert S.latency_percentiles(x, (50, 95, 99)) == pytest.approx(np.percentile(x, [50, 95, 99]).tolist())
    assert S.latency_percentiles([]) == [None, None]


# ---------------------------------------------------------------- higher moments
def test_moments_are_scipys_biased_skewness_and_non_excess_kurtosis():
    r = np.random.default_rng(5).lognormal(0, 0.5, 2000)
    skew, kurt = S.moments(r)
    assert skew == pytest.approx(sps.skew(r, bias=True))
    assert kurt == pytest.approx(sps.kurtosis(r, fisher=False, bias=True))
    assert skew > 1 and kurt > 3                         # lognormal: right-skewed, fat tails
    assert kurt >= 1 + skew ** 2                          # keeps PSR's variance term positive
    assert S.moments([1.0]) == (0.0, 3.0)


# ---------------------------------------------------------------- probability scores
def test_brier_and_log_loss_by_hand_and_multiclass():
    p = [[0.2, 0.8], [0.6, 0.4]]
    assert S.brier_score(p, [1, 0]) == pytest.approx((0.04 + 0.04 + 0.16 + 0.16) / 2)
    assert S.log_loss(p, [1, 0]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    rng = np.random.default_rng(9)
    q = rng.dirichlet([1, 1, 1], 50)
    y = rng.integers(0, 3, 50)
    brier = np.mean([sum((q[i, k] - (y[i] == k)) ** 2 for k in range(3)) for i in range(50)])
    assert S.brier_score(q, y) == pytest.approx(brier)
    assert S.log_loss(q, y) == pytest.approx(-np.mean([math.log(q[i, y[i]]) for i in range(50)]))
    assert S.brier_score([[0, 0, 1]], [2]) == 0.0 and S.brier_score([[1, 0, 0]], [2]) == 2.0
    assert S.log_loss([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-15))      # clipped, finite
    assert S.brier_score(np.empty((0, 3)), []) is None
    with pytest.raises(ValueError, match="labels"):
        S.brier_score([[0.5, 0.5]], [2])
    with pytest.raises(ValueError, match=r"\(n, K\)"):
        S.log_loss([0.5, 0.5], [0, 1])


def test_log_losses_are_the_rows_of_log_loss():
    """The deployment gate's paired tests compare per-row losses; their mean is ``log_loss``."""
    p = [[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]]
    rows = S.log_losses(p, [1, 0, 1])
    assert rows.tolist() == pytest.approx([-math.log(0.8), -math.log(0.6), -math.log(1e-15)])
    assert S.log_loss(p, [1, 0, 1]) == pytest.approx(rows.mean())
    assert S.log_losses(np.empty((0, 3)), []).size == 0 and S.log_loss(np.empty((0, 3)), []) is None


# ---------------------------------------------------------------- streaming accumulators
def test_return_stats_stream_equals_the_batch_functions():
    r = np.random.default_rng(10).standard_t(4, 3000) * 1e-3 + 1e-4
    acc = S.ReturnStats()
    for x in r:
        acc.push(float(x))
    assert acc.n == 3000 and acc.mean == pytest.approx(r.mean())
    assert acc.sharpe(525_600) == pytest.approx(S.sharpe(r, 525_600), rel=1e-9)
    assert acc.sortino(525_600) == pytest.approx(S.sortino(r, 525_600), rel=1e-9)
    skew, kurt = acc.moments()
    assert skew == pytest.approx(sps.skew(r), rel=1e-7) and kurt == pytest.approx(sps.kurtosis(r, fisher=False), rel=1e-9)
    more = acc.plus(0.01)
    assert acc.n == 3000 and more.n == 3001                                    # plus() copies
    assert more.sharpe() == pytest.approx(S.sharpe(np.append(r, 0.01)), rel=1e-9)
    empty = S.ReturnStats()
    assert empty.sharpe() is None and empty.sortino() is None and empty.moments() == (0.0, 3.0)


def test_trade_stats_stream_equals_the_batch_functions():
    pnls = [100.0, -50.0, 0.0, 150.0, -25.0]
    t = S.TradeStats()
    for p in pnls:
        t.push(p)
    assert (t.trades, t.wins) == (5, 2)
    assert t.win_rate() == S.win_rate(pnls) and t.avg_pnl() == pytest.approx(S.avg_pnl(pnls))
    assert t.profit_factor() == pytest.approx(S.profit_factor(pnls)) == pytest.approx(250 / 75)
    assert S.TradeStats().win_rate() is None and S.TradeStats().profit_factor() is None
