"""Perp data from live feeds (issue 13), with scripted venues (no network): funding, open interest and
liquidations from the ccxt source through the pipeline into a real embedded store (their tables and the
features), and from the ingest into Kafka, in band with the trades of their key."""

import json
import uuid

import polars as pl
import pytest

from operators.perp import PERP_DECODER, PerpUpdate
from tests.conftest import scratch_store
from tests.helpers import settings, stored
from tests.integration.fake_venues import PERP_FUNDING, PERP_LIQ, PERP_OI, PERP_TAPE
from tests.unit.test_venue_feed import BTC, ETH, T0

FEEDS = {"binanceusdm": [BTC], "bybit": [ETH]}  # bybit here: trades only


@pytest.fixture(scope="module")
def ccxt_run(chdb_dsn, tmp_path_factory):
    """``--source ccxt`` in process (live pace, as the CLI runs it) for 2.5 s of scripted venues."""
    from bytewax.testing import run_main

    from dataflows.venue_source import CcxtSource
    from dataflows.pipeline import build_flow
    from sinks.clickhouse import ClickHouseSink, SinkStats

    src = CcxtSource(FEEDS, factory_path="tests.integration.fake_venues:perp", duration_s=2.5)
    with scratch_store(chdb_dsn) as store:
        stats = SinkStats()
        sink = ClickHouseSink(store.dsn, store.database, stats, flush_rows=100_000, flush_ms=200)
        run_main(build_flow(settings(tmp_path_factory.mktemp("perp-ccxt")), src, sink, pace=1.0, ensemble=None))
        src.check()
        yield store, stats


def ms(df: pl.DataFrame, col: str = "ts") -> pl.DataFrame:
    return df.with_columns(pl.col(col).dt.epoch("ms"))


def test_ccxt_perp_data_reaches_its_tables(ccxt_run):
    store, _ = ccxt_run
    fr = ms(stored(store, "funding_rates", "ts"))
    assert sorted(fr["rate"].to_list()) == sorted(PERP_FUNDING)
    assert set(fr["exchange"]) == {"binanceusdm"} and set(fr["symbol"]) == {BTC}
    assert set(fr["source"]) == {"ccxt:binanceusdm"}
    # each stamped with the venue's clock (its newest trade), so inside the tape
    assert fr["ts"].min() >= T0 and fr["ts"].max() <= PERP_TAPE[-1]["timestamp"]
    assert (fr["mark_price"] > 100.0).all() and fr["funding_time"].null_count() == 0
    oi = stored(store, "open_interest", "ts")
    assert sorted(oi["open_interest"].to_list()) == PERP_OI and oi["oi_value"].null_count() == oi.height
    liq = stored(store, "liquidations", "ts, side")
    assert sorted(zip(liq["side"], liq["amount"])) == sorted(PERP_LIQ)
    assert sorted(liq["notional"].to_list()) == sorted(100.0 * a for _, a in PERP_LIQ)
    # the funding answer without a rate: a dead letter, not a silent gap
    dead = stored(store, "dead_letters", "offset")
    assert dead["reason"].to_list() == ["missing_field"]
    assert dead["detail"][0] == "missing_field: funding: fundingRate" and '"fundingRate": null' in dead["payload"][0]


def test_ccxt_perp_data_reaches_the_features_and_a_venue_without_it_still_trades(ccxt_run):
    store, _ = ccxt_run
    f = ms(stored(store, "features", "exchange, symbol, start"), "start")
    btc = f.filter(pl.col("symbol") == BTC)
    funding = [v.get("funding_bps") for v in btc["values"]]
    assert btc.height == 3 and funding[0] is not None, btc  # from the first 5m bar on
    assert {round(x, 6) for x in funding if x is not None} <= {round(r * 1e4, 6) for r in PERP_FUNDING}
    eth = f.filter(pl.col("symbol") == ETH)
    assert eth.height > 0 and all(v.get("funding_bps") is None for v in eth["values"])
    bars = stored(store, "bars", "symbol").filter(pl.col("tf") == "1m")
    n = dict(bars.group_by("symbol").agg(pl.col("trades").sum()).iter_rows())
    assert n == {BTC: len(PERP_TAPE), ETH: 450}  # every trade, with or without perp data beside it
    ev = stored(store, "events", "ts")
    kinds = ev["kind"].to_list() if ev.height else []
    # the polls end well before the trades do: every update found its bar (on a very slow machine
    # the last ones might come after the last trade: one perp_unplaced event, not a lost row)
    assert len([k for k in kinds if k in ("perp_late", "perp_unplaced")]) <= 1, ev


# -- the ingest: perp data in band on Kafka, in order with the trades of its key -------------------

def test_with_perp_puts_each_update_after_the_trades_before_its_seq():
    from dataflows.venue_source import trades_frame
    from dataflows.kafka_topic import tape_messages, with_perp
    from operators.records import Trade

    trades = [Trade("x", BTC, str(i), T0 + i, 100.0, 1.0, "buy", 100.0, None, T0) for i in range(4)]
    frame = trades_frame(trades, 10)  # offsets 10..13
    ups = [PerpUpdate(kind="funding", exchange="x", symbol=BTC, ts=T0 + 9, rate=1e-4, seq=s) for s in (14, 10, 12)]
    msgs = with_perp(frame, ups + [PerpUpdate(kind="open_interest", exchange="x", symbol=BTC, ts=T0,
                                              open_interest=1.0)])
    order = [json.loads(m).get("id") or f"{json.loads(m)['perp']}" for _, m in msgs]
    assert order == ["funding", "0", "1", "funding", "2", "3", "funding", "open_interest"]
    assert {k for k, _ in msgs} == {f"x:{BTC}"}
    assert all("seq" not in json.loads(m) for _, m in msgs)  # a position in the reader's input, not sent
    assert with_perp(frame, []) == tape_messages(frame)


def test_ingest_publishes_perp_data_in_band_on_the_instruments_key(kafka_broker, tmp_path):
    from tests.integration.test_ingest import read_topic
    from tests.integration.test_kafka_pipeline import cli, sql

    topic = f"trades-{uuid.uuid4().hex[:8]}"
    record = tmp_path / "tape"
    cli("ingest", "--feeds", "binanceusdm:BTC/USDT:USDT", "--brokers", kafka_broker, "--topic", topic,
        "--partitions", "2", "--duration", "2", "--exchange-factory", "tests.integration.fake_venues:perp",
        "--record", str(record))
    msgs = read_topic(kafka_broker, topic)
    perp = [(k, PERP_DECODER.decode(json.dumps(m).encode())) for k, m in msgs if "perp" in m]
    assert {k for k, _ in perp} == {f"binanceusdm:{BTC}"}
    assert [u.rate for _, u in perp if u.kind == "funding"] == PERP_FUNDING
    assert [u.open_interest for _, u in perp if u.kind == "open_interest"] == PERP_OI
    assert [(u.side, u.amount) for _, u in perp if u.kind == "liquidation"] == PERP_LIQ
    assert [m["reason"] for _, m in msgs if m.get("event") == "rejected"] == ["missing_field"]
    trades = [m for _, m in msgs if "perp" not in m and "event" not in m]
    assert [m["id"] for m in trades] == [str(r["id"]) for r in PERP_TAPE]  # one key: one partition, in order
    # in band between the trades as they were received (not appended after them)
    first_perp = next(i for i, (_, m) in enumerate(msgs) if "perp" in m)
    last_trade = max(i for i, (_, m) in enumerate(msgs) if "perp" not in m and "event" not in m)
    assert first_perp < last_trade

    # the recording keeps them too (perp files beside the tape): a replay of it stores every update
    # the topic carried, with the venue's times and source
    files = sorted(record.glob("*.parquet"))
    assert {f.name.split("-")[0] for f in files} == {"tape", "perp"}
    args = ["run", "--source", "replay", "--data-dir", str(tmp_path / "replayed"), "--quiet"]
    for f in files:
        args += ["--file", str(f)]
    cli(*args)
    got = sql(tmp_path / "replayed", "SELECT toUnixTimestamp64Milli(ts) AS ts, rate, source FROM funding_rates FINAL "
                                     "ORDER BY ts")
    assert [(r["ts"], r["rate"], r["source"]) for r in got] == sorted(
        (u.ts, u.rate, u.source) for _, u in perp if u.kind == "funding")
    oi = sql(tmp_path / "replayed", "SELECT open_interest FROM open_interest FINAL ORDER BY ts")
    assert [r["open_interest"] for r in oi] == PERP_OI
    liq = sql(tmp_path / "replayed", "SELECT side, amount FROM liquidations FINAL")
    assert sorted((r["side"], r["amount"]) for r in liq) == sorted(PERP_LIQ)
