"""LightGBM to ONNX with exact float32 parity, and the float32 input matrix both sides read.

ONNX parity. The converted graph compares float32 inputs with float32 thresholds, LightGBM compares
doubles. Before conversion every split is rewritten into an equivalent one for float32 inputs:
the threshold ``t`` is rounded DOWN to a float32 (for a float32 ``x``: ``x <= t`` iff
``x <= f32_down(t)``; rounding to nearest, as a plain conversion does, flips the split for an input
equal to the rounded-up threshold), and a split on a feature that had no NaN in training
(LightGBM: NaN is read as 0.0) becomes an explicit "missing goes left iff 0 <= t" split. Training
uses the float32 values too, so the rewritten booster predicts exactly like the trained one and the
ONNX graph agrees with LightGBM up to float32 summation (~1e-7), NaN rows included; ``models.train``
checks this on every validation block and refuses to write an artefact that misses ``parity_tol``.

Heavy libraries (lightgbm, through ``models.lean_imports``; onnxmltools, onnxruntime) are imported
inside the functions that need them: ``feature_matrix`` and ``as_lightgbm_sees`` are light and shared
with the runtime.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import polars as pl

from models.lean_imports import import_lightgbm
from models.manifest import INPUT_NAME, OUTPUT_NAME


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
    lgb = import_lightgbm()
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



def onnx_probabilities(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Probabilities [N, 3] of one ONNX member graph on the float32 matrix ``x`` (parity checks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: as_lightgbm_sees(x)})[0]

