"""Offline training: K LightGBM multiclass models on walk-forward folds, exported to ONNX with a
manifest, written as one versioned folder that appears atomically.

    frame (features + label + time)  ──►  walk-forward folds with a purge gap  ──►  LightGBM per fold
        ──►  ONNX per fold (onnxmltools, float input "features" [N, n_features], output
             "probabilities" [N, 3] = p_down, p_flat, p_up)  ──►  out_dir/<version>/
                                                                       model_0.onnx ... model_{K-1}.onnx
                                                                       model_<k>.lgb.txt (LightGBM)
                                                                       manifest.json

The folds and their metrics are ``models.folds``, the float32-exact ONNX conversion
``models.onnx_export``, the manifest (what it was trained on, the feature importances)
``models.manifest``.

Calibration and the deployment gate (issue 12; ``models.calibration``, ``models.deployment``). Member
k is out of sample on every validation block from its own on, so on the last block the whole
ensemble is: its calibration map (vector scaling shrunk toward the raw output) is fitted there and
recorded in the manifest (``calibration``), and the runtime applies it. The gate measures the
same procedure out of sample (cross-fitted maps, earlier blocks with the members trained before
them) against the class prior and the model serving now (``incumbent``); the manifest records its
decision (``deployment``), and a rejected version is written but never served. The members' own
probabilities stay uncalibrated (they are votes).

LightGBM is imported inside ``train``: importing this module stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import msgspec
import numpy as np
import polars as pl

from models.calibration import classwise_ece, cross_fitted, shrunk
from models.lean_imports import import_lightgbm
from models.deployment import Calibration, Deployment, Evidence, GateRule, Incumbent, decide
from models.folds import classification_metrics, walk_forward_splits
from models.manifest import (
    CLASSES, INPUT_NAME, MANIFEST_FILE, MANIFEST_FORMAT, OUTPUT_NAME, TMP_PREFIX, DataOrigin, Manifest, Member,
    TrainingWindow, describe_data, gain_importances, library_versions, sha256_bytes,
)
from models.onnx_export import booster_to_onnx, feature_matrix, onnx_probabilities

log = logging.getLogger(__name__)

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

    lgb = import_lightgbm()

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
            p_onnx = onnx_probabilities(data, xv)
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
            total += onnx_probabilities(graphs[i], x[rows]).astype(np.float64)
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
