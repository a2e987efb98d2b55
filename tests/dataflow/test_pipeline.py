"""Dataflow tests: the whole pipeline on TestingSource input, rows read back from embedded ClickHouse."""

import json
import time
from datetime import timedelta

import msgspec
import polars as pl
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource

from operators.bars import Bar
from operators.decode import DEAD_LETTER_REASONS
from tests.helpers import (
    RECV, T0, WALL, assert_bars_match_reference, frame_batches, raw_batches, run_pipeline, settings, stored,
    stored_bars, synthetic_tape, trade,
)

MIN = 60_000


def test_every_bar_of_every_timeframe_matches_a_reference_group_by(store):
    # 27 hours from 22:00 crosses a day boundary: partial and full bars of every timeframe;
    # jitter reorders arrivals (never more than the allowed lateness)
    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT"], minutes=27 * 60,
                          start_ms=T0 - 2 * 3_600_000, rate=0.4, jitter_ms=1500)
    stats = run_pipeline(frame_batches(tape, 7_000), store)
    n = assert_bars_match_reference(store, tape)
    assert n > 3 * 27 * 60  # 1m bars alone
    assert stats.late_trades == 0 and stats.dead_letters == 0
    bars = stored_bars(store)
    # cohort and profile columns are filled
    one_h = bars.filter(pl.col("tf") == "1h")
    assert (one_h["pro_orders"] > 0).all() and (one_h["amateur_orders"] > 0).all()
    assert ((one_h["val"] <= one_h["poc"]) & (one_h["poc"] <= one_h["vah"])).all()
    assert ((one_h["low"] <= one_h["val"] + one_h["profile_bin"]) & (one_h["vah"] <= one_h["high"])).all()
    assert (bars["s_mood"].abs() <= 2).all() and (bars["s_top"].abs() <= 1).all()


def test_out_of_order_and_late_trades(store):
    s = 1000
    msgs = [
        trade(1, T0 + 10 * s, price=100),
        trade(2, T0 + 70 * s, price=101),  # window 1; watermark now 68 s
        trade(3, T0 + 5 * s, price=50),  # behind the watermark: late
        trade(4, T0 + 69 * s, price=102),  # out of order but within the allowed lateness
        trade(5, T0 + 59 * s, price=103),  # its window (0) is still open, but it is 11 s behind: late
        trade(6, T0 + 130 * s, price=104),
    ]
    stats = run_pipeline(raw_batches(msgs, size=2), store)
    bars = stored_bars(store).filter(pl.col("tf") == "1m")
    assert bars["start"].to_list() == [T0, T0 + MIN, T0 + 2 * MIN]
    assert bars["trades"].to_list() == [1, 2, 1]
    # ordered by event time inside the bar: 69 s (price 102) comes before 70 s (price 101)
    assert bars.row(1, named=True)["open"] == 102 and bars.row(1, named=True)["close"] == 101
    late = stored(store, "late_trades", "id")
    assert late["id"].to_list() == ["3", "5"]
    assert set(late["reason"]) == {"behind_watermark"}
    assert [w.timestamp() * 1000 for w in late["watermark"]] == [T0 + 68 * s, T0 + 68 * s]
    assert stats.late_trades == 2


def test_lateness_does_not_depend_on_batch_boundaries(store, other_store):
    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=30, rate=2, jitter_ms=4000)
    run_pipeline(frame_batches(tape, 997), store)
    run_pipeline(frame_batches(tape, 50), other_store)
    a, b = stored(store, "late_trades", "symbol, id"), stored(other_store, "late_trades", "symbol, id")
    assert a.height > 0, "jitter of 4 s should make some trades late"
    assert a.drop("recv_ts").equals(b.drop("recv_ts"))
    assert stored_bars(store).equals(stored_bars(other_store))


def test_duplicates_are_dropped_and_counted(store):
    msgs = [trade(1, T0 + 1000, amount=1), trade(2, T0 + 2000, amount=2), trade(1, T0 + 1000, amount=1),
            trade(3, T0 + 3000, amount=4), trade(2, T0 + 2000, amount=2), trade(2, T0 + 2000, amount=2),
            trade(1, T0 + 1000, amount=1, symbol="B/USDT:USDT")]  # same id, other instrument: not a dup
    stats = run_pipeline(raw_batches(msgs, size=3), store)
    bars = stored_bars(store).filter(pl.col("tf") == "1m").sort("symbol")
    assert bars["trades"].to_list() == [3, 1]
    assert bars["volume"].to_list() == [7.0, 1.0]
    assert stats.counters["duplicates"] == 3


def test_every_dead_letter_reason_is_stored_with_offset_and_the_pipeline_keeps_going(store):
    good = trade(1, T0 + 1000)
    bad = {
        "bad_json": b'{"exchange": "x", "symbol": ',
        "missing_field": msgspec.json.encode({k: v for k, v in trade(2, T0).items() if k != "price"}),
        "wrong_type": msgspec.json.encode({**trade(3, T0), "price": "abc"}),
        "non_finite": json.dumps(trade(4, T0, price=float("nan"))).encode(),  # Python writes NaN
        "non_positive": msgspec.json.encode(trade(5, T0, amount=-1.0)),
        "unknown_side": msgspec.json.encode(trade(6, T0, side="long")),
        "ts_out_of_range": msgspec.json.encode(trade(7, (T0 // 1000))),  # seconds, not ms
        "too_large": msgspec.json.encode({**trade(10, T0), "pad": "x" * 20_000}),
        "field_too_long": msgspec.json.encode(trade(11, T0, symbol="S" * 1_000)),
        "key_mismatch": (b"x:OTHER/USDT:USDT", trade(12, T0)),  # the Kafka key names another instrument
    }
    # "undecodable" (an unforeseen decoder failure) needs a fault seam: tests/unit/test_trades.py
    assert set(bad) | {"undecodable"} == set(DEAD_LETTER_REASONS)
    future = msgspec.json.encode(trade(8, RECV + 2 * 86_400_000))
    msgs = [good, *bad.values(), future, b"\xff\xfe not utf-8", trade(9, T0 + 2000)]
    stats = run_pipeline(raw_batches(msgs, size=4), store)
    dead = stored(store, "dead_letters", "offset")
    expected = {i + 1: r for i, r in enumerate(bad)} | {len(bad) + 1: "ts_out_of_range", len(bad) + 2: "bad_json"}
    assert dict(zip(dead["offset"].to_list(), dead["reason"].to_list())) == expected
    assert all(d for d in dead["detail"]) and all(p for p in dead["payload"])
    assert dead.filter(pl.col("offset") == 7)["detail"][0].startswith("ts=1704067200 is before 2010")
    assert dead.filter(pl.col("offset") == 3)["payload"][0] == bad["wrong_type"].decode()
    assert stats.dead_letters == len(bad) + 2
    bars = stored_bars(store).filter(pl.col("tf") == "1m")
    assert bars["trades"].to_list() == [2]  # the two good trades made their bar


def test_idle_symbol_closes_its_bar_on_the_wall_clock_without_spinning(store):
    # live pace: event time advances with the wall clock; symbol A trades once, 1 s before its
    # window ends, then goes quiet while the source pauses for 8 s before EOF.
    now = int(time.time() * 1000)
    end = now - now % MIN + MIN
    if end - now < 2500:
        end += MIN
    written = []

    class Recorder(list):  # TestingSink does `ls += items`
        def __iadd__(self, items):
            written.extend((time.monotonic(), i) for i in items)
            return super().__iadd__(items)

    items = raw_batches([trade(1, end - 1000, symbol="A/USDT:USDT")], partition="live")
    items[0].recv_ts = now
    items += [TestingSource.PAUSE(timedelta(seconds=8))]
    cpu0, t0 = time.process_time(), time.monotonic()
    run_pipeline(items, store, settings(), pace=1.0, sink=TestingSink(Recorder()))
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    bars = [(t - t0, v) for t, (_, v) in written if isinstance(v, Bar) and v.tf == "1m"]
    assert len(bars) == 1
    closed_after, bar = bars[0]
    # closed by the wall clock (window end + 2 s lateness), long before the source's EOF at 8 s
    assert closed_after < 7.0, f"bar closed after {closed_after:.1f} s (EOF comes at 8 s)"
    assert wall >= 8.0
    assert cpu < 0.5 * wall, f"{cpu:.1f} s CPU during {wall:.1f} s mostly idle: busy-spinning?"


def _tape_with_trouble():
    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=300, rate=0.5, jitter_ms=3000)
    msgs: list = tape.drop("offset").to_dicts()
    msgs.insert(100, b"not json")
    msgs.insert(2000, msgs[1500])  # a duplicate
    return msgs


def test_recovery_after_abort_stores_the_same_rows_as_an_uninterrupted_run(store, other_store, tmp_path):
    """Everything downstream too: features, labels, River predictions (model state survives the
    restart), decisions, fills and equity of the strategy."""
    msgs = _tape_with_trouble()
    plain = raw_batches(msgs, size=500)
    cfg = settings(tmp_path / "data", online_warmup_labels=5,
                   strategy={"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": False,
                             "consensus_enabled": False})
    run_pipeline(plain, store, cfg)

    items = list(plain)
    items.insert(len(items) // 3, TestingSource.ABORT())
    items.insert(2 * len(items) // 3, TestingSource.ABORT())
    (tmp_path / "rec").mkdir()
    init_db_dir(tmp_path / "rec", 1)
    rc = RecoveryConfig(str(tmp_path / "rec"))
    for _ in range(3):  # two aborts, then the run that reaches EOF
        run_pipeline(items, other_store, cfg, recovery=rc)

    for table, order, excl in (("bars", "exchange, symbol, tf, start", ()),
                               ("late_trades", "exchange, symbol, id", ("recv_ts",)),
                               ("dead_letters", "source, partition, offset", ("recv_ts",)),
                               ("features", "exchange, symbol, tf, start", ()),
                               ("labels", "exchange, symbol, tf, start", ()),
                               ("predictions", "exchange, symbol, tf, start, model", ()),
                               ("decisions", "strategy_id, exchange, symbol, ts", WALL["decisions"]),
                               ("fills", "strategy_id, position_id, ts, reason", ()),
                               ("equity", "strategy_id, ts", ())):
        a, b = stored(store, table, order, excl), stored(other_store, table, order, excl)
        assert a.height > 0, table
        assert a.equals(b), f"{table} differs after recovery"


def test_no_lookahead_changing_trades_after_t_changes_no_bar_ending_by_t(store, other_store):
    syms = ["BTC/USDT:USDT", "ETH/USDT:USDT"]
    base = synthetic_tape(syms, minutes=5 * 60, rate=0.5, jitter_ms=1000)
    cut = T0 + 2 * 3_600_000 + 15 * MIN  # 02:15
    other = synthetic_tape(syms, minutes=5 * 60, rate=1.5, seed=99, jitter_ms=1000)
    altered = pl.concat([base.filter(pl.col("ts") < cut),
                         other.filter(pl.col("ts") >= cut).with_columns(pl.col("price") * 1.3)])
    altered = altered.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))
    run_pipeline(frame_batches(base, 3000), store)
    run_pipeline(frame_batches(altered, 3000), other_store)
    a, b = stored_bars(store), stored_bars(other_store)
    before_a, before_b = a.filter(pl.col("end") <= cut), b.filter(pl.col("end") <= cut)
    assert set(before_a["tf"]) == {"1m", "5m", "15m", "1h"}
    assert before_a.height > 300
    assert before_a.equals(before_b)
    # and the future really was different
    assert not a.filter(pl.col("end") > cut).equals(b.filter(pl.col("end") > cut))
