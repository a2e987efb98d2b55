"""The deployment gate (models/deployment.py, models/train.py) and what the runtime does with its
decision (models/onnx_ensemble.py): an ensemble without skill is rejected (at about the rate the
test promises), a skilled one is accepted, one worse than the active model is rejected, and a
rejected or ungated version never scores a bar."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import msgspec
import numpy as np
import pytest

from models.deployment import ACCEPTED, REJECTED, Evidence, GateRule, decide
from models.artefacts import ModelRefused
from models.manifest import MANIFEST_FILE, load_manifest
from models.onnx_ensemble import ENSEMBLE_NAME, OnnxEnsemble
from models.train import train
from tests.unit.synthetic_models import HORIZON, LABEL_DEFINITION, NAMES, ORIGIN, T0, synthetic_frame

FAST = {"num_iterations": 20, "min_data_in_leaf": 20}
LATER = {"instrument": "x:A", "start": T0 + 60 * 86_400_000}


def fit(root, *, strength, seed, month=1, n_times=400, incumbent=None, rule=None):
    return train(synthetic_frame(n_times=n_times, seed=seed, strength=strength), NAMES, horizon=HORIZON, folds=3,
                 params=FAST, seed=seed, out_dir=root, label_definition=LABEL_DEFINITION, origin=ORIGIN,
                 now=lambda: datetime(2024, month, 1, tzinfo=timezone.utc), incumbent=incumbent, gate=rule)


def evidence(n_steps, y, cand, prior, per_step=2):
    times = np.repeat(T0 + np.arange(n_steps) * 300_000, per_step)
    return Evidence(times=times, y=y, cand=cand, raw=cand, prior=np.tile(prior, (len(y), 1)))


def test_decide_accepts_skill_and_rejects_its_absence_with_the_numbers_in_the_reason():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.choice(3, size=n, p=[0.3, 0.3, 0.4])
    prior = np.array([0.3, 0.3, 0.4])
    good = np.full((n, 3), 0.15)
    good[np.arange(n), y] = 0.7  # right more often than the prior
    rec = evidence(n // 2, y, good, prior)
    d = decide(rule=GateRule(), lags=HORIZON, record=rec, span=rec, ece=0.0, ece_raw=0.0)
    assert d.status == ACCEPTED and d.gain_prior > 0.3 and "beats the class prior" in d.reason
    flat = evidence(n // 2, y, np.tile(prior, (n, 1)), prior)  # says the prior: no gain at all
    d = decide(rule=GateRule(), lags=HORIZON, record=flat, span=flat, ece=0.0, ece_raw=0.0)
    assert d.status == REJECTED and d.gain_prior == pytest.approx(0.0, abs=1e-12)
    assert "does not beat the class prior" in d.reason and "needs > " in d.reason
    # the margin is a threshold on the gain
    d = decide(rule=GateRule(margin=1.0), lags=HORIZON, record=rec, span=rec, ece=0.0, ece_raw=0.0)
    assert d.status == REJECTED and "margin 1" in d.reason


def test_decide_compares_with_the_active_model_on_the_rows_it_was_not_trained_on():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.choice(3, size=n)
    cand = np.full((n, 3), 0.2)
    cand[np.arange(n), y] = 0.6
    rec = evidence(n // 2, y, cand, np.full(3, 1 / 3))
    mask = np.arange(n) >= 100  # it trained on the first 100 rows of the span
    better = np.full((mask.sum(), 3), 0.05)
    better[np.arange(mask.sum()), y[mask]] = 0.9
    d = decide(rule=GateRule(), lags=HORIZON, record=rec, span=rec, ece=0.0, ece_raw=0.0,
               active=("v-active", mask, better))
    assert d.status == REJECTED and d.active_rows == 200
    assert "does not beat the active model v-active" in d.reason and d.logloss_active < d.logloss_candidate_on_active_rows
    worse = np.full((mask.sum(), 3), 1 / 3)
    d = decide(rule=GateRule(), lags=HORIZON, record=rec, span=rec, ece=0.0, ece_raw=0.0,
               active=("v-active", mask, worse))
    assert d.status == ACCEPTED and "and the active model v-active" in d.reason
    few = np.arange(n) >= n - 10
    d = decide(rule=GateRule(), lags=HORIZON, record=rec, span=rec, ece=0.0, ece_raw=0.0,
               active=("v-active", few, better[:10]))
    assert d.status == ACCEPTED and "not compared" in d.reason and d.logloss_active is None


def test_without_skill_the_gate_rejects_at_about_its_nominal_rate(tmp_path):
    """Pure noise features (strength 0), 20 seeds: a point-estimate rule would pass about half of
    them; the gate (one-sided 5%) must pass at most two."""
    decisions = [fit(tmp_path / str(s), strength=0.0, seed=100 + s).deployment for s in range(20)]
    assert sum(d.status == ACCEPTED for d in decisions) <= 2
    assert sum(d.logloss_raw < d.logloss_prior for d in decisions) >= 1  # luck exists; the test sees through it
    rejected = next(d for d in decisions if d.status == REJECTED)
    assert rejected.record_steps > 100 and rejected.span_rows > 0 and rejected.reason.startswith("out-of-sample")


def test_a_skilled_ensemble_is_accepted_calibrated_and_served(tmp_path):
    m = fit(tmp_path, strength=1.0, seed=3)
    d = m.deployment
    assert d.status == ACCEPTED and d.gain_prior > 3 * d.se_prior
    assert d.logloss < d.logloss_prior and d.span_logloss < d.span_logloss_prior
    assert m.calibration is not None and m.calibration.fit_rows == d.span_rows
    assert load_manifest(tmp_path / m.version).deployment == d  # recorded in the manifest
    ens = OnnxEnsemble(tmp_path)
    assert ens.version == m.version and ENSEMBLE_NAME in ens.score({}, **LATER)


def test_a_rejected_or_ungated_version_never_scores_a_bar(tmp_path):
    good = fit(tmp_path / "good", strength=1.0, seed=3, month=1)
    bad = fit(tmp_path / "bad", strength=0.0, seed=101, month=2)  # newer, no skill
    assert good.deployment.status == ACCEPTED and bad.deployment.status == REJECTED
    live = tmp_path / "live"
    live.mkdir()
    for src in (tmp_path / "good" / good.version, tmp_path / "bad" / bad.version):
        shutil.copytree(src, live / src.name)
    ens = OnnxEnsemble(live)
    assert ens.version == good.version  # the newer one is rejected: the older accepted one serves
    assert {p.version for p in ens.score({}, **LATER).values()} == {good.version}
    with pytest.raises(ModelRefused, match="rejected by the deployment gate: out-of-sample log loss"):
        OnnxEnsemble(live, model=bad.version)  # naming it does not help
    # a manifest written before the gate existed (no deployment record) is not served either
    raw = json.loads((live / good.version / MANIFEST_FILE).read_bytes())
    raw["deployment"] = None
    (live / good.version / MANIFEST_FILE).write_text(json.dumps(raw))
    ens = OnnxEnsemble(live)
    assert not ens.eligible and ens.score({}, **LATER) == {}
    with pytest.raises(ModelRefused, match="written before models were calibrated and gated"):
        OnnxEnsemble(live, model=good.version)


def test_a_candidate_worse_than_the_serving_model_is_rejected(tmp_path):
    """Same relation between features and labels throughout. The serving model learned it well;
    the candidate barely (three rounds). It beats the prior, but not the serving model on the rows
    of the latest span the serving model never saw: rejected."""
    strong = fit(tmp_path / "strong", strength=1.0, seed=4, n_times=1500)
    serving = OnnxEnsemble(tmp_path / "strong")
    assert serving.version == strong.version and strong.deployment.status == ACCEPTED
    frame = synthetic_frame(n_times=2400, seed=5, strength=1.0)  # the same instruments, 900 bars further
    weak = train(frame, NAMES, horizon=HORIZON, folds=3, params={"num_iterations": 3, "min_data_in_leaf": 200},
                 seed=5, out_dir=tmp_path / "weak", label_definition=LABEL_DEFINITION, origin=ORIGIN,
                 incumbent=serving.incumbent())
    d = weak.deployment
    assert d.active_version == strong.version and d.active_rows == d.span_rows  # the span is after its data
    assert d.gain_prior > 0  # some skill ...
    assert d.logloss_candidate_on_active_rows > d.logloss_active  # ... less than the serving model's
    assert d.status == REJECTED and "does not beat the active model" in d.reason
    assert msgspec.json.decode(msgspec.json.encode(d), type=type(d)) == d
