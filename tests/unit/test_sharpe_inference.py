"""operators.sharpe_inference: the published Deflated Sharpe Ratio example, Monte Carlo checks of
what PSR and E[max SR] claim, the paired Sharpe-difference test's level and the search's error budget."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from operators.sharpe_inference import (deflated_sharpe, expected_max_sharpe, psr, psr_from_returns,
                                        sharpe_difference_test, trial_weight)


# ---------------------------------------------------------------- PSR / DSR
def test_psr_by_hand_and_its_shape():
    # normal returns (skew 0, kurt 3), SR 0.1, n 101: Phi(0.1 * 10 / sqrt(1 + 0.5 * 0.01))
    assert psr(0.1, 0.0, 101) == pytest.approx(sps.norm.cdf(1.0 / math.sqrt(1.005)))
    assert psr(0.2, 0.2, 50, -1.0, 6.0) == pytest.approx(0.5)
    assert psr(0.1, 0.0, 1001) > psr(0.1, 0.0, 101)                # more evidence, more confidence
    assert psr(0.1, 0.0, 101, skew=-2.0, kurt=9.0) < psr(0.1, 0.0, 101)   # left tail hurts
    assert psr(0.1, 0.0, 1) is None
    # from returns: the same numbers as assembling the formula by hand
    r = np.random.default_rng(6).normal(0.05, 1.0, 300)
    sr = r.mean() / r.std(ddof=1)
    g3, g4 = sps.skew(r), sps.kurtosis(r, fisher=False)
    z = (sr - 0.02) * math.sqrt(299) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr ** 2)
    assert psr_from_returns(r, 0.02) == pytest.approx(sps.norm.cdf(z))


def test_psr_is_calibrated_under_the_null_monte_carlo():
    """True SR = 0: PSR(0) >= 0.95 should happen about 5% of the time."""
    rng = np.random.default_rng(7)
    hits = sum(psr_from_returns(rng.normal(0.0, 1.0, 400)) >= 0.95 for _ in range(2000))
    assert 0.035 <= hits / 2000 <= 0.065


def test_expected_max_sharpe_against_a_simulation_and_trivial_cases():
    assert expected_max_sharpe(1, 0.5) == 0.0 and expected_max_sharpe(10, 0.0) == 0.0
    # E[max of N standard normals]: N=100 -> 2.5076 exactly; the approximation is within 1%
    z100 = expected_max_sharpe(100, 1.0)
    assert z100 == pytest.approx(2.5305, abs=1e-3) and abs(z100 / 2.5076 - 1) < 0.01
    rng = np.random.default_rng(8)
    for n, v in ((10, 0.04), (100, 0.01), (1000, 0.0025)):
        sim = rng.normal(0.0, math.sqrt(v), (4000, n)).max(axis=1).mean()
        assert expected_max_sharpe(n, v) == pytest.approx(sim, rel=0.03)
    assert expected_max_sharpe(200, 0.01) > expected_max_sharpe(20, 0.01)


def test_published_deflated_sharpe_example_bailey_lopez_de_prado_2014():
    """The DSR paper's numerical example: N = 100 trials, V[SR] = 0.5 annualised, best SR 2.5
    annualised over T = 1250 daily returns with skew -3 and kurtosis 10 -> SR0 = 0.1132 (daily)
    and DSR = 0.9004."""
    var_daily = 0.5 / 250
    sr0 = expected_max_sharpe(100, var_daily)
    assert sr0 == pytest.approx(0.1132, abs=1e-4)
    sr = 2.5 / math.sqrt(250)
    dsr = deflated_sharpe(sr, 1250, -3.0, 10.0, n_trials=100, var_sr=var_daily)
    assert dsr == pytest.approx(0.9004, abs=5e-4)
    # a benchmark above E[max] takes over
    assert deflated_sharpe(sr, 1250, -3.0, 10.0, 100, var_daily, benchmark_sr=0.15) == pytest.approx(
        psr(sr, 0.15, 1250, -3.0, 10.0))
    # one trial: no deflation, PSR against the benchmark
    assert deflated_sharpe(sr, 1250, -3.0, 10.0, 1, var_daily) == pytest.approx(psr(sr, 0.0, 1250, -3.0, 10.0))


# -- the paired Sharpe-difference test and the search's error budget (issue 12) -------------------

def _paired_market(n, rng, edge=0.0, follow=False):
    """Per-bar returns of two strategies on one fat-tailed, clustered market (GARCH(1,1), t(5)
    shocks): positions held for a while (Markov), the second follows the first 2/3 of the time
    (``follow``: always); ``edge``: on that share of bars the second holds the sign of the coming move."""
    e = rng.standard_t(5, n) / np.sqrt(5 / 3)
    h, m = np.ones(n), np.empty(n)
    for t in range(n):
        if t:
            h[t] = 0.05 + 0.10 * m[t - 1] ** 2 + 0.85 * h[t - 1]
        m[t] = np.sqrt(h[t]) * e[t]

    def chain(stay=0.8):
        out, cur = np.empty(n), 0.0
        for t in range(n):
            if rng.random() > stay:
                cur = float(rng.choice([-1.0, 0.0, 1.0]))
            out[t] = cur
        return out

    a = chain()
    b = a.copy() if follow else np.where(chain(0.97) != 0, a, chain())
    b = np.where(rng.random(n) < edge, np.sign(m), b)
    return b * m * 0.002, a * m * 0.002


def test_sharpe_difference_test_holds_its_level_on_fat_tailed_clustered_pairs_and_finds_an_edge():
    rng = np.random.default_rng(5)
    tests = [sharpe_difference_test(*_paired_market(288, rng)) for _ in range(600)]
    p = np.array([t.p for t in tests if t is not None])  # None: the two held the same positions all day
    assert len(p) > 550
    assert 0.03 < np.mean(p < 0.05) < 0.08  # a day of 5m bars, no edge: the stated 5%
    assert np.mean(p < 0.01) < 0.025
    found = [sharpe_difference_test(*_paired_market(288, rng, edge=0.15, follow=True)).p for _ in range(50)]
    assert np.mean(np.array(found) < 0.05 / 32) > 0.8  # production + a better rule: the deflated level
    t = sharpe_difference_test([0.01, 0.02, -0.01, 0.03], [0.01, 0.02, -0.01, 0.03])
    assert t is None  # identical strategies: nothing to test
    with pytest.raises(ValueError, match="same length"):
        sharpe_difference_test([0.1, 0.2, 0.3], [0.1, 0.2])


def test_trial_weights_spend_the_budget_once_over_an_unbounded_search():
    w = [trial_weight(k, 16) for k in range(1, 16 * 40 + 1)]
    assert w[0] == w[15] == 1 / 32 and w[16] == 1 / 64
    assert sum(w) == pytest.approx(1.0, abs=1e-9) and sum(w) < 1.0
    with pytest.raises(ValueError):
        trial_weight(0, 16)
