"""Replay source end to end: recorded tapes in ccxt CSV and Parquet give the reference bars."""

from datetime import datetime, timedelta, timezone

import polars as pl
from bytewax.testing import run_main

from dataflows.pipeline import build_flow
from dataflows.replay_source import ReplaySource
from sinks.clickhouse import ClickHouseSink, SinkStats
from tests.helpers import assert_bars_match_reference, settings, stored, synthetic_tape


def _ccxt_columns(tape: pl.DataFrame) -> pl.DataFrame:
    """The tape as ccxt writes trades (freqtrade's test data adds an index and an ISO date)."""
    return tape.select(
        pl.col("ts").alias("timestamp"), "id", pl.lit(None, dtype=pl.String).alias("type"), "side", "price",
        "amount", (pl.col("price") * pl.col("amount")).alias("cost"),
    )


def _replay_order(tape: pl.DataFrame, numeric_ids: bool = True) -> pl.DataFrame:
    """The tape with ``offset`` = its position in the replay order: a replay sorts by (ts, id),
    ids compared as numbers when all are integers, else as text (arrival jitter is not kept)."""
    key = pl.col("id").cast(pl.Int64) if numeric_ids else pl.col("id")
    return tape.sort(pl.col("ts"), key).with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))


def _replay(store, path, batch_size=5_000, **kw):
    stats = SinkStats()
    src = ReplaySource([path], exchange="x", symbol="ETH/USDT:USDT", batch_size=batch_size, **kw)
    run_main(build_flow(settings(), src, ClickHouseSink(store.dsn, store.database, stats)),
             epoch_interval=timedelta(0))
    return stats


def test_ccxt_csv_with_index_and_date_columns_replays_to_the_reference(store, tmp_path):
    tape = synthetic_tape(["ETH/USDT:USDT"], minutes=6 * 60, rate=1.0, jitter_ms=800)
    ccxt = _ccxt_columns(tape)
    dated = ccxt.with_row_index("").with_columns(
        pl.from_epoch("timestamp", time_unit="ms").dt.replace_time_zone("UTC").cast(pl.String).alias("date"))
    path = tmp_path / "eth.csv"
    dated.write_csv(path)
    stats = _replay(store, path, batch_size=3_333)
    assert stats.dead_letters == 0 and stats.late_trades == 0
    assert stats.trades_in_bars == tape.height
    assert assert_bars_match_reference(store, _replay_order(tape).with_columns(pl.lit("x").alias("exchange"))) > 360


def test_parquet_replays_to_the_reference_and_bad_rows_become_dead_letters(store, tmp_path):
    tape = synthetic_tape(["ETH/USDT:USDT"], minutes=3 * 60, rate=1.0)
    ccxt = _ccxt_columns(tape).with_columns(pl.col("price").cast(pl.String))
    bad = pl.DataFrame({"timestamp": [tape["ts"][10], tape["ts"][20]], "id": ["bad1", "bad2"],
                        "type": [None, None], "side": ["buy", "hold"], "price": ["n/a", "5.0"],
                        "amount": [1.0, 1.0], "cost": [1.0, 1.0]}, schema=ccxt.schema)
    with_bad = pl.concat([ccxt.slice(0, 100), bad, ccxt.slice(100)])
    path = tmp_path / "eth.parquet"
    with_bad.write_parquet(path)
    stats = _replay(store, path)
    assert stats.dead_letters == 2
    dead = stored(store, "dead_letters", "offset")
    # offsets are positions in the replay order: (ts, id), ids as text since "bad1" is not a number
    order = with_bad.with_row_index("row").sort("timestamp", "id")["row"].to_list()
    assert dead["offset"].to_list() == [order.index(100), order.index(101)]
    assert dead["reason"].to_list() == ["wrong_type", "unknown_side"]
    assert "price is not a valid Float64: n/a" in dead["detail"][0]
    assert assert_bars_match_reference(
        store, _replay_order(tape, numeric_ids=False).with_columns(pl.lit("x").alias("exchange"))) > 180


def test_replay_at_a_speed_factor_paces_event_time(store, tmp_path):
    # 40 s of trades at 20x real time take about 2 s; at full speed they take far less
    start = int(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    rows = [{"timestamp": start + i * 1000, "id": str(i), "type": None, "side": "buy", "price": 100.0 + i,
             "amount": 1.0, "cost": 100.0 + i} for i in range(41)]
    path = tmp_path / "slow.csv"
    pl.DataFrame(rows).write_csv(path)
    t0 = datetime.now(timezone.utc)
    _replay(store, path, speed=20.0)
    took = (datetime.now(timezone.utc) - t0).total_seconds()
    assert took >= 1.9, f"paced replay finished in {took:.2f} s, event span is 40 s at 20x = 2 s"
    bars = stored(store, "bars", "tf, start").filter(pl.col("tf") == "1m")
    assert bars["trades"].sum() == 41
