"""Training data from the store and the model-quality summary: the glue between ClickHouse and
models/train.py (which knows nothing about storage)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import polars as pl

from dataflows.config import Settings
from operators.features import aligned_feature_names
from sinks.clickhouse import Store


def training_frame(store: Store, settings: Settings, since_ms: Optional[int] = None,
                   until_ms: Optional[int] = None) -> tuple[pl.DataFrame, list[str]]:
    """Warm primary rows with matured labels, time-ordered; one column per feature (NaN = missing)."""
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
        "SELECT f.exchange, f.symbol, toUnixTimestamp64Milli(f.start) AS start, f.values, l.label "
        "FROM features AS f FINAL INNER JOIN labels AS l FINAL "
        "ON f.exchange = l.exchange AND f.symbol = l.symbol AND f.tf = l.tf AND f.start = l.start "
        f"WHERE {' AND '.join(where)} ORDER BY start, f.exchange, f.symbol", params)
    cols: dict = {"exchange": [r[0] for r in rows], "symbol": [r[1] for r in rows],
                  "start": [r[2] for r in rows], "label": [r[4] for r in rows]}
    for n in names:
        cols[n] = [r[3].get(n, math.nan) for r in rows]
    schema = {"exchange": pl.String, "symbol": pl.String, "start": pl.Int64, "label": pl.Int8,
              **{n: pl.Float64 for n in names}}
    return pl.DataFrame(cols, schema=schema), names


def train_from_store(store: Store, settings: Settings, folds: int = 4, until_ms: Optional[int] = None,
                     progress: Optional[Callable] = None):
    """Train the ONNX ensemble on what the store holds; returns the manifest."""
    from models.train import train

    frame, names = training_frame(store, settings, until_ms=until_ms)
    label_definition = {"horizon": settings.label_horizon, "timeframe": settings.primary_tf,
                        "classes": ["down", "flat", "up"],
                        "band": f"flat if |log(close[t+h]/close[t])| <= {settings.label_band_k} * ATR14/close"}
    return train(frame, names, horizon=settings.label_horizon, folds=folds, seed=settings.seed,
                 out_dir=settings.artifacts(), label_definition=label_definition, progress=progress)


def model_quality(store: Store, since_ms: Optional[int] = None) -> list[dict]:
    """Per model: labels scored, accuracy, log loss and Brier score (from prediction_outcomes)."""
    where = "WHERE start >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')" if since_ms is not None else ""
    cols, rows = store.query(
        "SELECT model, count() AS n, avg(predicted = label) AS accuracy, "
        "avg(-log(greatest(p_true, 1e-15))) AS log_loss, avg(brier) AS brier, "
        "groupUniqArray(version) AS versions "
        f"FROM prediction_outcomes {where} GROUP BY model ORDER BY model",
        {"since": since_ms} if since_ms is not None else None)
    return [dict(zip(cols, r)) for r in rows]
