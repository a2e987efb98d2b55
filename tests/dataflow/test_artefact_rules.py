"""Model artefacts belong to their data (issue 11), through the whole pipeline with the ensemble the
pipeline opens itself (``build_flow(ensemble="auto")``) and the embedded store: a foreign ensemble
is not used, bars an ensemble was trained on are not scored by it (later bars are), a feature-list
mismatch is refused with a ``model_refused`` event, and a named ensemble is used."""

import json
from datetime import datetime, timezone

import polars as pl
import pytest

from dataflows.config import ConfigError
from dataflows.pipeline import build_flow
from models.onnx_ensemble import REFUSED
from dataflows.model_io import data_origin, train_from_store
from models.train import train
from sinks.clickhouse import ClickHouseSink
from tests.helpers import T0, frame_batches, run_pipeline, settings, synthetic_tape
from tests.unit.synthetic_models import BAR_MS, HORIZON, LABEL_DEFINITION, NAMES, synthetic_frame

SYMBOLS = ("BTC/USDT:USDT", "ETH/USDT:USDT")
HOUR = 3_600_000


def cfg_for(store, tmp_path, **kw):
    """Settings whose store is the test's store (the ensemble's rules compare against it)."""
    return settings(tmp_path / "data", clickhouse_dsn=store.dsn, clickhouse_database=store.database, **kw)


def version_of(cfg, origin, symbols=SYMBOLS, month=1, seed=1):
    """Train an ensemble into cfg's artifacts on a frame of ``symbols`` (exchange "x") that ends
    before the tape starts, recorded as coming from ``origin``."""
    n = 500
    df = synthetic_frame(n_times=n, instruments=tuple(symbols), seed=seed)
    df = df.with_columns(pl.col("start") - (n + 12) * BAR_MS)
    m = train(df, NAMES, horizon=HORIZON, folds=2, params={"num_iterations": 10, "min_data_in_leaf": 20},
              seed=seed, out_dir=cfg.artifacts(), label_definition=LABEL_DEFINITION, origin=origin,
              now=lambda: datetime(2024, month, 1, tzinfo=timezone.utc))
    assert m.data.last_bar_end < T0  # the span is no reason to refuse it here
    return m


def onnx_predictions(store) -> pl.DataFrame:
    """symbol, start (ms), version of the stored ensemble predictions (none: an empty frame)."""
    _, rows = store.query("SELECT symbol, toUnixTimestamp64Milli(start), version FROM predictions FINAL "
                          "WHERE model = 'onnx_ensemble' ORDER BY symbol, start")
    return pl.DataFrame(rows, schema={"symbol": pl.String, "start": pl.Int64, "version": pl.String}, orient="row")


def primary_bars(store) -> pl.DataFrame:
    """symbol, start (ms) of every stored (scored) primary row."""
    _, rows = store.query("SELECT symbol, toUnixTimestamp64Milli(start) FROM features FINAL WHERE tf = '5m' "
                          "ORDER BY symbol, start")
    return pl.DataFrame(rows, schema={"symbol": pl.String, "start": pl.Int64}, orient="row")


def refusals(store) -> list[dict]:
    cols, rows = store.query("SELECT kind, exchange, symbol, toUnixTimestamp64Milli(to_ts) AS to_ts, reason, detail "
                             "FROM events FINAL WHERE kind = {k:String} ORDER BY ts, symbol", {"k": REFUSED})
    out = [dict(zip(cols, r)) for r in rows]
    return [{**r, "rule": json.loads(r["detail"])["rule"], "version": json.loads(r["detail"])["version"]}
            for r in out]


@pytest.fixture(scope="module")
def tape():
    return synthetic_tape(list(SYMBOLS), minutes=3 * 60, rate=0.3)


def test_a_foreign_ensemble_is_not_used(store, other_store, tmp_path, tape):
    """Newest: trained on another store (same instruments). Older: this store, other instruments.
    Without the rules the newest would score every bar."""
    cfg = cfg_for(store, tmp_path)
    other = data_origin(cfg_for(other_store, tmp_path / "other"))
    elsewhere = version_of(cfg, other, month=2)
    xrp = version_of(cfg, data_origin(cfg), symbols=("XRP/USDT:USDT",), month=1)
    run_pipeline(frame_batches(tape, 3000), store, cfg)

    assert primary_bars(store).height > 2 * 30  # bars were scored ...
    assert onnx_predictions(store).height == 0  # ... by no ensemble
    events = refusals(store)
    (by_store,) = [e for e in events if e["rule"] == "store"]
    assert by_store["version"] == elsewhere.version and f"database {other_store.database}" in by_store["reason"]
    by_instrument = [e for e in events if e["rule"] == "instruments"]
    assert sorted(e["symbol"] for e in by_instrument) == sorted(SYMBOLS)  # once per instrument
    assert {e["version"] for e in by_instrument} == {xrp.version}
    assert all("not trained on x:" in e["reason"] and "x:XRP/USDT:USDT" in e["reason"] for e in by_instrument)


def test_bars_an_ensemble_was_trained_on_are_not_scored_by_it_later_bars_are(store, tmp_path):
    """The issue's replay: run, train on what was stored, then replay the same bars and more into
    the same store. The ensemble is picked (same store and instruments) but scores only the bars
    starting after the last bar its training read."""
    cfg = cfg_for(store, tmp_path)
    # enough warm bars that the ensemble shows skill and passes the deployment gate (issue 12)
    tape = synthetic_tape(list(SYMBOLS), minutes=19 * 60, rate=0.3)
    first = tape.filter(pl.col("ts") < T0 + 16 * HOUR)
    run_pipeline(frame_batches(first, 3000), store, cfg)
    m = train_from_store(store, cfg, folds=2)
    assert m.deployment.accepted, m.deployment.reason
    assert m.data.store == data_origin(cfg).store and m.data.instruments == sorted(f"x:{s}" for s in SYMBOLS)
    span_end = m.data.last_bar_end
    assert T0 + 14 * HOUR < span_end <= T0 + 16 * HOUR

    run_pipeline(frame_batches(tape, 3000), store, cfg)  # the replay: the same bars again, then later ones
    feats, preds = primary_bars(store), onnx_predictions(store)
    assert set(preds["version"]) == {m.version}
    trained_on = feats.filter(pl.col("start") < span_end)
    after = feats.filter(pl.col("start") >= span_end)
    assert trained_on.height > 2 * 60 and after.height > 2 * 20
    assert preds.filter(pl.col("start") < span_end).height == 0  # none of the bars it was trained on
    assert preds.select("symbol", "start").sort("symbol", "start").equals(after.sort("symbol", "start"))  # all later
    span = [e for e in refusals(store) if e["rule"] == "span"]
    assert sorted(e["symbol"] for e in span) == sorted(SYMBOLS)
    assert all(e["to_ts"] == span_end for e in span)


def test_a_feature_list_mismatch_is_refused_with_a_clear_message(store, tmp_path, tape):
    """The overlays changed since training (no 1h overlay now): the ensemble needs features the
    pipeline no longer produces. Picked: refused with an event. Named: an error."""
    cfg = cfg_for(store, tmp_path, overlay_tfs=["15m"])
    m = version_of(cfg, data_origin(cfg_for(store, tmp_path)))  # same store, trained with 15m and 1h
    run_pipeline(frame_batches(tape, 3000), store, cfg)
    assert primary_bars(store).height > 2 * 30 and onnx_predictions(store).height == 0
    (event,) = refusals(store)
    assert event["rule"] == "features" and event["version"] == m.version
    assert event["reason"].startswith(f"version {m.version} needs features the pipeline does not produce: ['1h_")
    assert "['15m', '1h']" in event["reason"] and "\n" not in event["reason"]

    named = cfg_for(store, tmp_path, overlay_tfs=["15m"], model=m.version)
    with pytest.raises(ConfigError, match=rf"TAPEFLOW_MODEL={m.version}\): .*needs features the pipeline does not"):
        build_flow(named, None, ClickHouseSink(store.dsn, store.database))


def test_an_explicitly_named_ensemble_is_used(store, other_store, tmp_path, tape):
    """Trained on another store and on other instruments: picked, it would be refused; named, it
    scores every bar (its features fit, the bars are after its span)."""
    base = cfg_for(store, tmp_path)
    m = version_of(base, data_origin(cfg_for(other_store, tmp_path / "other")), symbols=("A", "B"))
    version_of(base, data_origin(base), month=3)  # newer and of this store: named wins over it
    cfg = cfg_for(store, tmp_path, model=str(base.artifacts() / m.version))  # by path
    run_pipeline(frame_batches(tape, 3000), store, cfg)
    feats, preds = primary_bars(store), onnx_predictions(store)
    assert feats.height > 2 * 30 and set(preds["version"]) == {m.version}
    assert preds.select("symbol", "start").equals(feats.select("symbol", "start"))
    assert refusals(store) == []
