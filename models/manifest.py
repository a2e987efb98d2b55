"""The manifest of an ONNX artefact version: what a version folder holds, what it was trained on,
the feature importances, and reading it back (light: shared by training and the runtime).

    out_dir/<version>/  model_0.onnx ... model_{K-1}.onnx, model_<k>.lgb.txt (LightGBM), manifest.json

What it was trained on. The manifest's ``data`` (``TrainingData``) records the store the rows came
from (``DataOrigin.store``: the DSN with its password masked, see ``dataflows.model_io.store_identity``,
and the database), the instruments, the primary and overlay timeframes and the span of bars the
training read: ``last_bar_end`` is the end of the latest bar whose data any training row used, its
features or its label (a label reads the close ``horizon`` bars later). The runtime
(``models.onnx_ensemble``) serves an ensemble only to that store and those instruments, and never
to a bar starting before ``last_bar_end``.

Feature importances (issue 13). The manifest's ``importances`` holds every input feature's LightGBM
split gain (``feature_importance(importance_type="gain")``) summed over the members and its share of
the ensemble's total gain, by gain descending (a feature never split on: gain 0); manifests written
before it have none (``[]``). ``dataflows.model_io`` copies them to the ``model_importances`` table.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

import msgspec
import numpy as np
import polars as pl

from models.deployment import Calibration, Deployment
from operators.bars import TIMEFRAMES

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2  # 2: ``data`` (what it was trained on) is recorded
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
CLASSES = ["down", "flat", "up"]  # class index = operators.labels DOWN, FLAT, UP
TMP_PREFIX = ".tmp-"  # folders being written; readers ignore names starting with "."
LIBRARIES = ("lightgbm", "onnxmltools", "onnx", "onnxruntime", "numpy", "polars", "msgspec")


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

    store: str  # identity of the store: DSN with the password masked (dataflows.model_io.store_identity)
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


