"""Acceptance (issue 12, 3): through the whole pipeline and the embedded store, an ensemble trained
on a tape without edge does not beat the class prior: it is stored as rejected, an ``events`` row
says why, ``tapeflow models`` lists it as rejected and not active, and it never scores a bar."""

from dataclasses import replace

import numpy as np
import polars as pl

from cli.models import model_rows
from models.manifest import load_manifest
from dataflows.model_io import REJECTED_EVENT, train_from_store
from operators import synthetic as syn
from tests.helpers import T0, frame_batches, run_pipeline, settings

SYMBOLS = ("BTC/USDT:USDT", "ETH/USDT:USDT")
HOUR = 3_600_000


def martingale_tape(minutes: int, rate: float = 0.3, seed: int = 3) -> pl.DataFrame:
    """The generator with ``edge`` 0: orders still lean with the informed flow, but nothing moves
    prices predictably (no flow drift, no trend, no range pull): labels cannot be forecast."""
    frames = []
    for s in SYMBOLS:
        cols, _ = syn.generate(replace(syn.spec_for(s, rate), edge=0.0), seed, T0, minutes)
        frames.append(pl.DataFrame(cols).with_columns(pl.lit("x").alias("exchange"), pl.lit(s).alias("symbol")))
    df = pl.concat(frames).sort("ts", "symbol", "offset")
    return df.select("exchange", "symbol", pl.col("id").cast(pl.String), "ts", "price", "amount",
                     pl.when(pl.col("is_buy")).then(pl.lit("buy")).otherwise(pl.lit("sell")).alias("side"),
                     pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))


def test_an_ensemble_without_edge_is_rejected_and_never_scores_a_bar(store, tmp_path):
    cfg = settings(tmp_path / "data", clickhouse_dsn=store.dsn, clickhouse_database=store.database)
    tape = martingale_tape(19 * 60)
    run_pipeline(frame_batches(tape.filter(pl.col("ts") < T0 + 16 * HOUR), 3000), store, cfg)
    m = train_from_store(store, cfg, folds=2)

    d = m.deployment
    assert d.status == "rejected" and d.record_steps > 30
    assert d.logloss_raw > d.logloss_prior - d.z * d.se_prior  # the numbers the reason states
    assert "does not beat the class prior" in d.reason
    assert load_manifest(cfg.artifacts() / m.version).deployment == d  # stored, as rejected
    _, rows = store.query("SELECT kind, reason, detail, toUnixTimestamp64Milli(to_ts) FROM events FINAL "
                          "WHERE source = 'train'")
    ((kind, reason, detail, to_ts),) = rows
    assert kind == REJECTED_EVENT and m.version in reason and "does not beat the class prior" in reason
    assert to_ts == d.span_end and f'"version": "{m.version}"' in detail
    listed = model_rows(cfg)
    assert [(r["version"], r["status"], r["active"]) for r in listed] == [(m.version, "rejected", False)]

    run_pipeline(frame_batches(tape, 3000), store, cfg)  # every bar again, and the later ones
    _, preds = store.query("SELECT count() FROM predictions FINAL WHERE model LIKE 'onnx%'")
    _, later = store.query("SELECT count() FROM features FINAL WHERE tf = '5m' AND "
                           "start >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')", {"t": m.data.last_bar_end})
    assert later[0][0] > 2 * 20  # bars after its training span were scored ...
    assert preds[0][0] == 0  # ... and not by it
    _, river = store.query("SELECT count() FROM predictions FINAL WHERE model = 'river_lr'")
    assert river[0][0] > 0 and np.isfinite(d.ece)
