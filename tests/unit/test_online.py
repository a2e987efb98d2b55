"""Online River models: predict at bar close, learn on delayed labels, rolling metrics.

Streams here are synthetic: class y drawn from PRIOR, feature ``sig`` = y - 1 (+ small noise) on
80% of bars and a random class's value otherwise, the rest pure noise. The label of bar i is fed
``H`` bars later, right after row i + H is predicted (delayed labels, as in the pipeline).
"""

from __future__ import annotations

import copy
import math
import pickle
import random

import numpy as np
import pytest

from models.online import (
    ARF, CLASSES, LR, SHARE_RNGS_EVERY, VERSION, FillScaled, OnlineConfig, OnlineModels, present, score,
    share_distribution_rngs,
)
from operators.features import AlignedRow, aligned_feature_names
from operators.feature_catalog import FEATURE_NAMES
from operators.perp import NAMES as PERP_NAMES
from operators.labels import Label

H = 3
M5 = 300_000
T0 = 1_704_067_200_000
PRIOR = (0.3, 0.4, 0.3)  # down, flat, up: the majority class (flat) is right 40% of the time


def row(i: int, features: dict) -> AlignedRow:
    return AlignedRow(exchange="x", symbol="A/USDT:USDT", tf="5m", start=T0 + i * M5,
                      end=T0 + (i + 1) * M5, close=100.0, warm=True, regime="RANGING",
                      features=features, overlay_ok={})


def label(i: int, y: int) -> Label:
    return Label(exchange="x", symbol="A/USDT:USDT", tf="5m", start=T0 + i * M5,
                 end=T0 + (i + 1) * M5, horizon=H, fwd_ret=0.0, band=0.001, label=y,
                 matured_at=T0 + (i + H + 1) * M5)


def stream(n: int, seed: int, signal: bool, n_noise: int = 9, reliability: float = 0.8,
           names: list[str] | None = None):
    """(rows, labels). With ``names`` the features get those keys (the first one is the signal)."""
    rng = random.Random(seed)
    keys = names or ["sig"] + [f"noise_{k}" for k in range(n_noise)]
    rows, ys = [], []
    for i in range(n):
        y = rng.choices(CLASSES, PRIOR)[0]
        f = {k: rng.gauss(0.0, 1.0) for k in keys[1:]}
        if not signal:
            f[keys[0]] = rng.gauss(0.0, 1.0)
        elif rng.random() < reliability:
            f[keys[0]] = (y - 1) + rng.gauss(0.0, 0.3)
        else:
            f[keys[0]] = rng.choice((-1, 0, 1)) + rng.gauss(0.0, 0.3)
        rows.append(row(i, f))
        ys.append(y)
    return rows, [label(i, y) for i, y in enumerate(ys)]


def drive(m: OnlineModels, rows, labels, first: int = 0) -> list[dict]:
    """Predict rows[first:], learning the label of bar i - H after predicting row i."""
    out = []
    for i in range(first, len(rows)):
        out.append(m.predict(rows[i]))
        if i >= H:
            m.learn(labels[i - H])
    return out


# -- (1) acceptance: a planted signal is learned, pure noise is not ---------------------------------

def run_acceptance(signal: bool) -> tuple[dict, float]:
    n, window = 2500, 1000
    rows, labels = stream(n, seed=7, signal=signal)
    m = OnlineModels(OnlineConfig(seed=3, metric_window=window))
    drive(m, rows, labels)
    scored = [lb.label for lb in labels[: n - H]][-window:]  # the labels the window holds
    prior = max(scored.count(c) for c in CLASSES) / len(scored)  # majority-class accuracy
    return m.metrics(), prior


def test_planted_signal_lifts_rolling_accuracy_well_above_the_prior():
    metrics, prior = run_acceptance(signal=True)
    assert 0.35 < prior < 0.45
    assert metrics[LR]["n"] == metrics[ARF]["n"] == 1000
    assert metrics[LR]["accuracy"] > prior + 0.15
    assert metrics[ARF]["accuracy"] > prior + 0.15
    entropy = -sum(p * math.log(p) for p in PRIOR)  # log loss of always predicting the prior
    for name in (LR, ARF):
        assert metrics[name]["log_loss"] < entropy - 0.2
        assert metrics[name]["brier"] < 0.55  # the prior scores 1 - sum(p^2) = 0.66


def test_pure_noise_stays_near_the_prior():
    metrics, prior = run_acceptance(signal=False)
    entropy = -sum(p * math.log(p) for p in PRIOR)
    for name in (LR, ARF):
        assert metrics[name]["n"] == 1000
        assert abs(metrics[name]["accuracy"] - prior) < 0.08
        assert metrics[name]["log_loss"] < entropy + 0.1  # no confident nonsense either


# -- (2) delayed labels ------------------------------------------------------------------------------

def small_rows():
    values = (3.0, -1.0, 0.5, 2.0, -2.5, 1.0)
    return [row(i, {"a": v, "b": -2.0 * v + i}) for i, v in enumerate(values)]


def test_learn_uses_the_features_of_the_labelled_bar_only():
    cfg = OnlineConfig(seed=1, warmup_labels=0, lr=0.5)
    r0, r1, r2, r3, r4, probe = small_rows()
    # (two labels: after one, the scaler's variance is 0 and every scaled feature is 0)
    delayed = OnlineModels(cfg)  # bars 2..4 arrive before the labels of bars 0 and 1
    for r in (r0, r1, r2, r3, r4):
        delayed.predict(r)
    delayed.learn(label(0, 2))
    delayed.learn(label(1, 0))
    direct = OnlineModels(cfg)  # each label right after its bar
    for r, lb in ((r0, label(0, 2)), (r1, label(1, 0))):
        direct.predict(r)
        direct.learn(lb)
    wrong = OnlineModels(cfg)  # bars 3 and 4's features under the starts of bars 0 and 1
    wrong.predict(row(0, r3.features))
    wrong.predict(row(1, r4.features))
    wrong.learn(label(0, 2))
    wrong.learn(label(1, 0))
    assert delayed.n_learned == direct.n_learned == wrong.n_learned == 2
    assert sorted(delayed.pending) == [r2.start, r3.start, r4.start]
    assert delayed.predict(probe) == direct.predict(probe)
    assert delayed.predict(probe)[LR] != wrong.predict(probe)[LR]


def test_labels_for_unknown_or_already_learned_bars_are_ignored():
    m = OnlineModels(OnlineConfig(seed=1, warmup_labels=0, lr=0.5))
    r0, r1, *_, probe = small_rows()
    for r in (r0, r1):
        m.predict(r)
    m.learn(label(0, 0))
    before = copy.deepcopy(m)
    m.learn(label(0, 2))  # bar 0 already learned and forgotten
    m.learn(label(7, 2))  # bar 7 never predicted
    assert m.n_learned == 1 and sorted(m.pending) == [r1.start]
    assert m.predict(probe) == before.predict(probe)
    assert m.metrics() == before.metrics()
    with pytest.raises(ValueError, match="label class"):
        m.learn(label(1, 5))
    assert r1.start in m.pending and m.n_learned == 1  # a bad label does not cost the bar


def test_pending_rows_are_bounded_oldest_dropped_first():
    m = OnlineModels(OnlineConfig(seed=1, warmup_labels=0, max_pending=4))
    rows, labels = stream(10, seed=2, signal=True)
    for r in rows:
        m.predict(r)
    assert sorted(m.pending) == [r.start for r in rows[6:]]
    m.learn(labels[5])  # dropped: ignored
    assert m.n_learned == 0
    m.learn(labels[6])
    assert m.n_learned == 1 and sorted(m.pending) == [r.start for r in rows[7:]]


# -- (3) warm-up -------------------------------------------------------------------------------------

def test_predictions_absent_before_warmup_and_present_after():
    warmup = 5
    rows, labels = stream(20, seed=4, signal=True)
    m = OnlineModels(OnlineConfig(seed=1, warmup_labels=warmup))
    preds = drive(m, rows, labels)
    # when row i is predicted, the labels of bars 0 .. i-H-1 have been learned
    for i, p in enumerate(preds):
        if i - H < warmup:
            assert p == {}, i
        else:
            assert sorted(p) == [ARF, LR], i
            for name, pred in p.items():
                assert pred.model == name and pred.version == VERSION
                probs = (pred.p_down, pred.p_flat, pred.p_up)
                assert all(0.0 <= q <= 1.0 for q in probs)
                assert math.isclose(sum(probs), 1.0)
    # bars predicted before warm-up are learned from but never scored
    first_scored = warmup + H
    n_scored = len(rows) - H - first_scored
    assert m.n_learned == len(rows) - H
    assert {name: v["n"] for name, v in m.metrics().items()} == {LR: n_scored, ARF: n_scored}


# -- (4) state: pickle, deepcopy, determinism ---------------------------------------------------------

def messy(rows):
    """The aligned features, an overlay missing on some bars, NaN and inf here and there."""
    out = []
    for i, r in enumerate(rows):
        f = dict(r.features)
        if i % 7 == 3:
            f.update({k: None for k in f if k.startswith("1h_")})
        if i % 11 == 5:
            f["rsi"], f["15m_adx"] = float("nan"), float("inf")
        out.append(row(i, f))
    return out


def _distributions(forest) -> list:
    return [d for tree in forest.data for leaf in tree._root.iter_leaves()
            for s in (getattr(leaf, "splitters", None) or {}).values() for d in s._att_dist_per_class.values()]


def test_a_model_never_pickled_still_shares_its_generators():
    """Without a recovery directory nothing pickles the state (dataflows/snapshots.py), so learning
    shares the generators itself every SHARE_RNGS_EVERY labels: they were 18 MB over 12 h of 50
    instruments otherwise."""
    rows, labels = stream(15 * SHARE_RNGS_EVERY + H, seed=5, signal=True, names=aligned_feature_names(("15m", "1h")))
    m = OnlineModels(OnlineConfig(seed=11, warmup_labels=20))
    drive(m, rows, labels)
    assert m.n_learned == 15 * SHARE_RNGS_EVERY  # a share point
    dists = _distributions(m.models[ARF][-1])
    assert len(dists) > 100 and all(d._rng is m._spare_rng for d in dists)


def test_state_survives_pickle_and_deepcopy_and_is_deterministic():
    names = aligned_feature_names(("15m", "1h"))
    assert len(names) == 3 * len(FEATURE_NAMES) + len(PERP_NAMES)  # primary + its perp features + 15m + 1h
    rows, labels = stream(160, seed=5, signal=True, names=names)
    rows = messy(rows)
    cfg = OnlineConfig(seed=11, warmup_labels=20)
    m = OnlineModels(cfg)
    twin = OnlineModels(cfg)  # never pickled or copied
    half = 100
    drive(m, rows[:half], labels)
    drive(twin, rows[:half], labels)

    bare = copy.deepcopy(twin.models[ARF])  # the bare pipeline, each distribution with its own generator as River makes it
    assert share_distribution_rngs(bare[-1], random.Random(0)) > 0
    for i, dist in enumerate(_distributions(bare[-1])):
        dist._rng = random.Random(i)
    unshared = len(pickle.dumps(bare))
    blob = pickle.dumps(m)
    assert len(blob) < unshared / 4
    assert share_distribution_rngs(m.models[ARF][-1], m._spare_rng) == 0  # already shared

    restored = pickle.loads(blob)
    copied = copy.deepcopy(m)
    assert restored.metrics() == copied.metrics() == m.metrics() == twin.metrics()
    runs = [drive(x, rows, labels, first=half) for x in (m, restored, copied, twin)]
    assert all(len(p) == 2 for p in runs[0][-10:])
    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert m.metrics() == restored.metrics() == copied.metrics() == twin.metrics()
    for p in runs[0]:
        for pred in p.values():
            assert all(math.isfinite(q) for q in (pred.p_down, pred.p_flat, pred.p_up))

    other_seed = OnlineModels(OnlineConfig(seed=12, warmup_labels=20))
    other = drive(other_seed, rows, labels)[half:]
    assert [p[ARF] for p in other] != [p[ARF] for p in runs[0]]  # the seed matters to the forest
    assert [p[LR] for p in other] == [p[LR] for p in runs[0]]  # and not to the regression


# -- missing values ----------------------------------------------------------------------------------

def test_missing_values_are_imputed_at_the_running_mean():
    rows, labels = stream(200, seed=6, signal=True)
    m = OnlineModels(OnlineConfig(seed=1, warmup_labels=10))
    drive(m, rows, labels)
    base = dict(rows[-1].features)
    for bad in (None, float("nan"), float("inf"), "x"):
        missing = dict(base, sig=bad)
        at_mean = dict(base, sig=m.models[LR]["StandardScaler"].means["sig"])
        p_missing, p_mean = m.predict(row(500, missing)), m.predict(row(501, at_mean))
        assert p_missing == p_mean
    assert m.predict(row(502, base)) != p_mean  # the value itself does matter
    assert present({"a": None, "b": float("nan"), "c": 2, "d": True, "e": "1.5", "z": 3.0}, ("a", "b", "c", "d", "e")) == {"c": 2.0}
    assert FillScaled(("a", "b", "c"), clip=2.0, bias=True).transform_one({"a": -7.0, "c": 0.5}) == {
        "a": -2.0, "b": 0.0, "c": 0.5, "__bias__": 1.0}
    # an all-missing row still gets finite probabilities
    p = m.predict(row(503, {k: None for k in base}))
    assert all(math.isfinite(v.p_up) for v in p.values()) and sorted(p) == [ARF, LR]


# -- (5) metrics ---------------------------------------------------------------------------------------

def test_score_hand_numbers():
    ok, ll, brier = score((0.2, 0.5, 0.3), 2)
    assert ok == 0.0
    assert ll == pytest.approx(-math.log(0.3)) and ll == pytest.approx(1.2039728043)
    assert brier == pytest.approx(0.2**2 + 0.5**2 + 0.7**2) and brier == pytest.approx(0.78)
    assert score((0.2, 0.5, 0.3), 1) == pytest.approx((1.0, -math.log(0.5), 0.04 + 0.25 + 0.09))
    assert score((0.4, 0.2, 0.4), 0)[0] == 1.0 and score((0.4, 0.2, 0.4), 2)[0] == 0.0  # tie: lower class
    assert score((0.0, 1.0, 0.0), 0) == pytest.approx((0.0, -math.log(1e-15), 2.0))  # clamp: 34.54


def test_rolling_metrics_match_an_independent_computation():
    window, warmup = 4, 2
    rows, labels = stream(14, seed=8, signal=True)
    m = OnlineModels(OnlineConfig(seed=1, warmup_labels=warmup, metric_window=window))
    preds = drive(m, rows, labels)
    # every bar i <= len - 1 - H got its label; the scored ones are those with a prediction
    scored = [(preds[i], labels[i].label) for i in range(len(rows) - H) if preds[i]]
    assert len(scored) == len(rows) - H - (warmup + H)  # > window: the window has rolled
    got = m.metrics()
    for name in (LR, ARF):
        last = [(p[name], y) for p, y in scored][-window:]
        pv = [((q.p_down, q.p_flat, q.p_up), y) for q, y in last]
        acc = sum(1.0 for probs, y in pv if probs.index(max(probs)) == y) / window
        ll = sum(-math.log(max(probs[y], 1e-15)) for probs, y in pv) / window
        brier = sum(sum((probs[k] - (k == y)) ** 2 for k in range(3)) for probs, y in pv) / window
        assert got[name]["n"] == window
        assert got[name]["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert got[name]["log_loss"] == pytest.approx(ll, rel=1e-12)
        assert got[name]["brier"] == pytest.approx(brier, rel=1e-12)
    assert OnlineModels().metrics() == {}


def test_config_is_validated():
    for bad in ({"arf_models": 0}, {"metric_window": 0}, {"warmup_labels": -1}, {"lr": 0.0},
                {"clip": 0.0}, {"max_pending": 0}, {"l2": -1.0}):
        with pytest.raises(ValueError, match="OnlineConfig"):
            OnlineConfig(**bad)


# -- (6) calibration ----------------------------------------------------------------------------------

def test_predictions_are_calibrated_on_matured_labels_with_the_raw_output_beside_them():
    """A fast learner on a planted signal is over-confident; the rolling calibrator (fitted only on
    labels that matured before each prediction) brings its probabilities back in line."""
    from models.calibration import classwise_ece
    from operators.stats import log_loss

    n, h = 2500, H
    rows, labels = stream(n, seed=9, signal=True, reliability=0.6)
    cfg = OnlineConfig(seed=2, warmup_labels=20, lr=0.5)  # too fast on purpose: over-confident
    m = OnlineModels(cfg)
    preds = drive(m, rows, labels)
    raw_only = drive(OnlineModels(OnlineConfig(seed=2, warmup_labels=20, lr=0.5, calibrate=False)), rows, labels)
    last = range(n - 1000 - h, n - h)  # bars whose labels matured
    y = [labels[i].label for i in last]
    for name in (LR,):
        cal = [(p[name].p_down, p[name].p_flat, p[name].p_up) for p in (preds[i] for i in last)]
        raw = [p[name].raw for p in (preds[i] for i in last)]
        assert np.allclose(raw, [(q[name].p_down, q[name].p_flat, q[name].p_up) for q in (raw_only[i] for i in last)],
                           rtol=0, atol=1e-12)  # raw = what the uncalibrated model says
        assert log_loss(cal, y) < log_loss(raw, y) - 0.05
        assert classwise_ece(cal, y) < 0.05 < classwise_ece(raw, y)
    assert m.calibrators[LR].map is not None and m.calibrators[LR].map.a < 1.0
    # the first predictions after warm-up have no fitted map yet: calibrated = raw (the prior)
    first = next(p for p in preds if p)
    assert (first[LR].p_down, first[LR].p_flat, first[LR].p_up) == pytest.approx(first[LR].raw)
