"""Replay end to end (build_flow + the real ReplaySource + the chdb store): a tape gives the same
bars whatever the order of its rows or files, and files in other layouts (Kraken export, Parquet
Datetime columns) give the bars an independent Polars group_by computes from the raw trades."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pytest
from bytewax.testing import run_main
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_topic import TradeProducer, ensure_topic, publish_tape
from dataflows.pipeline import build_flow
from dataflows.replay_source import ReplaySource
from operators.decode import decode_batch
from sinks.clickhouse import ClickHouseSink, SinkStats
from sinks.store import Store
from tests.broker import tansu
from tests.helpers import settings, stored, stored_bars, synthetic_tape

SAMPLES = Path(__file__).parent.parent / "samples"


@pytest.fixture
def fresh_store(chdb_dsn):
    """A new database per call (several replays per test, each into its own store)."""
    opened = []

    def make() -> Store:
        opened.append(Store(chdb_dsn, "t_" + uuid.uuid4().hex[:12]))
        return opened[-1]

    yield make
    for st in opened:
        try:
            st.command(f"DROP DATABASE IF EXISTS {st.database} SYNC")  # see tests/conftest.py scratch_store
        finally:
            st.close()


def replay(store: Store, files: list, **kw) -> SinkStats:
    stats = SinkStats()
    src = ReplaySource(files, batch_size=2_000, **kw)
    src.check()  # what the CLI does before starting the dataflow
    run_main(build_flow(settings(), src, ClickHouseSink(store.dsn, store.database, stats)),
             epoch_interval=timedelta(0))
    return stats


def test_reversed_shuffled_and_split_tapes_give_the_bars_of_the_sorted_tape(fresh_store, tmp_path):
    tape = synthetic_tape(["BTC/USDT:USDT", "SOL/USDT:USDT"], minutes=30, rate=0.5)
    assert tape["ts"].is_duplicated().any()  # trades sharing a ms: their order must not depend on the file
    ccxt = tape.select("symbol", pl.col("ts").alias("timestamp"), "id", "side", "price", "amount")
    files = {"sorted": [tmp_path / "sorted.csv"], "reversed": [tmp_path / "reversed.csv"],
             "shuffled": [tmp_path / "shuffled.parquet"], "split": [tmp_path / "b.parquet", tmp_path / "a.csv"]}
    ccxt.write_csv(files["sorted"][0])
    ccxt.reverse().write_csv(files["reversed"][0])
    ccxt.sample(fraction=1.0, shuffle=True, seed=11).write_parquet(files["shuffled"][0])
    half = pl.Series(np.random.default_rng(2).random(ccxt.height) < 0.5)  # rows of both symbols in both files
    ccxt.filter(half).write_csv(tmp_path / "a.csv")
    ccxt.filter(~half).write_parquet(tmp_path / "b.parquet")

    bars, stores = {}, {}
    for name, paths in files.items():
        stores[name] = fresh_store()
        stats = replay(stores[name], paths, exchange="x")
        assert (stats.trades_in_bars, stats.late_trades, stats.dead_letters) == (tape.height, 0, 0), name
        bars[name] = stored_bars(stores[name])
    assert bars["sorted"].filter(pl.col("tf") == "1m").height >= 2 * 30
    for name in ("reversed", "shuffled", "split"):
        assert bars[name].equals(bars["sorted"]), f"{name}: bars differ from the sorted tape's"
    # the reversed file is reported in `events`; the sorted one is not
    ev = stored(stores["reversed"], "events", "ts")
    assert ev["kind"].to_list() == ["replay_sorted"] and "reversed.csv" in ev["reason"][0]
    assert stored(stores["sorted"], "events", "ts").height == 0


def ohlcv_per_minute(raw: pl.DataFrame) -> pl.DataFrame:
    """Independent reference: raw trades (ts in ms, price, amount, in time order) -> 1m OHLCV."""
    return (raw.with_columns((pl.col("ts") - pl.col("ts") % 60_000).alias("start"))
            .group_by("start", maintain_order=True)
            .agg(pl.col("price").first().alias("open"), pl.col("price").max().alias("high"),
                 pl.col("price").min().alias("low"), pl.col("price").last().alias("close"),
                 pl.col("amount").sum().alias("volume"), pl.len().alias("trades"))
            .sort("start"))


def assert_1m_bars(store: Store, raw: pl.DataFrame) -> int:
    want = ohlcv_per_minute(raw)
    got = stored_bars(store).filter(pl.col("tf") == "1m").sort("start").select(want.columns)
    assert got["start"].to_list() == want["start"].to_list()
    assert got["trades"].to_list() == want["trades"].to_list()
    for c in ("open", "high", "low", "close", "volume"):
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-12, err_msg=c)
    return got.height


def test_kraken_style_export_replays_into_the_bars_of_its_raw_trades(store, tmp_path):
    rng = np.random.default_rng(4)
    n = 600
    secs = 1_704_067_200 + np.sort(rng.integers(0, 3 * 3600, n))  # several trades share a second
    price = np.round(2000 + np.cumsum(rng.normal(0, 0.4, n)), 2)
    vol = np.round(rng.uniform(0.001, 3, n), 8)
    p = tmp_path / "ETHEUR.csv"  # Kraken's layout: no header, timestamp in s, price, volume
    p.write_text("".join(f"{s},{x:.6f},{v:.8f}\n" for s, x, v in zip(secs, price, vol)))
    stats = replay(store, [p], exchange="kraken", symbol="ETH/EUR")
    assert (stats.trades_in_bars, stats.dead_letters, stats.late_trades) == (n, 0, 0)
    raw = pl.DataFrame({"ts": secs * 1000, "price": price, "amount": vol})
    assert assert_1m_bars(store, raw) > 100
    ev = stored(store, "events", "ts")
    assert ev["kind"].to_list() == ["replay_side_inferred"] and ev["symbol"].to_list() == ["ETH/EUR"]


def test_the_kraken_sample_replays_into_the_bars_of_its_raw_trades(store):
    p = SAMPLES / "kraken-BCHEUR.csv"
    raw = pl.read_csv(p, has_header=False, new_columns=["t", "price", "amount"])
    stats = replay(store, [p], exchange="kraken", symbol="BCH/EUR")
    assert (stats.trades_in_bars, stats.dead_letters, stats.late_trades) == (raw.height, 0, 0)
    assert assert_1m_bars(store, raw.with_columns((pl.col("t") * 1000).alias("ts"))) > 40


@pytest.mark.parametrize("time_unit,tz", [("us", None), ("ns", "America/New_York")])
def test_parquet_with_a_datetime_column_replays_into_the_bars_of_its_raw_trades(store, tmp_path, time_unit, tz):
    tape = synthetic_tape(["ETH/USDT:USDT"], minutes=30, rate=0.5)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    when = pl.Series([start + timedelta(milliseconds=int(t) - tape["ts"][0]) for t in tape["ts"]])
    when = when.cast(pl.Datetime(time_unit, "UTC"))
    when = when.dt.convert_time_zone(tz) if tz else when.dt.replace_time_zone(None)
    p = tmp_path / "eth.parquet"
    tape.select(when.alias("timestamp"), "id", "side", "price", "amount").write_parquet(p)
    assert pl.read_parquet(p).schema["timestamp"] == pl.Datetime(time_unit, tz)
    stats = replay(store, [p], exchange="x", symbol="ETH/USDT:USDT")
    assert (stats.trades_in_bars, stats.dead_letters, stats.late_trades) == (tape.height, 0, 0)
    ms = int(start.timestamp() * 1000) + (tape["ts"] - tape["ts"][0])
    raw = tape.with_columns(ms.alias("ts")).sort("ts", pl.col("id").cast(pl.Int64))
    assert assert_1m_bars(store, raw) == 30


def test_publish_tape_sends_the_replay_order_with_units_and_kraken_mapping(tmp_path):
    """`tapeflow replay FILE --to kafka` reads files exactly as --source replay: the topic (one
    partition, read back with a plain consumer) holds the file replay's trades in its order."""
    lines = (SAMPLES / "kraken-BCHEUR.csv").read_text().splitlines(True)
    first, second = tmp_path / "part1.csv", tmp_path / "part2.csv"  # split, each half reversed
    first.write_text("".join(reversed(lines[:70])))
    second.write_text("".join(reversed(lines[70:])))
    files = [second, first]
    src = ReplaySource([SAMPLES / "kraken-BCHEUR.csv"], exchange="kraken", symbol="BCH/EUR")
    want = pl.concat([decode_batch(b, 1_800_000_000_000).frame for b in _drain(src)])
    raw = pl.read_csv(SAMPLES / "kraken-BCHEUR.csv", has_header=False, new_columns=["t", "price", "amount"])
    assert want["ts"].to_list() == (raw["t"] * 1000).to_list()  # seconds -> ms, in file order
    with tansu() as brokers:
        ensure_topic(brokers, "trades", 1)
        sent = publish_tape(files, TradeProducer(brokers, "trades"), exchange="kraken", symbol="BCH/EUR")
        c = Consumer({"bootstrap.servers": brokers, "group.id": "t", "enable.partition.eof": True,
                      "enable.auto.commit": False})
        c.assign([TopicPartition("trades", 0, 0)])
        got = []
        while True:
            m = c.poll(10)
            assert m is not None, "timed out reading the topic back"
            if m.error():
                break
            got.append(msgspec.json.decode(m.value()))
        c.close()
    assert sent == len(got) == want.height
    assert [g["id"] for g in got] == want["id"].to_list()
    assert [g["ts"] for g in got] == want["ts"].to_list()
    assert [g["side"] == "buy" for g in got] == want["is_buy"].to_list()
    assert [g["price"] for g in got] == want["price"].to_list()


def _drain(src: ReplaySource) -> list:
    part = src.build_part("inp", src.list_parts()[0], None)
    out = []
    while True:
        try:
            out.extend(part.next_batch())
        except StopIteration:
            return out


HOUR_MS = 3_600_000


@pytest.mark.parametrize("ahead_ms", [3 * HOUR_MS, 2 * 365 * 24 * HOUR_MS], ids=["hours-ahead", "years-ahead"])
def test_a_trade_stamped_far_ahead_loses_no_other_trade_and_is_accounted_for(fresh_store, tmp_path, ahead_ms):
    """Acceptance of the robust event time: one trade per instrument stamped hours (or years) ahead,
    in the middle of a file. No other trade is lost to lateness; each outlier is a late row with
    its reason; trades in bars + late + dead letters = rows of the file; the other bars are exactly
    the bars of the clean file."""
    tape = synthetic_tape(["BTC/USDT:USDT", "SOL/USDT:USDT", "ETH/USDT:USDT"], minutes=40, rate=0.5)
    ccxt = tape.select("symbol", pl.col("ts").alias("timestamp"), "id", "side", "price", "amount")
    bad_ids = []
    for sym in ccxt["symbol"].unique(maintain_order=True).to_list():
        mine = ccxt.with_row_index("_i").filter(pl.col("symbol") == sym)
        victim = mine["_i"][mine.height // 2]
        bad_ids.append((sym, ccxt["id"][victim]))  # ids are per instrument
        ccxt = ccxt.with_columns(pl.when(pl.int_range(pl.len()) == victim).then(pl.col("timestamp") + ahead_ms)
                                 .otherwise(pl.col("timestamp")).alias("timestamp"))
    bad_path, clean_path = tmp_path / "bad.csv", tmp_path / "clean.csv"
    ccxt.write_csv(bad_path)
    bad_keys = [f"{sym}|{i}" for sym, i in bad_ids]
    ccxt.filter(~pl.concat_str("symbol", pl.lit("|"), "id").is_in(bad_keys)).write_csv(clean_path)

    bad_store, clean_store = fresh_store(), fresh_store()
    stats = replay(bad_store, [bad_path], exchange="x")
    replay(clean_store, [clean_path], exchange="x")
    late = stored(bad_store, "late_trades", "id")
    assert sorted(zip(late["symbol"].to_list(), late["id"].to_list())) == sorted(bad_ids)
    assert set(late["reason"].to_list()) == {"ts_outlier"}
    assert stats.trades_in_bars + stats.late_trades + stats.dead_letters == ccxt.height
    assert stats.trades_in_bars == ccxt.height - len(bad_ids)
    assert stored_bars(bad_store).equals(stored_bars(clean_store))


def test_publish_tape_puts_perp_rows_between_the_trades_at_their_place(tmp_path):
    """A replay's funding file published to Kafka: each update right after the trades at or before
    its ts (what ``--source replay`` gives), paced or not."""
    trades = pl.DataFrame({"id": [str(i) for i in range(6)], "timestamp": [1_000, 2_000, 3_000, 4_000, 5_000, 6_000],
                           "price": 10.0, "amount": 1.0, "side": "buy"}).with_columns(
        pl.col("timestamp") + 1_704_067_200_000)
    trades.write_csv(tmp_path / "t.csv")
    pl.DataFrame({"timestamp": [1_704_067_202_500, 1_704_067_209_000], "fundingRate": [1e-4, 2e-4]}).write_csv(
        tmp_path / "f.csv")

    class Collect:  # the producer's two calls, recorded (the broker is not what this checks)
        def __init__(self):
            self.msgs, self.producer = [], self

        def send_many(self, msgs):
            self.msgs += list(msgs)

        def send(self, k, m):
            self.msgs.append((k, m))

        def poll(self, _):
            pass

        def flush(self):
            pass

    for speed, batch in ((None, 4), (1e9, 2)):
        p = Collect()
        sent = publish_tape([tmp_path / "t.csv", tmp_path / "f.csv"], p, exchange="x", symbol="A", speed=speed,
                            batch_size=batch)
        kinds = [msgspec.json.decode(m).get("perp", "trade") for _, m in p.msgs]
        assert sent == 8 and kinds == ["trade", "trade", "funding", "trade", "trade", "trade", "trade", "funding"]
