"""Features, labels, predictions and decisions through the whole pipeline (TestingSource, embedded
ClickHouse): the ONNX hot swap mid-stream, and no lookahead anywhere downstream of the bars."""

import shutil
from datetime import datetime, timedelta, timezone

import msgspec
import polars as pl
from bytewax.testing import TestingSource, run_main

from dataflows.pipeline import build_flow
from dataflows.model_io import data_origin, run_facts
from models.onnx_ensemble import OnnxEnsemble
from models.train import train
from sinks.clickhouse import ClickHouseSink
from tests.helpers import T0, WALL, frame_batches, perp_updates, run_pipeline, settings, stored, synthetic_tape
from tests.unit.synthetic_models import BAR_MS, HORIZON, LABEL_DEFINITION, NAMES, synthetic_frame

MIN = 60_000


def history(n_times=600, seed=1, symbols=("BTC/USDT:USDT", "ETH/USDT:USDT")):
    """A training frame of these symbols (exchange "x", like the tapes) ending before T0."""
    df = synthetic_frame(n_times=n_times, instruments=tuple(symbols), seed=seed)
    return df.with_columns(pl.col("start") - (n_times + 12) * BAR_MS)


def _version(root, seed, month, origin):
    m = train(history(seed=seed), NAMES, horizon=HORIZON, folds=2,
              params={"num_iterations": 20, "min_data_in_leaf": 20}, seed=seed, out_dir=root,
              label_definition=LABEL_DEFINITION, origin=origin,
              now=lambda: datetime(2024, month, 1, tzinfo=timezone.utc))
    assert m.data.last_bar_end < T0  # trained before the tape: every bar may be scored
    return root / m.version, m.version


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_new_manifest_mid_stream_switches_predictions_at_a_bar_boundary_with_none_missing(store, tmp_path):
    cfg = settings(tmp_path / "data", clickhouse_dsn=store.dsn, clickhouse_database=store.database)
    staging = tmp_path / "staging"
    a_dir, a = _version(staging / "a", 1, 1, data_origin(cfg))
    b_dir, b = _version(staging / "b", 2, 2, data_origin(cfg))
    live = tmp_path / "artifacts"
    live.mkdir()
    shutil.copytree(a_dir, live / a)
    clock = Clock()
    ensemble = OnnxEnsemble(live, check_every_s=5.0, clock=clock, facts=run_facts(cfg))

    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=4 * 60, rate=0.3)
    batches = frame_batches(tape, 500)
    half = len(batches) // 2

    def items():  # the new version lands while the stream runs
        yield from batches[:half]
        shutil.copytree(b_dir, live / f".tmp-{b}")
        (live / f".tmp-{b}").rename(live / b)
        clock.t += 10.0
        yield from batches[half:]

    flow = build_flow(cfg, TestingSource(items()), ClickHouseSink(store.dsn, store.database), ensemble=ensemble)
    run_main(flow, epoch_interval=timedelta(0))

    feats = stored(store, "features", "symbol, start")
    preds = stored(store, "predictions", "symbol, start").filter(pl.col("model") == "onnx_ensemble")
    assert feats.height > 2 * 40
    # none missing: every scored primary bar has exactly one ensemble prediction
    assert preds.select("symbol", "start").equals(feats.select("symbol", "start"))
    for sym in ("BTC/USDT:USDT", "ETH/USDT:USDT"):
        versions = preds.filter(pl.col("symbol") == sym)["version"].to_list()
        switch = versions.index(b)
        assert 0 < switch < len(versions) and set(versions[:switch]) == {a} and set(versions[switch:]) == {b}
    members = stored(store, "predictions", "symbol, start").filter(pl.col("model").str.starts_with("onnx_"))
    assert set(members["model"]) == {"onnx_0", "onnx_1", "onnx_ensemble"}


def test_no_lookahead_in_features_labels_predictions_and_decisions(store, other_store, tmp_path):
    syms = ["BTC/USDT:USDT", "ETH/USDT:USDT"]
    base = synthetic_tape(syms, minutes=8 * 60, rate=0.4, jitter_ms=800)
    cut = T0 + 6 * 3_600_000 + 10 * MIN
    other = synthetic_tape(syms, minutes=8 * 60, rate=1.2, seed=99, jitter_ms=800)
    altered = pl.concat([base.filter(pl.col("ts") < cut),
                         other.filter(pl.col("ts") >= cut).with_columns(pl.col("price") * 0.7)])
    altered = altered.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))
    # perp data too (funding, open interest, liquidations): the same before the cut, other after it
    base_perp = perp_updates(base, seed=5)
    altered_perp = [u for u in perp_updates(altered, seed=5) if u.ts < cut] + perp_updates(altered, 6, since_ms=cut)
    strip = lambda ups: [msgspec.structs.replace(u, seq=None) for u in ups if u.ts < cut]  # noqa: E731
    assert strip(base_perp) == strip(altered_perp) and len(strip(base_perp)) > 1000
    cfg = settings(tmp_path / "data", online_warmup_labels=10, strategy={"require_warm": False})
    run_pipeline(frame_batches(base, 3000, base_perp), store, cfg)
    run_pipeline(frame_batches(altered, 3000, altered_perp), other_store, cfg)

    def before(st, table, order, time_col, exclude=()):
        df = stored(st, table, order, exclude)
        return df.filter(pl.col(time_col).dt.epoch("ms") <= cut)

    cut_dt = cut
    checks = [("features", "exchange, symbol, tf, start", "end", ()),
              ("labels", "exchange, symbol, tf, start", "matured_at", ()),
              ("predictions", "exchange, symbol, tf, start, model", "end", ()),
              ("decisions", "strategy_id, exchange, symbol, ts", "ts", WALL["decisions"])]
    for table, order, col, excl in checks:
        a, b = before(store, table, order, col, excl), before(other_store, table, order, col, excl)
        assert a.height > 0, table
        assert a.equals(b), f"{table}: rows ending by the cut differ"
    preds = before(store, "predictions", "exchange, symbol, tf, start, model", "end")
    assert {"river_lr", "river_arf"} <= set(preds["model"])  # the online models were predicting
    from operators.perp import NAMES as PERP

    feats = before(store, "features", "exchange, symbol, tf, start", "end")
    for sym in syms:  # every perp feature defined once it has its history (oi_chg_12: 13 bars)
        vals = feats.filter(pl.col("symbol") == sym)["values"].to_list()
        assert len(vals) > 40 and all(v.get(f) is not None for v in vals[13:] for f in PERP), sym
    later = [stored(st, "features", "exchange, symbol, tf, start").filter(pl.col("end").dt.epoch("ms") > cut)
             for st in (store, other_store)]
    assert all(any(a[f] != b.get(f) for a, b in zip(later[0]["values"], later[1]["values"])) for f in PERP)
    labels = stored(store, "labels", "start")
    assert labels.filter(pl.col("matured_at") < pl.col("end")).height == 0
    # and something downstream did change after the cut
    after = stored(store, "predictions", "exchange, symbol, tf, start, model")
    after2 = stored(other_store, "predictions", "exchange, symbol, tf, start, model")
    assert not after.filter(pl.col("end").dt.epoch("ms") > cut_dt).equals(
        after2.filter(pl.col("end").dt.epoch("ms") > cut_dt))
