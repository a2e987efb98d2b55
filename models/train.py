"""Offline training (SPEC §5): K LightGBM multiclass models on walk-forward folds, exported to ONNX
with a manifest, written as one versioned folder that appears atomically.

    frame (features + label + time)  ──►  walk-forward folds with a purge gap  ──►  LightGBM per fold
        ──►  ONNX per fold (onnxmltools, float input "features" [N, n_features], output
             "probabilities" [N, 3] = p_down, p_flat, p_up)  ──►  out_dir/<version>/
                                                                       model_0.onnx ... model_{K-1}.onnx
                                                                       model_<k>.lgb.txt (LightGBM)
                                                                       manifest.json

Fold k validates on a contiguous later block of time and trains on everything before it except the
last ``purge`` time steps (purge >= label horizon, so no training label overlaps the validation
block). The validation block is never used for fitting (no early stopping on it), so the fold
metrics in the manifest are out of sample.

ONNX parity. The converted graph compares float32 inputs with float32 thresholds, LightGBM compares
doubles. Before conversion every split is rewritten into an equivalent one for float32 inputs:
the threshold ``t`` is rounded DOWN to a float32 (for a float32 ``x``: ``x <= t`` iff
``x <= f32_down(t)``; rounding to nearest, as a plain conversion does, flips the split for an input
equal to the rounded-up threshold), and a split on a feature that had no NaN in training
(LightGBM: NaN is read as 0.0) becomes an explicit "missing goes left iff 0 <= t" split. Training
uses the float32 values too, so the rewritten booster predicts exactly like the trained one and the
ONNX graph agrees with LightGBM up to float32 summation (~1e-7), NaN rows included; ``train`` checks
this on every validation block and refuses to write an artefact that misses ``parity_tol``.

What it was trained on. The manifest's ``data`` (``TrainingData``) records the store the rows came
from (``DataOrigin.store``: the DSN with its password masked, see ``dataflows.training.store_identity``,
and the database), the instruments, the primary and overlay timeframes and the span of bars the
training read: ``last_bar_end`` is the end of the latest bar whose data any training row used, its
features or its label (a label reads the close ``horizon`` bars later). The runtime
(``models.onnx_ensemble``) serves an ensemble only to that store and those instruments, and never
to a bar starting before ``last_bar_end``.

Calibration and the deployment gate (issue 12; ``models.calibration``, ``models.deployment``). Member
k is out of sample on every validation block from its own on, so on the last block the whole
ensemble is: its calibration map (vector scaling shrunk toward the raw output) is fitted there and
recorded in the manifest (``calibration``), and the runtime applies it. The gate measures the
same procedure out of sample (cross-fitted maps, earlier blocks with the members trained before
them) against the class prior and the model serving now (``incumbent``); the manifest records its
decision (``deployment``), and a rejected version is written but never served. The members' own
probabilities stay uncalibrated (they are votes).

Feature importances (issue 13). The manifest's ``importances`` holds every input feature's LightGBM
split gain (``feature_importance(importance_type="gain")``) summed over the members and its share of
the ensemble's total gain, by gain descending (a feature never split on: gain 0); manifests written
before it have none (``[]``). ``dataflows.training`` copies them to the ``model_importances`` table.

Heavy libraries (lightgbm, onnxmltools, onnxruntime) are imported inside the functions that need
them: ``Manifest``, ``load_manifest`` and ``feature_matrix`` are light and shared with the runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import msgspec
import numpy as np
import polars as pl

from models.calibration import classwise_ece, cross_fitted, shrunk
from models.deployment import Calibration, Deployment, Evidence, GateRule, Incumbent, decide

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2  # 2: ``data`` (what it was trained on) is recorded
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
CLASSES = ["down", "flat", "up"]  # class index = operators.labels DOWN, FLAT, UP
TMP_PREFIX = ".tmp-"  # folders being written; readers ignore names starting with "."
LIBRARIES = ("lightgbm", "onnxmltools", "onnx", "onnxruntime", "numpy", "polars", "msgspec")

# LightGBM defaults; the caller's ``params`` override them (the forced ones below cannot be).
# Small trees, few rounds, a third of the features per tree and a strong L2: a day of 5m bars is a
# few hundred rows against ~200 features. Measured on the main job's tapes (seeds 7-9, issue 12):
# 200 rounds of 15 leaves over-fitted (raw out-of-sample log loss above the class prior, a
# calibration slope of 0.4); these beat the prior by 0.035-0.05 nats on the following day, nearly
# calibrated before any calibration.
DEFAULT_PARAMS: dict[str, Any] = {
    "num_iterations": 120,
    "learning_rate": 0.05,
    "num_leaves": 3,
    "min_data_in_leaf": 60,
    "feature_fraction": 0.3,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 10.0,
    "num_threads": 1,
    "force_row_wise": True,
    "verbosity": -1,
}
_FORCED = {"objective": "multiclass", "num_class": 3, "deterministic": True,
           "use_missing": True, "zero_as_missing": False}


# ------------------------------------------------------------------------------------ manifest


class Member(msgspec.Struct, kw_only=True):
    """One fold's model: its file, hash, training and validation windows and OOS metrics."""

    name: str  # "onnx_<fold>"
    fold: int
    file: str  # "model_<fold>.onnx", relative to the version folder
    sha256: str
    lgb_file: str  # "model_<fold>.lgb.txt": the LightGBM model itself (audit, parity re-checks)
    lgb_sha256: str
    num_trees: int
    train_rows: int
    train_start: int
    train_end: int
    valid_rows: int
    valid_start: int
    valid_end: int
    metrics: dict[str, float]  # logloss, brier, accuracy (+ prior baselines, onnx_max_abs_diff)


class TrainingWindow(msgspec.Struct, kw_only=True):
    time_col: str
    start: int  # min time of any training row (over all folds)
    end: int  # max time of any training row
    rows: int  # labelled rows used (training ∪ validation)
    train_rows: int  # rows that trained at least one member
    dropped_null_label: int
    time_steps: int  # distinct times
    purge_steps: int
    min_train_steps: int
    class_counts: dict[str, int]


class DataOrigin(msgspec.Struct, frozen=True, kw_only=True):
    """Where a training frame's rows come from (the caller knows; ``train`` cannot see it)."""

    store: str  # identity of the store: DSN with the password masked (dataflows.training.store_identity)
    database: str
    primary_tf: str  # the rows' timeframe
    overlay_tfs: list[str]  # overlays aligned onto each row (their features are prefixed "<tf>_")


class TrainingData(msgspec.Struct, kw_only=True):
    """What an ensemble was trained on: the runtime serves it only to the same store and
    instruments, and only for bars starting at or after ``last_bar_end``."""

    store: str
    database: str
    instruments: list[str]  # "exchange:symbol", sorted
    primary_tf: str
    overlay_tfs: list[str]
    first_bar_end: int  # ms: end of the earliest labelled row
    last_bar_end: int  # ms: end of the latest bar any training row read (labelled rows' ends, and the
    #                    bars whose close matured their labels: >= latest row end + horizon bars)
    rows: int  # labelled rows (training and validation)


def describe_data(frame: pl.DataFrame, origin: DataOrigin, *, horizon: int, time_col: str = "start") -> TrainingData:
    """``TrainingData`` of the labelled rows ``frame`` (``exchange``, ``symbol``, ``time_col`` = bar
    start in ms, optional ``matured_at`` ms). A label matures when the bar ``horizon`` bars later
    closes, so the span ends at the latest of (row end + horizon bars) and ``matured_at``."""
    from operators.bars import TIMEFRAMES

    if origin.primary_tf not in TIMEFRAMES:
        raise ValueError(f"unknown primary timeframe {origin.primary_tf!r}; known: {list(TIMEFRAMES)}")
    for c in ("exchange", "symbol"):
        if c not in frame.columns:
            raise ValueError(f"frame lacks column {c!r} (the instruments are part of the manifest)")
    if frame.height == 0:
        raise ValueError("no labelled rows to describe")
    bar_ms = TIMEFRAMES[origin.primary_tf]
    starts = frame[time_col].cast(pl.Int64)
    last = int(starts.max()) + bar_ms + horizon * bar_ms
    if "matured_at" in frame.columns and frame["matured_at"].null_count() < frame.height:
        last = max(last, int(frame["matured_at"].cast(pl.Int64).max()))
    instruments = frame.select(pl.concat_str("exchange", pl.lit(":"), "symbol").alias("i").unique())["i"].to_list()
    return TrainingData(store=origin.store, database=origin.database, instruments=sorted(instruments),
                        primary_tf=origin.primary_tf, overlay_tfs=list(origin.overlay_tfs),
                        first_bar_end=int(starts.min()) + bar_ms, last_bar_end=last, rows=frame.height)


class Importance(msgspec.Struct, frozen=True, kw_only=True):
    """One input feature's LightGBM split gain summed over the ensemble's members, and its share of
    the ensemble's total gain (``gain_importances``)."""

    feature: str
    gain: float
    share: float  # gain / total gain of all features (0 for all when no member split at all)


class Manifest(msgspec.Struct, kw_only=True):
    format: int
    version: str
    created_at: str  # ISO 8601 UTC
    created_at_ms: int
    features: list[str]  # exact input column order of every member
    label: dict[str, Any]  # the caller's label definition (horizon, classes, band rule)
    horizon: int
    classes: list[str]
    input_name: str
    output_name: str
    folds: int
    seed: int
    training: TrainingWindow
    data: TrainingData  # what it was trained on (store, instruments, timeframes, span)
    members: list[Member]
    metrics_mean: dict[str, float]
    params: dict[str, Any]  # LightGBM parameters as trained (num_iterations included)
    files: dict[str, str]  # file -> sha256
    libraries: dict[str, str]
    calibration: Optional[Calibration] = None  # the ensemble's calibration map (None: written before issue 12)
    deployment: Optional[Deployment] = None  # the deployment gate's decision (None: never gated, never served)
    # every feature's gain summed over the members, by gain descending ([]: written before issue 13)
    importances: list[Importance] = msgspec.field(default_factory=list)

    @property
    def n_features(self) -> int:
        return len(self.features)


class _Format(msgspec.Struct):
    format: int = 0


def load_manifest(path: Path | str) -> Manifest:
    """Read ``manifest.json`` (``path`` is the file or its version folder). Raises ValueError naming
    the file when it is missing fields, has wrong types or is not JSON."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read manifest {p}: {e}") from e
    try:
        fmt = msgspec.json.decode(raw, type=_Format).format
        if fmt != MANIFEST_FORMAT:
            old = " (written before manifests recorded what they were trained on)" if fmt < 2 else ""
            raise ValueError(f"manifest {p} has format {fmt}{old}, this code reads {MANIFEST_FORMAT}: "
                             "retrain it (tapeflow train)")
        m = msgspec.json.decode(raw, type=Manifest)
    except msgspec.DecodeError as e:
        raise ValueError(f"invalid manifest {p}: {e}") from e
    if not m.members or len(m.features) == 0 or len(set(m.features)) != len(m.features):
        raise ValueError(f"manifest {p} needs at least one member and unique feature names")
    return m


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------- helpers


def feature_matrix(frame: pl.DataFrame, feature_names: Sequence[str]) -> np.ndarray:
    """float32 matrix [rows, features] in ``feature_names`` order; null -> NaN. Raises ValueError
    naming the columns that are missing."""
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing}")
    if not feature_names:
        return np.empty((frame.height, 0), dtype=np.float32)
    sub = frame.select([pl.col(c).cast(pl.Float64).fill_null(float("nan")) for c in feature_names])
    return np.ascontiguousarray(sub.to_numpy().astype(np.float32, copy=False))


def walk_forward_splits(n_rows: int, folds: int, purge: int, min_train: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Expanding-window walk-forward splits over ``n_rows`` rows in time order.

    The rows after the first ``min_train + purge`` are cut into ``folds`` contiguous validation
    blocks (sizes differ by at most one, the later blocks take the remainder). Fold k trains on
    rows ``[0, v0 - purge)`` where ``v0`` is its first validation row: only rows before the block,
    with a gap of ``purge`` rows (>= the label horizon) between the last training row and the
    first validation row. Nothing after a validation block trains its fold, so no embargo is
    needed. Returns ``[(train_idx, valid_idx), ...]`` as int64 arrays.

    >>> [(t.tolist(), v.tolist()) for t, v in walk_forward_splits(10, 2, 1, 4)]
    [([0, 1, 2, 3], [5, 6]), ([0, 1, 2, 3, 4, 5], [7, 8, 9])]
    """
    for name, v in (("n_rows", n_rows), ("folds", folds), ("purge", purge), ("min_train", min_train)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"walk_forward_splits: {name} must be an int, got {type(v).__name__}")
    if folds < 1:
        raise ValueError(f"walk_forward_splits: folds must be >= 1, got {folds}")
    if purge < 0:
        raise ValueError(f"walk_forward_splits: purge must be >= 0 rows, got {purge}")
    if min_train < 1:
        raise ValueError(f"walk_forward_splits: min_train must be >= 1 row, got {min_train}")
    need = min_train + purge + folds
    if n_rows < need:
        raise ValueError(
            f"walk_forward_splits: {n_rows} rows are too few for min_train={min_train} + purge={purge}"
            f" + {folds} validation block(s) of at least one row (need >= {need})")
    size, extra = divmod(n_rows - min_train - purge, folds)
    out = []
    v0 = min_train + purge
    for k in range(folds):
        v1 = v0 + size + (1 if k >= folds - extra else 0)
        out.append((np.arange(0, v0 - purge, dtype=np.int64), np.arange(v0, v1, dtype=np.int64)))
        v0 = v1
    return out


def gain_importances(gains: Sequence[np.ndarray], feature_names: Sequence[str]) -> list[Importance]:
    """Every feature's gain summed over the members' ``booster.feature_importance(importance_type=
    "gain")`` arrays (``gains``, one per member, in ``feature_names`` order) and its share of the
    total, by gain descending (ties in input order). With no split in any member every share is 0."""
    total_by_feature = np.zeros(len(feature_names), dtype=np.float64)
    for g in gains:
        g = np.asarray(g, dtype=np.float64)
        if g.shape != total_by_feature.shape:
            raise ValueError(f"a member's importances have shape {g.shape}, expected ({len(feature_names)},)")
        total_by_feature += g
    total = float(total_by_feature.sum())
    order = np.argsort(-total_by_feature, kind="stable")
    return [Importance(feature=feature_names[i], gain=float(total_by_feature[i]),
                       share=float(total_by_feature[i] / total) if total > 0 else 0.0) for i in order]


def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """logloss (probabilities clipped to [1e-15, 1]), multiclass Brier (sum over classes of
    (p - onehot)^2, averaged over rows) and accuracy."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    return {
        "logloss": float(-np.mean(np.log(np.clip(p[np.arange(n), y], 1e-15, 1.0)))),
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "accuracy": float(np.mean(p.argmax(axis=1) == y)),
    }


# ------------------------------------------------------------------------------ ONNX conversion


def _float32_splits(model_text: str) -> str:
    """LightGBM model text with every numerical split rewritten to act identically on float32
    inputs when compared in float32 (see the module docstring). Raises ValueError on categorical
    or zero-as-missing splits, which the ONNX tree ensemble cannot reproduce exactly."""
    lines = model_text.split("\n")
    thr_at = dt_at = None
    out = []
    for i, line in enumerate(lines):
        if line.startswith("tree_sizes="):  # sizes change with the text; LightGBM parses without
            continue
        if line.startswith("Tree="):
            thr_at = dt_at = None
        elif line.startswith("threshold="):
            thr_at = len(out)
        elif line.startswith("decision_type="):
            dt_at = len(out)
        out.append(line)
        if thr_at is not None and dt_at is not None:
            t = np.array(out[thr_at][len("threshold="):].split(), dtype=np.float64)
            dt = np.array(out[dt_at][len("decision_type="):].split(), dtype=np.int64)
            if len(t) != len(dt):
                raise ValueError("unexpected LightGBM model text: threshold/decision_type lengths differ")
            if np.any(dt & 1):
                raise ValueError("categorical splits cannot be exported with exact ONNX parity")
            missing = (dt >> 2) & 3  # 0 none, 1 zero, 2 NaN
            if np.any(missing == 1):
                raise ValueError("zero_as_missing splits cannot be exported with exact ONNX parity")
            with np.errstate(over="ignore"):
                t32 = t.astype(np.float32)
            up = t32.astype(np.float64) > t
            t32[up] = np.nextafter(t32[up], np.float32(-np.inf))
            t_new = t32.astype(np.float64)
            default_left = np.where(missing == 0, (0.0 <= t_new).astype(np.int64), (dt >> 1) & 1)
            new_dt = (2 << 2) | (default_left << 1)  # NaN-missing, explicit default direction
            out[thr_at] = "threshold=" + " ".join(repr(float(x)) for x in t_new)
            out[dt_at] = "decision_type=" + " ".join(str(int(x)) for x in new_dt)
            thr_at = dt_at = None
    return "\n".join(out)


def booster_to_onnx(booster, n_features: int, *, check: Optional[np.ndarray] = None):
    """ONNX ModelProto of a multiclass booster: input ``features`` float [N, n_features], outputs
    ``label`` int64 [N] and ``probabilities`` float [N, 3] (no ZipMap). When ``check`` (a float32
    matrix) is given, asserts the float32-rewritten booster predicts exactly like ``booster``."""
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    rewritten = lgb.Booster(model_str=_float32_splits(booster.model_to_string()))
    if check is not None and len(check):
        if not np.array_equal(rewritten.predict(check), booster.predict(check)):
            raise RuntimeError("float32 split rewrite changed LightGBM predictions (bug)")
    onx = convert_lightgbm(rewritten, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                           zipmap=False)
    for out in onx.graph.output:  # the converter declares `label` as [1]; both are [N, ...]
        dims = out.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    onx.graph.name = "tapeflow_lightgbm"  # the converter names the graph with a random uuid
    names = [o.name for o in onx.graph.output]
    if OUTPUT_NAME not in names or onx.graph.input[0].name != INPUT_NAME:
        raise RuntimeError(f"unexpected ONNX graph from onnxmltools: inputs "
                           f"{[i.name for i in onx.graph.input]}, outputs {names}")
    return onx


LGB_ZERO_THRESHOLD = np.float32(1e-35)  # LightGBM's kZeroThreshold


def as_lightgbm_sees(x: np.ndarray) -> np.ndarray:
    """``x`` (float32) as LightGBM's input parser reads it: values with |x| <= 1e-35 (its
    kZeroThreshold) are zero there, so the ONNX graph must get zero too, or a split at
    -1e-35 (LightGBM puts zero-bin bounds there) goes the other way. Returns a copy only when needed."""
    tiny = np.abs(x) <= LGB_ZERO_THRESHOLD
    tiny &= x != 0
    if not tiny.any():
        return x
    x = x.copy()
    x[tiny] = 0.0
    return x


def _onnx_probs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: as_lightgbm_sees(x)})[0]


# ------------------------------------------------------------------------------------- training


def _params(params: Optional[dict], seed: int) -> dict:
    p = dict(DEFAULT_PARAMS)
    p["seed"] = seed
    for k, v in (params or {}).items():
        if k in _FORCED and v != _FORCED[k]:
            raise ValueError(f"LightGBM param {k}={v!r} is fixed to {_FORCED[k]!r} here")
        if k in ("num_boost_round", "n_estimators", "num_iteration", "num_tree", "num_trees", "num_round"):
            k = "num_iterations"
        p[k] = v
    p.update(_FORCED)
    if not (isinstance(p["num_iterations"], int) and p["num_iterations"] >= 1):
        raise ValueError(f"num_iterations must be a positive int, got {p['num_iterations']!r}")
    return p


def _default_version(created: datetime, files: dict[str, str], features: list[str], params: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([files, features, params], sort_keys=True, default=str).encode())
    return created.strftime("%Y%m%dT%H%M%SZ") + "-" + h.hexdigest()[:8]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def train(
    frame: pl.DataFrame,
    feature_names: list[str],
    *,
    label_col: str = "label",
    time_col: str = "start",
    horizon: int,
    folds: int = 4,
    params: Optional[dict] = None,
    seed: int = 7,
    out_dir: Path,
    version: Optional[str] = None,
    label_definition: dict,
    origin: DataOrigin,
    progress: Optional[Callable[[int, int, str], None]] = None,
    purge: Optional[int] = None,
    min_train: Optional[int] = None,
    parity_tol: float = 1e-5,
    now: Optional[Callable[[], datetime]] = None,
    gate: Optional[GateRule] = None,
    incumbent: Optional[Incumbent] = None,
) -> Manifest:
    """Train ``folds`` LightGBM models walk-forward on ``frame`` and write ``out_dir/<version>/``.

    ``frame``: one row per (instrument, bar) with ``time_col`` (int ms), ``label_col`` (0 down,
    1 flat, 2 up; null = not matured, dropped) and the ``feature_names`` columns (null/NaN =
    missing). Rows are sorted by time across instruments. Splits are made over DISTINCT times, not
    rows: with several instruments interleaved, ``purge`` rows would be fewer than ``purge`` bars
    of each instrument. ``purge`` (time steps, default ``horizon``, never less) separates the last
    training time from the first validation time; when the frame has a ``matured_at`` column,
    training rows whose label matured after the validation block starts are dropped as well (an
    instrument with missing bars). ``min_train`` (time steps) defaults to one validation block.

    ``origin``: the store and timeframes the rows come from; with the instruments and the span of
    the labelled rows it becomes the manifest's ``data`` (what the runtime checks before serving).
    ``progress(i, k, message)`` is called with i=0 before the first fold and i=1..k after each.
    ``parity_tol``: largest allowed |ONNX - LightGBM| probability on each validation block (else
    RuntimeError, nothing written). ``now``: returns the aware UTC ``created_at`` (tests pin it).
    ``gate``: the deployment gate's thresholds (default ``GateRule()``); ``incumbent``: the model
    serving now, which the candidate must beat too (module docstring; None: nothing is serving).
    Returns the manifest, whose ``deployment`` says whether the version may be served; the folder
    appears complete in one rename (a watcher never sees half).
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1 (bars), got {horizon!r}")
    if not isinstance(label_definition, dict):
        raise TypeError("label_definition must be a dict (horizon, classes, band rule)")
    if label_definition.get("horizon", horizon) != horizon:
        raise ValueError(f"label_definition horizon {label_definition['horizon']} != horizon {horizon}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2 (the calibration is fitted on earlier validation blocks than "
                         f"the one the deployment gate measures), got {folds!r}")
    purge = horizon if purge is None else purge
    if purge < horizon:
        raise ValueError(f"purge ({purge} steps) must be >= the label horizon ({horizon})")
    feature_names = list(feature_names)
    if not feature_names or len(set(feature_names)) != len(feature_names):
        raise ValueError("feature_names must be a non-empty list of unique names")
    if not isinstance(origin, DataOrigin):
        raise TypeError("origin must be a DataOrigin (store, database, primary_tf, overlay_tfs)")
    for c in (label_col, time_col, "exchange", "symbol"):
        if c not in frame.columns:
            raise ValueError(f"frame lacks column {c!r}")
    if version is not None and (not version or version.startswith(".") or "/" in version or os.sep in version):
        raise ValueError(f"version {version!r} must be a plain folder name not starting with '.'")
    if version is not None and (Path(out_dir) / version).exists():
        raise FileExistsError(f"artefact version {Path(out_dir) / version} already exists; pass another version")
    params_used = _params(params, seed)
    report = progress or (lambda i, k, msg: None)

    n_all = frame.height
    sort_cols = [time_col] + [c for c in ("exchange", "symbol", "tf") if c in frame.columns]
    df = frame.filter(pl.col(label_col).is_not_null() & pl.col(time_col).is_not_null()).sort(
        sort_cols, maintain_order=True)
    dropped = n_all - df.height
    if df.height == 0:
        raise ValueError(f"no labelled rows to train on ({n_all} rows, none with a matured label)")
    trained_on = describe_data(df, origin, horizon=horizon, time_col=time_col)
    y = df[label_col].cast(pl.Int64).to_numpy()
    if len(y) and (y.min() < 0 or y.max() > 2):
        raise ValueError(f"labels must be 0 (down), 1 (flat) or 2 (up); found {sorted(set(y.tolist()))[:10]}")
    x = feature_matrix(df, feature_names)
    times = df[time_col].cast(pl.Int64).to_numpy()
    steps, step_of = np.unique(times, return_inverse=True)
    n_steps = len(steps)
    if min_train is None:
        min_train = max(1, (n_steps - purge) // (folds + 1))
    try:
        splits = walk_forward_splits(n_steps, folds, purge, min_train)
    except ValueError as e:
        raise ValueError(f"cannot split {len(y)} labelled rows over {n_steps} distinct times into {folds} "
                         f"walk-forward folds (purge {purge}, min_train {min_train} time steps): {e}") from None
    matured = df["matured_at"].cast(pl.Int64).to_numpy() if "matured_at" in df.columns else None

    import lightgbm as lgb

    created = (now or (lambda: datetime.now(timezone.utc)))()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{TMP_PREFIX}{version or 'new'}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    members: list[Member] = []
    files: dict[str, str] = {}
    graphs: list[bytes] = []  # each member's ONNX graph
    blocks: list[np.ndarray] = []  # each fold's validation rows
    own: list[np.ndarray] = []  # each member's probabilities on its own block
    priors: list[np.ndarray] = []  # each fold's class frequencies in training
    gains: list[np.ndarray] = []  # each member's split gain per feature
    trained = np.zeros(len(y), dtype=bool)
    rounds = params_used["num_iterations"]
    lgb_params = {k: v for k, v in params_used.items() if k != "num_iterations"}
    report(0, folds, f"training {folds} folds on {len(y)} rows ({n_steps} time steps, {len(feature_names)} features)")
    try:
        for k, (tr_steps, va_steps) in enumerate(splits):
            tr = step_of < len(tr_steps)  # steps [0, v0 - purge)
            va = (step_of >= va_steps[0]) & (step_of <= va_steps[-1])
            if matured is not None:
                tr &= ~(matured > steps[va_steps[0]])  # null matured_at (unlikely) kept
            tr_idx, va_idx = np.flatnonzero(tr), np.flatnonzero(va)
            if len(tr_idx) == 0:
                raise ValueError(f"fold {k} has no training rows after purging")
            trained[tr_idx] = True
            ds = lgb.Dataset(x[tr_idx], label=y[tr_idx], feature_name=feature_names,
                             params={"verbosity": -1}, free_raw_data=True)
            booster = lgb.train(lgb_params, ds, num_boost_round=rounds)
            gains.append(booster.feature_importance(importance_type="gain"))
            xv, yv = x[va_idx], y[va_idx]
            onx = booster_to_onnx(booster, len(feature_names), check=xv)
            data = onx.SerializeToString()
            p_onnx = _onnx_probs(data, xv)
            diff = float(np.max(np.abs(p_onnx - booster.predict(xv)))) if len(xv) else 0.0
            if not diff <= parity_tol:
                raise RuntimeError(f"fold {k}: ONNX and LightGBM probabilities differ by {diff:.3g} "
                                   f"(> {parity_tol}); not writing the artefact")
            metrics = classification_metrics(p_onnx, yv)
            graphs.append(data)
            blocks.append(va_idx)
            own.append(p_onnx.astype(np.float64))
            prior = np.bincount(y[tr_idx], minlength=3) / len(tr_idx)
            priors.append(prior)
            metrics["logloss_prior"] = classification_metrics(np.tile(prior, (len(yv), 1)), yv)["logloss"]
            metrics["accuracy_majority"] = float(np.mean(yv == int(prior.argmax())))
            metrics["onnx_max_abs_diff"] = diff
            fname, lname = f"model_{k}.onnx", f"model_{k}.lgb.txt"
            text = booster.model_to_string().encode()
            (tmp / fname).write_bytes(data)
            (tmp / lname).write_bytes(text)
            files[fname], files[lname] = sha256_bytes(data), sha256_bytes(text)
            members.append(Member(
                name=f"onnx_{k}", fold=k, file=fname, sha256=files[fname],
                lgb_file=lname, lgb_sha256=files[lname],
                num_trees=booster.num_trees(),
                train_rows=len(tr_idx), train_start=int(times[tr_idx].min()), train_end=int(times[tr_idx].max()),
                valid_rows=len(va_idx), valid_start=int(times[va_idx].min()), valid_end=int(times[va_idx].max()),
                metrics=metrics,
            ))
            report(k + 1, folds, f"fold {k + 1}/{folds}: train {len(tr_idx)} rows, valid {len(va_idx)}: "
                                 f"logloss {metrics['logloss']:.4f} (prior {metrics['logloss_prior']:.4f}), "
                                 f"brier {metrics['brier']:.4f}, accuracy {metrics['accuracy']:.3f}")

        calibration, deployment = _calibrate_and_gate(
            graphs, blocks, own, priors, x, y, times, df, horizon, gate or GateRule(), incumbent)
        metric_names = members[0].metrics.keys()
        mean = {m: float(np.mean([mb.metrics[m] for mb in members])) for m in metric_names}
        mean["onnx_max_abs_diff"] = max(mb.metrics["onnx_max_abs_diff"] for mb in members)
        if version is None:  # the same files trained twice in one second (a schedule of 0): a suffix
            version = base = _default_version(created, files, feature_names, params_used)
            k = 1
            while (Path(out_dir) / version).exists():
                k += 1
                version = f"{base}-{k}"
        tr_times = times[trained]
        counts = np.bincount(y, minlength=3)
        manifest = Manifest(
            format=MANIFEST_FORMAT,
            version=version,
            created_at=created.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            created_at_ms=int(created.timestamp() * 1000),
            features=feature_names,
            label=dict(label_definition),
            horizon=horizon,
            classes=list(CLASSES),
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            folds=folds,
            seed=seed,
            training=TrainingWindow(
                time_col=time_col, start=int(tr_times.min()), end=int(tr_times.max()), rows=len(y),
                train_rows=int(trained.sum()), dropped_null_label=dropped, time_steps=n_steps,
                purge_steps=purge, min_train_steps=min_train,
                class_counts={c: int(n) for c, n in zip(CLASSES, counts)},
            ),
            data=trained_on,
            members=members,
            metrics_mean=mean,
            params=params_used,
            files=files,
            libraries=library_versions(),
            calibration=calibration,
            deployment=deployment,
            importances=gain_importances(gains, feature_names),
        )
        (tmp / MANIFEST_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        final = out_dir / version
        if final.exists():
            raise FileExistsError(f"artefact version {final} already exists; pass another version")
        os.rename(tmp, final)
        _fsync(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote ONNX artefact %s (%d members, mean logloss %.4f), %s: %s", final, len(members), mean["logloss"],
             deployment.status, deployment.reason)
    return manifest


def _calibrate_and_gate(graphs: list[bytes], blocks: list[np.ndarray], own: list[np.ndarray],
                        priors: list[np.ndarray], x: np.ndarray, y: np.ndarray, times: np.ndarray,
                        df: pl.DataFrame, horizon: int, rule: GateRule,
                        incumbent: Optional[Incumbent]) -> tuple[Calibration, Deployment]:
    """The ensemble's calibration map and the deployment decision (``models.deployment``)."""
    so_far = []  # block j: mean of members 0..j, each out of sample there
    for j, rows in enumerate(blocks):
        total = own[j].copy()
        for i in range(j):
            total += _onnx_probs(graphs[i], x[rows]).astype(np.float64)
        so_far.append(total / (j + 1))

    def evidence(j: int) -> Evidence:
        rows = blocks[j]
        return Evidence(times=times[rows], y=y[rows], raw=so_far[j],
                        cand=cross_fitted(so_far[j], y[rows], times[rows]),
                        prior=np.tile(priors[j], (len(rows), 1)))

    parts = [evidence(j) for j in range(1, len(blocks))]  # ensembles of two members or more
    record = Evidence(**{f: np.concatenate([getattr(e, f) for e in parts]) for f in Evidence.__struct_fields__})
    span, last = parts[-1], blocks[-1]  # the last block: the served ensemble itself, all members
    served = shrunk(span.raw, span.y)
    active = None
    if incumbent is not None:
        sub = df[last]
        inst = (sub["exchange"] + ":" + sub["symbol"]).to_numpy()
        mask = span.times > incumbent.after
        if incumbent.instruments is not None:
            mask &= np.isin(inst, list(incumbent.instruments))
        probs = np.empty((0, 3))
        if mask.any():
            try:
                probs = np.asarray(incumbent.predict(sub.filter(pl.Series(mask))), dtype=np.float64)
            except ValueError as e:  # it reads features this frame lacks: it cannot be compared
                log.warning("the active ensemble %s cannot score the validation span: %s", incumbent.version, e)
                mask = np.zeros_like(mask)
        active = (incumbent.version, mask, probs)
    deployment = decide(rule=rule, lags=horizon, record=record, span=span, active=active,
                        ece=classwise_ece(span.cand, span.y), ece_raw=classwise_ece(span.raw, span.y))
    calibration = Calibration(ensemble=served, fit_rows=len(last), fit_start=int(span.times.min()),
                              fit_end=int(span.times.max()))
    return calibration, deployment
