"""Walk-forward splits with a purge gap, and LightGBM -> ONNX training with a manifest."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timezone

import lightgbm
import numpy as np
import polars as pl
import pytest

from models.folds import classification_metrics, walk_forward_splits
from models.manifest import MANIFEST_FILE, Manifest, load_manifest
from models.train import train
from tests.unit.synthetic_models import (
    BAR_MS, FILLED, HORIZON, INSTRUMENTS, LABEL_DEFINITION, NAMES, ORIGIN, SIGNAL, T0, synthetic_frame,
)

SMALL = {"num_iterations": 40, "min_data_in_leaf": 20}
TINY = {"num_iterations": 8, "min_data_in_leaf": 20}


# ------------------------------------------------------------------------------- walk-forward


def test_walk_forward_small_case_by_hand():
    splits = walk_forward_splits(10, 2, 1, 4)
    assert [(t.tolist(), v.tolist()) for t, v in splits] == [
        ([0, 1, 2, 3], [5, 6]),  # row 4 is the purge gap
        ([0, 1, 2, 3, 4, 5], [7, 8, 9]),  # row 6 is the purge gap; the remainder goes last
    ]


@pytest.mark.parametrize("n_rows,folds,purge,min_train", [
    (100, 4, 3, 20), (1000, 5, 7, 1), (37, 3, 0, 10), (12, 1, 2, 9), (503, 7, 12, 100),
])
def test_walk_forward_never_trains_on_or_after_validation(n_rows, folds, purge, min_train):
    """Acceptance: no training row inside a validation block or its purge gap, none after it."""
    splits = walk_forward_splits(n_rows, folds, purge, min_train)
    assert len(splits) == folds
    validated = []
    for train_idx, valid_idx in splits:
        v0, v1 = int(valid_idx[0]), int(valid_idx[-1])
        assert valid_idx.tolist() == list(range(v0, v1 + 1))  # contiguous block
        assert train_idx.tolist() == list(range(0, v0 - purge))  # everything before, minus the gap
        forbidden = set(range(v0 - purge, n_rows))  # gap, block and everything after it
        assert not forbidden & set(train_idx.tolist())
        assert train_idx.max() < v0 - purge
        assert len(train_idx) >= min_train
        validated += valid_idx.tolist()
    # the blocks tile the rows after min_train + purge, in time order, sizes within one row
    assert validated == list(range(min_train + purge, n_rows))
    sizes = [len(v) for _, v in splits]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("args,exc,words", [
    ((10, 0, 1, 4), ValueError, "folds must be >= 1"),
    ((10, 2, -1, 4), ValueError, "purge must be >= 0"),
    ((10, 2, 1, 0), ValueError, "min_train must be >= 1"),
    ((10, 4, 3, 4), ValueError, "need >= 11"),
    ((10.0, 2, 1, 4), TypeError, "n_rows must be an int"),
    ((10, True, 1, 4), TypeError, "folds must be an int"),
])
def test_walk_forward_argument_errors(args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        walk_forward_splits(*args)


def test_classification_metrics_by_hand():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    m = classification_metrics(p, np.array([0, 1]))
    assert m["logloss"] == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    assert m["brier"] == pytest.approx(((0.25 + 0.0625 + 0.0625) + (0.01 + 0.81 + 0.64)) / 2)
    assert m["accuracy"] == 0.5


# ------------------------------------------------------------------------------------ train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("artefacts")
    df = synthetic_frame()
    calls = []
    manifest = train(df, NAMES, horizon=HORIZON, folds=3, params=SMALL, out_dir=out,
                     label_definition=LABEL_DEFINITION, origin=ORIGIN,
                     progress=lambda i, k, msg: calls.append((i, k, msg)))
    return df, out, manifest, calls


def test_train_writes_a_complete_manifest_with_matching_hashes(trained):
    df, out, m, _ = trained
    assert [p.name for p in out.iterdir()] == [m.version]  # no temp folder left behind
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", m.version)
    folder = out / m.version
    raw = json.loads((folder / MANIFEST_FILE).read_bytes())
    assert set(raw) == set(Manifest.__struct_fields__)
    assert load_manifest(folder) == m
    assert raw["features"] == NAMES  # exact order
    assert m.label == LABEL_DEFINITION and m.horizon == HORIZON and m.classes == ["down", "flat", "up"]
    assert (m.input_name, m.output_name, m.folds, m.seed) == ("features", "probabilities", 3, 7)
    # every file is listed with its sha256, and nothing else is in the folder
    assert {p.name for p in folder.iterdir()} == set(m.files) | {MANIFEST_FILE}
    for name, digest in m.files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert [mb.file for mb in m.members] == ["model_0.onnx", "model_1.onnx", "model_2.onnx"]
    assert [mb.name for mb in m.members] == ["onnx_0", "onnx_1", "onnx_2"]
    for mb in m.members:
        assert m.files[mb.file] == mb.sha256 and m.files[mb.lgb_file] == mb.lgb_sha256
        assert mb.num_trees == 40 * 3
    # parameters as trained, library versions
    for key, value in {"objective": "multiclass", "num_class": 3, "seed": 7, "deterministic": True,
                       "num_threads": 1, "num_iterations": 40, "min_data_in_leaf": 20}.items():
        assert m.params[key] == value
    assert m.libraries["lightgbm"] == lightgbm.__version__
    assert {"onnxruntime", "onnxmltools", "onnx", "python"} <= set(m.libraries)


def test_manifest_records_the_data_it_was_trained_on(trained):
    """Store, database, instruments, timeframes and the span of bars read (labels included)."""
    df, out, m, _ = trained
    d = load_manifest(out / m.version).data
    assert (d.store, d.database, d.primary_tf, d.overlay_tfs) == (ORIGIN.store, ORIGIN.database, "5m", ["15m", "1h"])
    assert d.instruments == sorted(INSTRUMENTS)
    labelled = df.filter(pl.col("label").is_not_null())
    assert d.rows == labelled.height
    assert d.first_bar_end == T0 + BAR_MS
    # the last labelled bar's label read the close HORIZON bars later: that bar's end
    assert d.last_bar_end == labelled["start"].max() + BAR_MS + HORIZON * BAR_MS


def test_span_ends_at_the_latest_label_maturity_when_it_is_later(tmp_path):
    """A label that matured late (missing bars after it) read data up to its maturity."""
    df = synthetic_frame(n_times=300, instruments=("A",), seed=5)
    df = df.with_columns(matured_at=pl.col("start") + (HORIZON + 1) * BAR_MS)
    kw = dict(horizon=HORIZON, folds=2, params=TINY, out_dir=tmp_path, label_definition=LABEL_DEFINITION,
              origin=ORIGIN)
    regular = train(df, NAMES, version="regular", **kw).data.last_bar_end
    last = df.filter(pl.col("label").is_not_null())["start"].max()
    assert regular == last + (HORIZON + 1) * BAR_MS
    gap = df.with_columns(pl.when(pl.col("start") == last).then(pl.col("matured_at") + 7 * BAR_MS)
                          .otherwise(pl.col("matured_at")).alias("matured_at"))
    assert train(gap, NAMES, version="gap", **kw).data.last_bar_end == regular + 7 * BAR_MS


def test_train_windows_respect_time_order_and_purge(trained):
    df, _, m, _ = trained
    labelled = df.filter(pl.col("label").is_not_null())
    w = m.training
    assert w.dropped_null_label == 2 * HORIZON and w.rows == labelled.height
    assert w.time_steps == labelled["start"].n_unique() and w.purge_steps == HORIZON
    assert w.start == T0 and w.end == max(mb.train_end for mb in m.members)
    assert sum(w.class_counts.values()) == labelled.height
    prev_end = None
    for mb in m.members:
        # at least HORIZON bars of the grid lie strictly between training and validation
        assert mb.valid_start - mb.train_end >= (HORIZON + 1) * BAR_MS
        in_train = labelled.filter(pl.col("start") <= mb.train_end)
        assert mb.train_rows == in_train.height  # both instruments, all times up to the purge
        assert mb.valid_rows == labelled.filter(pl.col("start").is_between(mb.valid_start, mb.valid_end)).height
        if prev_end is not None:
            assert mb.valid_start > prev_end  # later, non-overlapping blocks
        prev_end = mb.valid_end
    assert m.members[-1].valid_end == labelled["start"].max()


def test_train_metrics_are_finite_and_beat_chance_on_the_planted_signal(trained):
    _, _, m, _ = trained
    for mb in m.members:
        assert all(math.isfinite(v) for v in mb.metrics.values())
        assert mb.metrics["logloss"] < mb.metrics["logloss_prior"] - 0.02 < math.log(3)
        assert mb.metrics["accuracy"] > mb.metrics["accuracy_majority"] + 0.05
        assert mb.metrics["brier"] < 2 / 3 - 0.02  # uniform prediction scores 2/3
        assert mb.metrics["onnx_max_abs_diff"] <= 1e-5
    for key in ("logloss", "brier", "accuracy"):
        assert m.metrics_mean[key] == pytest.approx(np.mean([mb.metrics[key] for mb in m.members]))


def test_train_reports_progress_per_fold(trained):
    *_, calls = trained
    assert [(i, k) for i, k, _ in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert "fold 2/3" in calls[2][2] and "logloss" in calls[2][2]


def test_train_is_deterministic(tmp_path):
    df = synthetic_frame(n_times=300, seed=3)
    kw = dict(horizon=HORIZON, folds=2, params=TINY, out_dir=tmp_path, label_definition=LABEL_DEFINITION,
              origin=ORIGIN)
    a = train(df, NAMES, version="a", **kw)
    b = train(df.sample(fraction=1.0, shuffle=True, seed=5), NAMES, version="b", **kw)  # row order irrelevant
    assert a.files == b.files and a.members[0].metrics == b.members[0].metrics


def test_the_same_model_trained_twice_in_one_second_gets_a_second_version(tmp_path):
    """A schedule of 0 (``train --every 0s``) can train identical files in the same second: the
    default version (time + content hash) would collide; the second gets a suffix."""
    df = synthetic_frame(n_times=300, seed=3)
    at = datetime(2026, 12, 3, 4, 41, 34, tzinfo=timezone.utc)
    kw = dict(horizon=HORIZON, folds=2, params=TINY, out_dir=tmp_path, label_definition=LABEL_DEFINITION,
              origin=ORIGIN, now=lambda: at)
    a, b = train(df, NAMES, **kw), train(df, NAMES, **kw)
    assert a.files == b.files and b.version == a.version + "-2"
    assert {p.name for p in tmp_path.iterdir()} >= {a.version, b.version}


def test_train_purges_rows_whose_label_matures_inside_validation(tmp_path):
    """With a ``matured_at`` column, a training row whose label matured after the validation
    block started (an instrument with missing bars) is dropped from that fold."""
    df = synthetic_frame(n_times=400, instruments=("A",), seed=4)
    df = df.with_columns(matured_at=pl.col("start") + (HORIZON + 1) * BAR_MS)
    kw = dict(horizon=HORIZON, folds=2, params=TINY, out_dir=tmp_path, label_definition=LABEL_DEFINITION,
              origin=ORIGIN)
    base = train(df, NAMES, version="base", **kw)
    fold1 = base.members[1]
    late = fold1.train_end - 5 * BAR_MS  # a training row of fold 1 whose label matures late
    df2 = df.with_columns(pl.when(pl.col("start") == late).then(fold1.valid_start + BAR_MS)
                          .otherwise(pl.col("matured_at")).alias("matured_at"))
    m = train(df2, NAMES, version="late", **kw)
    assert base.members[0].train_rows == m.members[0].train_rows  # fold 0 ends before that row
    assert m.members[1].train_rows == fold1.train_rows - 1


def test_train_argument_errors(tmp_path):
    df = synthetic_frame(n_times=200, instruments=("A",))
    kw = dict(horizon=HORIZON, folds=2, params=TINY, out_dir=tmp_path, label_definition=LABEL_DEFINITION,
              origin=ORIGIN)
    with pytest.raises(ValueError, match="lacks feature columns \\['nope'\\]"):
        train(df, NAMES + ["nope"], **kw)
    with pytest.raises(ValueError, match="purge"):
        train(df, NAMES, purge=HORIZON - 1, **kw)
    with pytest.raises(ValueError, match="horizon 5 != horizon 3"):
        train(df, NAMES, **{**kw, "label_definition": {"horizon": 5}})
    with pytest.raises(ValueError, match="fixed to 'multiclass'"):
        train(df, NAMES, **{**kw, "params": {"objective": "binary"}})
    with pytest.raises(ValueError, match="labels must be 0"):
        train(df.with_columns(label=pl.col("label") + 1), NAMES, **kw)
    with pytest.raises(ValueError, match="too few"):
        train(df.head(4), NAMES, **kw)
    with pytest.raises(ValueError, match="lacks column 'exchange'"):
        train(df.drop("exchange"), NAMES, **kw)
    with pytest.raises(TypeError, match="origin must be a DataOrigin"):
        train(df, NAMES, **{**kw, "origin": {"store": "x"}})
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        train(df, NAMES, version="taken", **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # nothing half-written left


# ------------------------------------------------------------------------- feature importances


def one_feature_decides(n_times: int = 600, seed: int = 11) -> pl.DataFrame:
    """Two instruments; ``signal`` alone decides the label (up above 0.4, down below -0.4, up to a
    little noise that is no feature), ``noise_a`` / ``noise_b`` are independent of everything, and
    ``empty`` is missing throughout."""
    rng = np.random.default_rng(seed)
    n = 2 * n_times
    signal = rng.normal(size=n)
    latent = signal + 0.2 * rng.normal(size=n)
    label = np.where(latent > 0.4, 2, np.where(latent < -0.4, 0, 1))
    return pl.DataFrame({
        "exchange": ["x"] * n, "symbol": np.tile(np.array(["A", "B"]), n_times),
        "start": np.repeat(T0 + np.arange(n_times) * BAR_MS, 2), "label": pl.Series(label).cast(pl.Int8),
        "noise_a": rng.normal(size=n), "signal": signal, "noise_b": rng.normal(size=n), "empty": np.full(n, np.nan),
    })


def test_manifest_ranks_features_by_gain_summed_over_the_members(tmp_path):
    names = ["noise_a", "signal", "noise_b", "empty"]  # the informative one is not first: ranks are sorted
    m = train(one_feature_decides(), names, horizon=HORIZON, folds=3, params=TINY, out_dir=tmp_path,
              label_definition=LABEL_DEFINITION, origin=ORIGIN)
    imp = m.importances
    assert sorted(i.feature for i in imp) == sorted(names)  # every input feature, once, by its own name
    gains = [i.gain for i in imp]
    assert gains == sorted(gains, reverse=True)
    assert sum(i.share for i in imp) == pytest.approx(1.0, abs=1e-12)
    assert all(i.share == pytest.approx(i.gain / sum(gains), rel=1e-12) for i in imp)
    by = {i.feature: i for i in imp}
    assert imp[0].feature == "signal" and by["signal"].share > 0.8
    assert max(by["noise_a"].gain, by["noise_b"].gain) < by["signal"].gain / 10
    assert by["empty"].gain == 0.0 and by["empty"].share == 0.0 and imp[-1].feature == "empty"
    # the sum over the members, recomputed from the LightGBM files the artefact holds
    folder = tmp_path / m.version
    total = sum(lightgbm.Booster(model_file=str(folder / mb.lgb_file)).feature_importance(importance_type="gain")
                for mb in m.members)
    assert len(m.members) == 3 and np.all(total[names.index("signal")] > 0)
    assert [by[f].gain for f in names] == pytest.approx(total.tolist(), rel=1e-9)
    assert load_manifest(folder).importances == imp


def test_importances_cover_only_features_that_carry_values_and_rank_the_planted_signal_high(trained):
    _, _, m, _ = trained
    assert [i.feature for i in m.importances] != NAMES and sorted(i.feature for i in m.importances) == sorted(NAMES)
    used = {i.feature for i in m.importances if i.gain > 0}
    assert used <= set(FILLED) and len(used) > len(SIGNAL)  # all-NaN columns are never split on
    top = [i.feature for i in m.importances[:len(SIGNAL)]]
    assert sorted(top) == sorted(SIGNAL), [(i.feature, round(i.share, 3)) for i in m.importances[:6]]


def test_a_manifest_written_before_importances_still_loads(trained):
    _, out, m, _ = trained
    raw = json.loads((out / m.version / MANIFEST_FILE).read_bytes())
    assert raw["importances"][0] == {"feature": m.importances[0].feature, "gain": m.importances[0].gain,
                                     "share": m.importances[0].share}
    del raw["importances"]
    old = out / "before-issue-13"
    old.mkdir()
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    loaded = load_manifest(old)
    assert loaded.importances == [] and loaded.version == m.version and loaded.members == m.members


def test_load_manifest_names_the_broken_file(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text('{"format": 2, "version": "x"}')
    with pytest.raises(ValueError, match="invalid manifest .*manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"format": 1, "version": "x"}')  # before `data` was recorded
    with pytest.raises(ValueError, match="has format 1 .*recorded what they were trained on.*retrain"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing")
