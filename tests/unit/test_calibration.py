"""Calibration (models/calibration.py): vector scaling fixes a mis-scaled model and turns a
skill-less one into the class prior, the classwise ECE and reliability curve by hand, cross-fitting
never calibrates a row with a map that saw it, River's rolling calibrator uses matured labels only,
and the Newey-West standard error (operators/stats.py) the gates test with."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.calibration import (
    RIDGE, RollingCalibrator, VectorScaling, classwise_ece, cross_fitted, fit_vector_scaling, reliability,
)
from operators.stats import log_loss
from operators.sharpe_inference import hac_se


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def true_model(n, seed):
    """Probabilities that ARE calibrated (labels drawn from them) and their labels."""
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(size=(n, 3)) * 0.8 + np.array([0.2, -0.3, 0.1]))
    y = np.array([rng.choice(3, p=row) for row in p])
    return p, y


def test_an_over_confident_model_is_shrunk_back_and_gains():
    p, y = true_model(4000, 1)
    over = softmax(2.5 * np.log(p))  # the same ranking, far too sure
    fit, check = slice(0, 2000), slice(2000, None)
    m = fit_vector_scaling(over[fit], y[fit])
    assert 0.3 < m.a < 0.5  # ~1 / 2.5
    assert m.rows == 2000 and m.b[1] == 0.0
    fixed = m.apply(over[check])
    assert log_loss(fixed, y[check]) < log_loss(over[check], y[check]) - 0.1
    assert log_loss(fixed, y[check]) == pytest.approx(log_loss(p[check], y[check]), abs=0.01)
    assert classwise_ece(fixed, y[check]) < 0.03 < 0.1 < classwise_ece(over[check], y[check])
    # one row at a time gives the batch numbers (the pipeline's path)
    assert np.allclose([m.apply_one(r) for r in over[check][:20]], fixed[:20], atol=1e-12)


def test_a_model_without_skill_becomes_the_class_prior():
    rng = np.random.default_rng(2)
    y = rng.choice(3, size=3000, p=[0.3, 0.2, 0.5])
    noise = softmax(rng.normal(size=(3000, 3)) * 1.5)  # confident and unrelated to y
    m = fit_vector_scaling(noise, y)
    assert m.a < 0.05
    q = m.apply(noise)
    assert np.allclose(q.mean(axis=0), [0.3, 0.2, 0.5], atol=0.02)
    prior = np.bincount(y, minlength=3) / len(y)
    assert log_loss(q, y) == pytest.approx(-np.mean(np.log(prior[y])), abs=0.005)


def test_ridge_shrinks_the_map_toward_the_raw_output():
    p, y = true_model(300, 3)
    over = softmax(2.0 * np.log(p))
    free, shrunk = fit_vector_scaling(over, y), fit_vector_scaling(over, y, ridge=0.5)
    assert free.a < shrunk.a < 1.0
    assert VectorScaling().apply(over) == pytest.approx(over)  # identity map


def test_classwise_ece_and_reliability_by_hand():
    probs = np.array([[0.05, 0.15, 0.8], [0.05, 0.15, 0.8], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    y = np.array([2, 0, 0, 0])
    curve = {(r["cls"], r["bin"]): r for r in reliability(probs, y)}
    assert curve[(2, 8)] == {"cls": 2, "bin": 8, "n": 2, "predicted": pytest.approx(0.8), "observed": 0.5}
    assert curve[(0, 6)]["observed"] == 1.0 and curve[(0, 0)]["observed"] == 0.5
    # class 0: bins 0 (p .05, hit 1/2) and 6 (p .6, hit 2/2): (2 * .45 + 2 * .4) / 4
    # class 1: bins 1 (p .15, 0/2) and 3 (p .3, 0/2): (2 * .15 + 2 * .3) / 4
    # class 2: bins 8 (p .8, 1/2) and 1 (p .1, 0/2): (2 * .3 + 2 * .1) / 4
    expected = ((0.9 + 0.8) / 4 + (0.3 + 0.6) / 4 + (0.6 + 0.2) / 4) / 3
    assert classwise_ece(probs, y) == pytest.approx(expected)
    assert classwise_ece(np.empty((0, 3)), np.empty(0, dtype=int)) is None


def test_a_calibrated_model_has_a_small_ece_on_a_finite_sample():
    p, y = true_model(850, 4)  # the size of the main job's scored half
    assert classwise_ece(p, y) < 0.04


def test_cross_fitting_never_calibrates_a_row_with_a_map_that_saw_it():
    """Each half says the opposite of what happens in it: a map fitted on the row's own half would
    learn it (and look perfect); cross-fitted, it is learned from the other half and fails."""
    n = 200
    t = np.repeat(np.arange(n // 2), 2)  # two instruments per time step
    y = np.where(t < n // 4, 0, 2)
    probs = np.tile([0.2, 0.2, 0.6], (n, 1))
    probs[t >= n // 4] = [0.6, 0.2, 0.2]  # confidently wrong in both halves
    in_sample = np.concatenate([fit_vector_scaling(probs[t < 50], y[t < 50]).apply(probs[t < 50]),
                                fit_vector_scaling(probs[t >= 50], y[t >= 50]).apply(probs[t >= 50])])
    crossed = cross_fitted(probs, y, t)
    assert log_loss(in_sample, y) < 0.05
    assert log_loss(crossed, y) > log_loss(probs, y) > 1.0
    with pytest.raises(ValueError, match="two time steps"):
        cross_fitted(probs[:2], y[:2], t[:2])


def test_rolling_calibrator_waits_for_matured_labels_and_refits_on_schedule():
    p, y = true_model(400, 5)
    over = softmax(3.0 * np.log(p))
    cal = RollingCalibrator(window=100, min_labels=30, refit_every=10)
    for i in range(29):
        cal.add(over[i], y[i])
    assert cal.map is None and cal.apply(over[0]) == pytest.approx(over[0])  # the prior: the identity
    cal.add(over[29], y[29])
    first = cal.map
    assert first is not None and first.rows == 30 and cal.apply(over[0]) is not None
    for i in range(30, 39):
        cal.add(over[i], y[i])
    assert cal.map is first  # 9 more: not yet refitted
    cal.add(over[39], y[39])
    assert cal.map is not first and cal.map.rows == 40
    for i in range(40, 400):
        cal.add(over[i], y[i])
    assert cal.map.rows == 100 and len(cal.labels) == 100  # the window
    assert cal.map.a < 0.6  # it learned the model is over-confident
    with pytest.raises(ValueError, match="window >= min_labels"):
        RollingCalibrator(window=10, min_labels=20)


def ar1(n, phi, seed):
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    e = rng.standard_t(4, size=n)  # fat tails
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x


def test_hac_se_widens_for_autocorrelated_series_and_is_iid_at_lag_zero():
    x = ar1(4000, 0.6, 1)
    iid = x.std() / math.sqrt(len(x))
    assert hac_se(x, 0) == pytest.approx(iid)
    # long-run sd of an AR(1) is sd * sqrt((1 + phi) / (1 - phi)) = 2x for phi = 0.6
    assert 1.6 < hac_se(x, 20) / iid < 2.2
    assert hac_se([1.0], 3) is None
    # coverage on fat-tailed AR(1) means: |mean| / se beyond 1.96 about 5% of the time (not ~30%)
    z = [abs(s.mean()) / hac_se(s, 10) for s in (ar1(500, 0.5, k) for k in range(200))]
    naive = [abs(s.mean()) / (s.std() / math.sqrt(len(s))) for s in (ar1(500, 0.5, k) for k in range(200))]
    assert np.mean(np.array(z) > 1.96) < 0.12
    assert np.mean(np.array(naive) > 1.96) > 0.2


def _problems():
    """(name, probs, labels, ridge): maps inside the bounds, and ones held by a bound."""
    p, y = true_model(600, 11)
    rng = np.random.default_rng(12)
    noise_y = rng.choice(3, size=800, p=[0.3, 0.2, 0.5])
    noise = softmax(rng.normal(size=(800, 3)) * 1.5)
    return [("over-confident", softmax(2.5 * np.log(p)), y, RIDGE),
            ("under-confident, slope held at MAX_SLOPE", softmax(0.1 * np.log(p)), y, 0.0),
            ("no skill", noise, noise_y, RIDGE),
            ("reversed, slope held at 0", softmax(-1.0 * np.log(p)), y, RIDGE),
            ("strong prior", softmax(2.0 * np.log(p[:40])), y[:40], 25.0 / 40),
            ("one class only, biases held at -10", p[:30], np.full(30, 2), 0.0),
            ("few rows", p[:12], y[:12], 0.0)]


PROBLEMS = _problems()


@pytest.mark.parametrize("name, probs, labels, ridge", PROBLEMS, ids=[x[0] for x in PROBLEMS])
def test_the_fit_matches_scipys_bounded_optimizer(name, probs, labels, ridge):
    """The projected Newton fit (written out so the dataflow never imports SciPy's optimizer) finds
    the optimum SciPy's L-BFGS-B finds, inside the bounds and on them."""
    from scipy.optimize import minimize

    from models.calibration import BOUNDS, EPS, _nll

    logp = np.log(np.clip(probs, EPS, 1.0))
    ref = minimize(lambda t: _nll(t, logp, labels, ridge)[:2], np.array([1.0, 0.0, 0.0]), jac=True,
                   method="L-BFGS-B", bounds=list(zip(*BOUNDS)), options={"ftol": 1e-15, "gtol": 1e-12})
    m = fit_vector_scaling(probs, labels, ridge=ridge)
    ours = np.array([m.a, m.b[0], m.b[2]])
    assert _nll(ours, logp, labels, ridge)[0] <= ref.fun + 1e-9, name
    assert np.allclose(ours, ref.x, atol=1e-4), (name, ours, ref.x)
    if "held" in name:
        assert np.any(np.isclose(ours, BOUNDS[0]) | np.isclose(ours, BOUNDS[1])), name


def test_the_hessian_is_the_gradients_derivative():
    from models.calibration import _nll

    p, y = true_model(200, 13)
    logp = np.log(p)
    theta, h = np.array([0.7, 0.3, -0.2]), 1e-6
    _, _, hess = _nll(theta, logp, y, 0.01, hessian=True)
    numeric = np.array([(_nll(theta + h * e, logp, y, 0.01)[1] - _nll(theta - h * e, logp, y, 0.01)[1]) / (2 * h)
                        for e in np.eye(3)])
    assert np.allclose(hess, numeric, atol=1e-6)


def test_the_rolling_calibrator_refits_without_importing_scipy():
    """River's calibrators refit in the dataflow every 10 labels: importing SciPy's optimizer there
    cost 21 MB resident and stalled the worker 0.4 s (a fresh interpreter: this one has SciPy)."""
    import subprocess
    import sys

    code = ("import sys, random\n"
            "from models.calibration import RollingCalibrator\n"
            "c, r = RollingCalibrator(window=50, min_labels=10, refit_every=10), random.Random(1)\n"
            "for i in range(40):\n"
            "    p = r.random(); c.add((p / 2, 0.5 - p / 2, 0.5), int(p > 0.5) * 2)\n"
            "print(c.map is not None and c.map.rows == 40, 'scipy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
