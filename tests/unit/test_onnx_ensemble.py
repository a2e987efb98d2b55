"""ONNX ensemble runtime: parity with LightGBM, averaging, no artefact, bad hashes, hot swap."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import shutil
from datetime import datetime, timezone

import lightgbm as lgb
import numpy as np
import pytest

from models.artefacts import ModelRefused, RunFacts
from models.manifest import MANIFEST_FILE, DataOrigin
from models.onnx_ensemble import ENSEMBLE_NAME, REFUSED, OnnxEnsemble
from models.train import train
from operators.signals import Prediction
from tests.unit.synthetic_models import (
    BAR_MS, HORIZON, LABEL_DEFINITION, NAMES, NO_NAN_FEATURE, ORIGIN, T0, synthetic_frame,
)


LATER = {"instrument": "x:A", "start": T0 + 30 * 86_400_000}  # a bar of a trained instrument, after the span


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two artefact versions in separate folders: A (2 members, January) and B (3 members, newer)."""
    roots = {}
    for key, folds, seed, month, n_times in (("A", 2, 7, 1, 800), ("B", 3, 11, 2, 1500)):
        root = tmp_path_factory.mktemp(key)
        m = train(synthetic_frame(n_times=n_times, seed=seed), NAMES, horizon=HORIZON, folds=folds,
                  params={"num_iterations": 40, "min_data_in_leaf": 20}, seed=seed, out_dir=root,
                  label_definition=LABEL_DEFINITION, origin=ORIGIN,
                  now=lambda: datetime(2024, month, 1, tzinfo=timezone.utc))
        roots[key] = (root / m.version, m)
    return roots


def install(src, root, name=None):
    """Copy a version folder into ``root`` the way train() does: a hidden temp folder, then rename."""
    name = name or src.name
    tmp = root / f".tmp-{name}"
    shutil.copytree(src, tmp)
    tmp.rename(root / name)
    return root / name


def sample_rows(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(NAMES))).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[: n // 8, NAMES.index(NO_NAN_FEATURE)] = np.nan  # NaN where training never had one
    if n > 51:
        x[50] = np.nan  # all missing
        x[51] = 0.0
    return x


def threshold_rows(booster, base, limit=400):
    """Rows sitting exactly on (the float32 rounding of) split thresholds and one ulp either side,
    where a float32 graph and a float64 booster are most likely to disagree."""
    splits = []

    def walk(node):
        if "split_index" in node:
            splits.append((node["split_feature"], node["threshold"]))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    rows = []
    for feature, t in splits[:limit]:
        t32 = np.float32(t)
        for v in (t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))):
            row = base.copy()
            row[feature] = v
            rows.append(row)
    inexact = sum(float(np.float32(t)) != t for _, t in splits[:limit])
    return np.array(rows, dtype=np.float32), inexact


def as_features(row) -> dict:
    return {n: (None if np.isnan(v) else float(v)) for n, v in zip(NAMES, row)}


def test_parity_lightgbm_and_onnxruntime_agree_to_1e_5(versions, tmp_path):
    """Acceptance: same inputs (NaN rows included) -> LightGBM and onnxruntime within 1e-5."""
    folder, m = versions["B"]
    ens = OnnxEnsemble(folder.parent)
    assert ens.version == m.version
    x = sample_rows()
    per_member = ens.score_batch(x, members=True)
    assert per_member.shape == (3, len(x), 3)
    for k, mb in enumerate(m.members):
        booster = lgb.Booster(model_file=str(folder / mb.lgb_file))
        missing_none = [n for t in booster.dump_model()["tree_info"] for n in _nodes(t["tree_structure"])
                        if n["missing_type"] == "None"]
        assert missing_none  # the NaN-as-zero splits are exercised too
        diff = np.abs(booster.predict(x) - per_member[k]).max()
        assert diff <= 1e-5, f"{mb.name}: max abs diff {diff}"
        edge, inexact = threshold_rows(booster, x[51])
        assert inexact > 0  # thresholds that float32 cannot hold exactly are among them
        edge_diff = np.abs(booster.predict(edge) - ens.score_batch(edge, members=True)[k]).max()
        assert edge_diff <= 1e-5, f"{mb.name}: max abs diff {edge_diff} at split thresholds"
    # the one-row path gives the batch numbers (None and absent keys are NaN)
    for i in (0, 7, 50, 51):
        feats = as_features(x[i])
        if i == 7:
            feats = {k: v for k, v in feats.items() if v is not None}
        preds = ens.score(feats, **LATER)
        for k in range(3):
            p = preds[f"onnx_{k}"]
            assert np.allclose([p.p_down, p.p_flat, p.p_up], per_member[k, i], atol=1e-6)


def _nodes(node):
    if "split_index" in node:
        yield node
        yield from _nodes(node["left_child"])
        yield from _nodes(node["right_child"])


def test_ensemble_is_the_mean_of_members_and_keeps_votes(versions):
    folder, m = versions["B"]
    ens = OnnxEnsemble(folder.parent)
    x = sample_rows(n=5, seed=1)
    preds = ens.score(as_features(x[2]), **LATER)
    assert list(preds) == ["onnx_0", "onnx_1", "onnx_2", ENSEMBLE_NAME]
    assert all(isinstance(p, Prediction) and p.version == m.version for p in preds.values())
    members = [preds[f"onnx_{k}"] for k in range(3)]
    e = preds[ENSEMBLE_NAME]
    # raw: the members' mean; p_*: that mean through the manifest's calibration map (what gates read)
    mean = [np.mean([getattr(p, field) for p in members]) for field in ("p_down", "p_flat", "p_up")]
    assert e.raw == pytest.approx(mean, abs=1e-12)
    assert [e.p_down, e.p_flat, e.p_up] == pytest.approx(m.calibration.ensemble.apply(mean), abs=1e-12)
    assert [e.p_down, e.p_flat, e.p_up] != pytest.approx(mean, abs=1e-3)  # the map does something here
    assert e.p_down + e.p_flat + e.p_up == pytest.approx(1.0)
    assert e.votes == tuple((p.model, p.p_down, p.p_flat, p.p_up) for p in members)
    assert all(p.votes == () and p.raw == () for p in members)  # members are votes: raw outputs
    assert np.allclose(ens.score_batch(x)[2], e.raw, atol=1e-6)
    assert np.allclose(ens.score_batch(x, calibrated=True)[2], [e.p_down, e.p_flat, e.p_up], atol=1e-6)


def test_no_artefact_returns_empty_and_never_raises(tmp_path):
    for root in (tmp_path / "does-not-exist", tmp_path):
        ens = OnnxEnsemble(root)
        assert ens.score({"ret_1": 0.1}, **LATER) == {}
        assert not ens.eligible and ens.version is None
        with pytest.raises(RuntimeError, match="no ONNX artefact loaded"):
            ens.score_batch(np.zeros((1, 3), dtype=np.float32))


def test_corrupted_hash_ignores_that_version_with_a_clear_error(versions, tmp_path, caplog):
    install(versions["A"][0], tmp_path)
    b = install(versions["B"][0], tmp_path)
    victim = b / "model_1.onnx"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    victim.write_bytes(bytes(bad))
    clock = FakeClock()
    with caplog.at_level(logging.ERROR, logger="models.onnx_ensemble"):
        ens = OnnxEnsemble(tmp_path, check_every_s=5, clock=clock)
    assert ens.version == versions["A"][1].version  # the newer, corrupt B is skipped
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "sha256 mismatch for model_1.onnx" in errors[0] and b.name in errors[0]
    assert "sha256 mismatch for model_1.onnx" in ens.last_error
    assert set(ens.score(as_features(sample_rows(2)[0]), **LATER)) == {"onnx_0", "onnx_1", ENSEMBLE_NAME}
    clock.t = 10
    ens.maybe_reload()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # logged once, not per check
    victim.write_bytes(good)  # repaired (e.g. the copy finished): picked up on the next check
    clock.t = 20
    assert ens.maybe_reload() is True and ens.version == versions["B"][1].version


def test_hot_swap_to_a_newer_version_between_two_score_calls(versions, tmp_path):
    (a_src, a), (b_src, b) = versions["A"], versions["B"]
    install(a_src, tmp_path)
    clock = FakeClock()
    ens = OnnxEnsemble(tmp_path, check_every_s=5, clock=clock)
    row = as_features(sample_rows(3)[1])
    first = ens.score(row, **LATER)
    assert {p.version for p in first.values()} == {a.version} and len(first) == 3
    install(b_src, tmp_path)
    clock.t = 4.9  # not yet time to look
    assert {p.version for p in ens.score(row, **LATER).values()} == {a.version}
    clock.t = 5.0
    second = ens.score(row, **LATER)
    assert {p.version for p in second.values()} == {b.version}
    assert list(second) == ["onnx_0", "onnx_1", "onnx_2", ENSEMBLE_NAME]  # B's three members, all of them
    only_b = OnnxEnsemble(b_src.parent)
    expected = only_b.score(row, **LATER)
    assert all(np.allclose([second[k].p_down, second[k].p_flat, second[k].p_up],
                           [expected[k].p_down, expected[k].p_flat, expected[k].p_up]) for k in expected)
    clock.t = 10.0
    assert ens.maybe_reload() is False  # nothing newer: no swap


def test_newest_means_created_at_not_folder_name(versions, tmp_path):
    install(versions["A"][0], tmp_path, name="zzz-old")
    install(versions["B"][0], tmp_path, name="aaa-new")
    assert OnnxEnsemble(tmp_path).version == versions["B"][1].version


def test_half_written_folder_is_ignored_until_its_manifest_appears(versions, tmp_path):
    (a_src, a), (b_src, b) = versions["A"], versions["B"]
    install(a_src, tmp_path)
    shutil.copytree(b_src, tmp_path / ".tmp-B")  # train()'s temp folder, manifest included
    partial = tmp_path / "incoming"
    partial.mkdir()
    for mb in b.members:  # model files copied, manifest not yet
        shutil.copy(b_src / mb.file, partial / mb.file)
    clock = FakeClock()
    ens = OnnxEnsemble(tmp_path, check_every_s=1, clock=clock)
    assert ens.version == a.version
    shutil.copy(b_src / MANIFEST_FILE, partial / MANIFEST_FILE)
    clock.t = 1
    assert set(ens.score(as_features(sample_rows(1)[0]), **LATER)) == {"onnx_0", "onnx_1", "onnx_2", ENSEMBLE_NAME}
    assert ens.version == b.version


def test_feature_check_marks_ineligible_with_a_clear_message(versions):
    folder, m = versions["B"]
    ens = OnnxEnsemble(folder.parent)
    with pytest.raises(ValueError, match=rf"needs features the pipeline does not produce: \['{NAMES[-1]}'\]"):
        ens.expect_features(NAMES[:-1])
    assert not ens.eligible and ens.score({"ret_1": 0.0}, **LATER) == {}
    ens.expect_features(NAMES + ["extra"])  # a superset is fine
    assert ens.version == m.version and ens.score({"ret_1": 0.0}, **LATER)
    strict = OnnxEnsemble(folder.parent, expected_features=NAMES[1:])
    assert not strict.eligible and "ret_1" in strict.last_error


def test_ensemble_is_not_picklable_and_says_where_it_belongs(versions):
    ens = OnnxEnsemble(versions["A"][0].parent)
    with pytest.raises(TypeError, match="outside bytewax state"):
        pickle.dumps(ens)
    with pytest.raises(TypeError, match="outside bytewax state"):
        copy.deepcopy(ens)


# ------------------------------------------------------------- artefacts belong to their data

FOREIGN = DataOrigin(store="http://tapeflow:***@elsewhere:8123", database="tapeflow", primary_tf="5m",
                     overlay_tfs=["15m", "1h"])


def facts(**kw) -> RunFacts:
    """The facts of a pipeline scoring into ORIGIN's store with the features the versions use."""
    base = dict(store=ORIGIN.store, database=ORIGIN.database, primary_tf="5m", horizon=HORIZON,
                features=tuple(NAMES))
    return RunFacts(**{**base, **kw})


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A version trained on another store's XRP, newer than A and B (March)."""
    root = tmp_path_factory.mktemp("F")
    m = train(synthetic_frame(n_times=900, instruments=("XRP",), seed=5, strength=1.0), NAMES, horizon=HORIZON,
              folds=2,
              params={"num_iterations": 20, "min_data_in_leaf": 20}, seed=5, out_dir=root,
              label_definition=LABEL_DEFINITION, origin=FOREIGN,
              now=lambda: datetime(2024, 3, 1, tzinfo=timezone.utc))
    return root / m.version, m


def refusals(ens) -> list:
    return [e for e in ens.take_events() if e.kind == REFUSED]


def test_a_version_from_another_store_is_refused_and_the_same_stores_is_served(versions, foreign, tmp_path,
                                                                                caplog):
    install(versions["A"][0], tmp_path)
    f_dir = install(foreign[0], tmp_path)  # the newest, but trained elsewhere
    with caplog.at_level(logging.WARNING, logger="models.onnx_ensemble"):
        ens = OnnxEnsemble(tmp_path, facts=facts())
    assert ens.version == versions["A"][1].version
    events = refusals(ens)
    assert len(events) == 1 and "elsewhere:8123" in events[0].reason and foreign[1].version in events[0].reason
    assert json.loads(events[0].detail)["rule"] == "store"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "trained on store http://tapeflow:***@elsewhere:8123" in warned[0]
    assert str(f_dir) in warned[0]
    # another database on the same server is another store too
    assert not OnnxEnsemble(versions["A"][0].parent, facts=facts(database="other")).eligible


def test_rows_of_instruments_it_was_not_trained_on_are_not_scored(versions):
    ens = OnnxEnsemble(versions["A"][0].parent, facts=facts())
    row = as_features(sample_rows(1)[0])
    later = LATER["start"]
    assert ens.score(row, instrument="binance:XRP/USDT", start=later) == {}
    assert ens.score(row, instrument="binance:XRP/USDT", start=later + BAR_MS) == {}
    events = refusals(ens)
    assert len(events) == 1  # once per (version, instrument, rule), not per bar
    assert (events[0].exchange, events[0].symbol) == ("binance", "XRP/USDT")
    assert "not trained on binance:XRP/USDT (trained on x:A, x:B)" in events[0].reason
    assert set(ens.score(row, instrument="x:B", start=later)) == {"onnx_0", "onnx_1", ENSEMBLE_NAME}


def test_bars_it_was_trained_on_are_not_scored_later_bars_are(versions):
    folder, m = versions["A"]
    ens = OnnxEnsemble(folder.parent, facts=facts())
    row = as_features(sample_rows(1)[0])
    last = m.data.last_bar_end
    assert T0 < m.data.first_bar_end < last
    for start in (T0, m.training.end, last - BAR_MS, last - 1):  # bars starting inside the span
        assert ens.score(row, instrument="x:A", start=start) == {}
    first_after = ens.score(row, instrument="x:A", start=last)  # its data all comes after the span
    assert {p.version for p in first_after.values()} == {m.version} and ENSEMBLE_NAME in first_after
    events = refusals(ens)
    assert len(events) == 1 and events[0].to_ts == last and events[0].symbol == "A"
    assert json.loads(events[0].detail)["rule"] == "span" and "scored without it" in events[0].reason


def test_a_hot_swap_mid_run_respects_the_new_versions_span(versions, tmp_path):
    """A's span ends before B's: a bar between the two is scored by A, then, once B is served,
    not at all (B trained on it)."""
    (a_src, a), (b_src, b) = versions["A"], versions["B"]
    assert a.data.last_bar_end < b.data.last_bar_end
    install(a_src, tmp_path)
    clock = FakeClock()
    ens = OnnxEnsemble(tmp_path, check_every_s=5, clock=clock, facts=facts())
    row, between = as_features(sample_rows(1)[0]), {"instrument": "x:A", "start": b.data.last_bar_end - BAR_MS}
    assert {p.version for p in ens.score(row, **between).values()} == {a.version}
    install(b_src, tmp_path)
    clock.t = 5
    assert ens.score(row, **between) == {} and ens.version == b.version
    assert {p.version for p in ens.score(row, **LATER).values()} == {b.version}


def test_feature_list_mismatch_is_refused_with_a_one_line_message_not_served_with_nan(versions, caplog):
    folder, m = versions["A"]
    produced = tuple(n for n in NAMES if not n.startswith("1h_"))  # overlays changed: no 1h features
    with caplog.at_level(logging.WARNING, logger="models.onnx_ensemble"):
        ens = OnnxEnsemble(folder.parent, facts=facts(features=produced))
    assert not ens.eligible and ens.score(as_features(sample_rows(1)[0]), **LATER) == {}
    (event,) = refusals(ens)
    assert "\n" not in event.reason and json.loads(event.detail)["rule"] == "features"
    assert event.reason.startswith(f"version {m.version} needs features the pipeline does not produce: ['1h_")
    assert "(+" in event.reason and "['15m', '1h']" in event.reason  # how many more, and its overlays
    assert any(event.reason in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("kw, words", [({"primary_tf": "15m"}, "trained on 5m rows, the pipeline scores 15m"),
                                       ({"horizon": HORIZON + 1}, f"predicts {HORIZON} bars ahead")])
def test_other_timeframe_or_horizon_is_refused(versions, kw, words):
    ens = OnnxEnsemble(versions["A"][0].parent, facts=facts(**kw))
    assert not ens.eligible and words in refusals(ens)[0].reason


def test_a_named_version_is_served_whatever_its_store_and_instruments(versions, foreign, tmp_path):
    install(versions["B"][0], tmp_path)
    f_dir = install(foreign[0], tmp_path)
    a_dir = install(versions["A"][0], tmp_path)
    by_name = OnnxEnsemble(tmp_path, facts=facts(), model=a_dir.name)  # older than B: named wins
    assert by_name.version == versions["A"][1].version
    by_path = OnnxEnsemble(tmp_path / "elsewhere", facts=facts(), model=str(f_dir))
    assert by_path.version == foreign[1].version
    row = as_features(sample_rows(1)[0])
    assert set(by_path.score(row, instrument="binance:ETH/USDT", start=LATER["start"])) == {
        "onnx_0", "onnx_1", ENSEMBLE_NAME}
    # ... but never on the bars it was trained on
    assert by_path.score(row, instrument="x:XRP", start=foreign[1].data.last_bar_end - BAR_MS) == {}
    assert [json.loads(e.detail)["rule"] for e in refusals(by_path)] == ["span"]


def test_a_named_version_that_cannot_be_served_is_an_error(versions, tmp_path):
    a_dir = install(versions["A"][0], tmp_path)
    with pytest.raises(ModelRefused, match=r"^the named ONNX ensemble '.*' cannot be served: .*needs features "
                                           r"the pipeline does not produce: \['ret_1'\]"):
        OnnxEnsemble(tmp_path, facts=facts(features=tuple(NAMES[1:])), model=a_dir.name)
    with pytest.raises(ModelRefused, match=f"'nope' does not exist: .*versions in {tmp_path}: {a_dir.name}"):
        OnnxEnsemble(tmp_path, facts=facts(), model="nope")
