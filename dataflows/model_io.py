"""Models and the store: training data read from ClickHouse, training from it with the decision
and importances written back, the model-quality summary, and the pipeline's ONNX ensemble
(``open_ensemble``) with the facts it must fit. The glue between the store and ``models.train``
(which knows nothing about storage).

Which store. A manifest names the store it was trained on, and the pipeline the store it scores
into, by ``store_identity``: the DSN with its password masked (``sinks.store.redact_dsn``; an
embedded store by its resolved path) plus the database. No I/O is needed (every process of a
cluster computes it, the embedded store stays with its one owner), and no secret reaches a
manifest. The same server reached under another address (``localhost`` from the host,
``clickhouse`` inside compose) therefore counts as another store: its ensembles are refused with
a ``model_refused`` event, and ``TAPEFLOW_MODEL=<version>`` serves one anyway.

Deployment (issue 12, ``models.deployment``): ``train_from_store`` passes the gate the ensemble
the pipeline serves now (``active_ensemble``: the same rules as ``open_ensemble``) and writes the
gate's decision to ``events`` (``model_accepted`` / ``model_rejected``, the reason in one line,
the validation span in from_ts/to_ts, the numbers in ``detail``). ``model_quality`` reads the
calibration view (``infra/clickhouse/011_calibration_views.sql``) beside accuracy and log loss.

Feature importances (issue 13): ``train_from_store`` also writes the manifest's ``importances`` to
``model_importances`` (``infra/clickhouse/014_model_importances.sql``; one row per version and
feature, so writing them twice changes nothing), which the Models dashboard reads.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import polars as pl
from msgspec import to_builtins

from dataflows.config import ConfigError, Settings
from models.artefacts import ModelRefused, RunFacts
from models.deployment import GateRule
from models.manifest import DataOrigin, Manifest
from models.onnx_ensemble import OnnxEnsemble
from models.train import train
from operators.features import aligned_feature_names
from operators.records import Event
from sinks.clickhouse import SinkStats
from sinks.rows import Rows, to_rows
from sinks.store import Store, redact_dsn

log = logging.getLogger(__name__)
ACCEPTED_EVENT, REJECTED_EVENT = "model_accepted", "model_rejected"
IMPORTANCE_TABLE = "model_importances"
IMPORTANCE_COLUMNS = ["version", "feature", "rank", "gain", "share", "trained_at", "status"]


def store_identity(dsn: str) -> str:
    """How manifests and the pipeline name a store (with the database): the DSN, password masked;
    an embedded store's path resolved, so ``data`` and ``./data`` are one store."""
    parts = urlsplit(dsn)
    if parts.scheme == "chdb":
        return f"chdb://{Path(parts.path).resolve()}"
    return redact_dsn(dsn).rstrip("/")


def data_origin(settings: Settings) -> DataOrigin:
    """What the training rows of ``settings``' store are."""
    return DataOrigin(store=store_identity(settings.dsn()), database=settings.clickhouse_database,
                      primary_tf=settings.primary_tf, overlay_tfs=list(settings.overlay_tfs))


def run_facts(settings: Settings) -> RunFacts:
    """What the pipeline of ``settings`` is, for the ensemble."""
    return RunFacts(store=store_identity(settings.dsn()), database=settings.clickhouse_database,
                    primary_tf=settings.primary_tf, horizon=settings.label_horizon,
                    features=tuple(aligned_feature_names(settings.overlay_tfs)))


def open_ensemble(settings: Settings) -> OnnxEnsemble:
    """The pipeline's ONNX ensemble: the one ``TAPEFLOW_MODEL`` names, else picked by the rules
    (same store, fitting features; see models.artefacts). A named one that cannot be served
    is a ConfigError (one line, exit 2), never a silent run without it."""
    try:
        return OnnxEnsemble(settings.artifacts(), check_every_s=settings.onnx_check_s,
                            facts=run_facts(settings), model=settings.model)
    except ModelRefused as err:
        raise ConfigError(f"model (TAPEFLOW_MODEL={settings.model}): {err}") from None


def training_frame(store: Store, settings: Settings, since_ms: Optional[int] = None,
                   until_ms: Optional[int] = None) -> tuple[pl.DataFrame, list[str]]:
    """Warm primary rows with matured labels, time-ordered; one column per feature (NaN = missing).
    ``matured_at`` (ms) comes along: training purges by it and the manifest's span ends no
    earlier than the last label's maturity."""
    names = aligned_feature_names(settings.overlay_tfs)
    where = ["f.tf = {tf:String}", "l.horizon = {h:UInt16}", "f.warm = 1"]
    params = {"tf": settings.primary_tf, "h": settings.label_horizon}
    if since_ms is not None:
        where.append("f.start >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')")
        params["since"] = since_ms
    if until_ms is not None:  # the label must also have matured before the cut
        where.append("l.matured_at <= fromUnixTimestamp64Milli({until:Int64}, 'UTC')")
        params["until"] = until_ms
    _, rows = store.query(
        "SELECT f.exchange, f.symbol, toUnixTimestamp64Milli(f.start) AS start, f.values, l.label, "
        "toUnixTimestamp64Milli(l.matured_at) AS matured_at "
        "FROM features AS f FINAL INNER JOIN labels AS l FINAL "
        "ON f.exchange = l.exchange AND f.symbol = l.symbol AND f.tf = l.tf AND f.start = l.start "
        f"WHERE {' AND '.join(where)} ORDER BY start, f.exchange, f.symbol", params)
    cols: dict = {"exchange": [r[0] for r in rows], "symbol": [r[1] for r in rows],
                  "start": [r[2] for r in rows], "label": [r[4] for r in rows],
                  "matured_at": [r[5] for r in rows]}
    for n in names:
        cols[n] = [r[3].get(n, math.nan) for r in rows]
    schema = {"exchange": pl.String, "symbol": pl.String, "start": pl.Int64, "label": pl.Int8,
              "matured_at": pl.Int64, **{n: pl.Float64 for n in names}}
    return pl.DataFrame(cols, schema=schema), names


def active_ensemble(settings: Settings) -> Optional[OnnxEnsemble]:
    """The ensemble the pipeline of ``settings`` would serve now (``open_ensemble``'s rules), or
    None: none, or a named one that cannot be served (a warning; the gate then compares with the
    class prior only)."""
    try:
        ens = OnnxEnsemble(settings.artifacts(), check_every_s=settings.onnx_check_s, facts=run_facts(settings),
                           model=settings.model)
    except ModelRefused as err:
        log.warning("the deployment gate compares with the class prior only: %s", err)
        return None
    return ens if ens.eligible else None


def gate_rule(settings: Settings) -> GateRule:
    return GateRule(margin=settings.model_gate_margin, z=settings.model_gate_z)


def train_from_store(store: Store, settings: Settings, folds: int = 4, until_ms: Optional[int] = None,
                     progress: Optional[Callable] = None, since_ms: Optional[int] = None) -> Manifest:
    """Train the ONNX ensemble on what the store holds (rows starting at or after ``since_ms``,
    labels matured by ``until_ms``), through the deployment gate against the class prior and the
    ensemble serving now; returns the manifest (which records this store, the instruments and the
    span it was trained on, and the gate's decision) after writing the decision to ``events`` and
    the feature importances to ``model_importances``."""
    frame, names = training_frame(store, settings, since_ms=since_ms, until_ms=until_ms)
    label_definition = {"horizon": settings.label_horizon, "timeframe": settings.primary_tf,
                        "classes": ["down", "flat", "up"],
                        "band": f"flat if |log(close[t+h]/close[t])| <= {settings.label_band_k} * ATR14/close"}
    active = active_ensemble(settings)
    manifest = train(frame, names, horizon=settings.label_horizon, folds=folds, seed=settings.seed,
                     out_dir=settings.artifacts(), label_definition=label_definition, origin=data_origin(settings),
                     progress=progress, gate=gate_rule(settings),
                     incumbent=active.incumbent() if active is not None else None)
    record_deployment(store, manifest)
    record_importances(store, manifest)
    return manifest


def deployment_event(manifest: Manifest) -> Event:
    """The ``events`` row of a training's deployment decision."""
    d = manifest.deployment
    detail = {"version": manifest.version, **{k: v for k, v in to_builtins(d).items() if k not in ("status", "reason")},
              "trained": [manifest.data.first_bar_end, manifest.data.last_bar_end],
              "calibration": to_builtins(manifest.calibration.ensemble)}
    return Event(kind=ACCEPTED_EVENT if d.accepted else REJECTED_EVENT, ts=time.time_ns() // 1_000_000,
                 from_ts=d.span_start, to_ts=d.span_end, reason=f"version {manifest.version}: {d.reason}",
                 detail=json.dumps(detail, sort_keys=True), source="train")


def record_deployment(store: Store, manifest: Manifest) -> None:
    """Write the deployment decision of ``manifest`` to ``events`` (and the log)."""
    ev = deployment_event(manifest)
    (log.info if manifest.deployment.accepted else log.warning)("%s: %s", ev.kind, ev.reason)
    store.insert("events", to_rows([ev], SinkStats())["events"])


def importance_rows(manifest: Manifest) -> Rows:
    """The ``model_importances`` rows of ``manifest``: one per feature, ranked by gain (1 = most)."""
    trained_at = datetime.fromtimestamp(manifest.created_at_ms / 1000, tz=timezone.utc)
    status = manifest.deployment.status if manifest.deployment is not None else ""
    return Rows(IMPORTANCE_COLUMNS, [[manifest.version, imp.feature, rank, imp.gain, imp.share, trained_at, status]
                                     for rank, imp in enumerate(manifest.importances, start=1)])


def record_importances(store: Store, manifest: Manifest) -> None:
    """Write the feature importances of ``manifest`` to ``model_importances`` (nothing for a
    manifest written before they were recorded)."""
    store.insert(IMPORTANCE_TABLE, importance_rows(manifest))


def model_quality(store: Store, since_ms: Optional[int] = None) -> list[dict]:
    """Per model: labels scored, accuracy, log loss and Brier score (from prediction_outcomes),
    and the classwise calibration error of the probabilities the gates read (``ece``) and of the
    model's raw output (``ece_raw``), from the prediction_calibration view."""
    where = "WHERE start >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')" if since_ms is not None else ""
    params = {"since": since_ms} if since_ms is not None else None
    cols, rows = store.query(
        "SELECT model, count() AS n, avg(predicted = label) AS accuracy, "
        "avg(-log(greatest(p_true, 1e-15))) AS log_loss, avg(brier) AS brier, "
        "groupUniqArray(version) AS versions "
        f"FROM prediction_outcomes {where} GROUP BY model ORDER BY model", params)
    _, ece = store.query(
        "SELECT model, kind, sum(n * abs(observed - predicted)) / sum(n) FROM ("
        "  SELECT model, kind, cls, bin, count() AS n, avg(p) AS predicted, avg(hit) AS observed"
        f"  FROM prediction_calibration {where} GROUP BY model, kind, cls, bin) GROUP BY model, kind", params)
    by = {(m, k): v for m, k, v in ece}
    return [{**dict(zip(cols, r)), "ece": by.get((r[0], "calibrated")), "ece_raw": by.get((r[0], "raw"))}
            for r in rows]
