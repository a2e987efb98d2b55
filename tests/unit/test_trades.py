"""Unit tests for the trade contract (operators/decode.py, admission.py): decode + validate
(RawBatch and FrameBatch), dedup, per-trade lateness and window chunks. Expected values are worked out by hand in the comments
or by a small independent Python loop, never copied from a run of the code."""

from __future__ import annotations

import json
import math

import msgspec
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from operators.admission import LATE_REASONS, admit, flush
from operators.admit_state import AdmitConfig, AdmitState
from operators.by_instrument import split_instruments
from operators.decode import DEAD_LETTER_REASONS, TRADE_SCHEMA, DecodeLimits, decode_batch
from operators.records import CHUNK_COLUMNS, DAY_MS, MIN_TS_MS, FrameBatch, RawBatch

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z, a minute boundary
NOW = T0 + 3_600_000  # "now" for validation: an hour after T0
RECV = T0 + 3_600_500  # batch recv_ts


def msg(**kw) -> dict:
    """A valid trade message; keyword arguments replace or add fields (None stays as JSON null)."""
    d = {"exchange": "x", "symbol": "A/USDT:USDT", "id": "1", "ts": T0, "price": 100.0, "amount": 1.0,
         "side": "buy"}
    d.update(kw)
    return d


def without(field: str, **kw) -> dict:
    d = msg(**kw)
    del d[field]
    return d


def enc(m) -> bytes:
    return m if isinstance(m, bytes) else msgspec.json.encode(m)


def raw(messages, offsets=None, recv_ts=RECV) -> RawBatch:
    payloads = [enc(m) for m in messages]
    offsets = list(range(100, 100 + len(payloads))) if offsets is None else offsets
    return RawBatch("kafka", "p3", offsets, payloads, recv_ts)


def dead_by_offset(decoded) -> dict:
    return {d.offset: d for d in decoded.dead}


# ---------------------------------------------------------------------------------------------
# RawBatch: good messages


GOOD = [
    msg(id="a1", ts=T0 + 1_000, price=100.5, amount=0.25, side="buy"),
    msg(id=42, ts=T0 + 2_000, price=101.0, amount=2.0, side="sell", trader="0xabc"),  # int id
    msg(id="a3", ts=T0 + 3_000, price=99.75, amount=1.5, side="buy", recv_ts=T0 + 3_100, cost=149.625),
]
GOOD_OFFSETS = [7, 8, 9]


def expected_good_frame() -> pl.DataFrame:
    """The frame GOOD must decode to, written out by hand."""
    return pl.DataFrame(
        {
            "exchange": ["x", "x", "x"],
            "symbol": ["A/USDT:USDT"] * 3,
            "id": ["a1", "42", "a3"],
            "ts": [T0 + 1_000, T0 + 2_000, T0 + 3_000],
            "price": [100.5, 101.0, 99.75],
            "amount": [0.25, 2.0, 1.5],
            "is_buy": [True, False, True],
            "trader": [None, "0xabc", None],
            "recv_ts": [RECV, RECV, T0 + 3_100],  # missing recv_ts -> the batch's recv_ts
            "seq": GOOD_OFFSETS,
        },
        schema=TRADE_SCHEMA,
    )


class _Boom:
    """Stands in for a msgspec decoder that must not be used."""

    def decode(self, *_):
        raise AssertionError("this decoder must not be called")


class _AlwaysFails:
    """A batch decoder that always fails, which forces the per-message fallback."""

    def decode(self, *_):
        raise msgspec.DecodeError("forced fallback")


def test_fast_path_decodes_the_whole_batch_in_one_go(monkeypatch):
    monkeypatch.setattr("operators.decode._decode_one", _Boom().decode)  # the per-message fallback must not be needed
    d = decode_batch(raw(GOOD, GOOD_OFFSETS), now_ms=NOW)
    assert d.dead == []
    assert_frame_equal(d.frame, expected_good_frame())


def test_fallback_gives_the_same_frame_as_the_fast_path(monkeypatch):
    fast = decode_batch(raw(GOOD, GOOD_OFFSETS), now_ms=NOW)
    monkeypatch.setattr("operators.decode._decode_all", _AlwaysFails().decode)
    slow = decode_batch(raw(GOOD, GOOD_OFFSETS), now_ms=NOW)
    assert slow.dead == []
    assert_frame_equal(slow.frame, fast.frame)
    assert_frame_equal(slow.frame, expected_good_frame())


def test_one_bad_message_forces_the_fallback_and_good_rows_are_unchanged():
    # the broken payload sits between good ones; the good rows keep their own offsets
    mixed = [GOOD[0], b'{"exchange": "x", "symbol": ', GOOD[1], GOOD[2]]
    d = decode_batch(raw(mixed, [7, 55, 8, 9]), now_ms=NOW)
    assert_frame_equal(d.frame, expected_good_frame())
    assert [(x.offset, x.reason) for x in d.dead] == [(55, "bad_json")]


def test_int_id_becomes_a_string_on_both_paths(monkeypatch):
    batch = raw([msg(id=1234567890123), msg(id="7", ts=T0 + 1)])
    assert decode_batch(batch, now_ms=NOW).frame["id"].to_list() == ["1234567890123", "7"]
    monkeypatch.setattr("operators.decode._decode_all", _AlwaysFails().decode)
    assert decode_batch(batch, now_ms=NOW).frame["id"].to_list() == ["1234567890123", "7"]


def test_recv_ts_defaults_to_the_batch_recv_ts_and_is_kept_when_given():
    d = decode_batch(raw([msg(id="1"), msg(id="2", recv_ts=T0 + 5)], recv_ts=T0 + 999), now_ms=NOW)
    assert d.frame["recv_ts"].to_list() == [T0 + 999, T0 + 5]


def test_empty_batch_gives_an_empty_frame_with_the_schema():
    d = decode_batch(raw([], []), now_ms=NOW)
    assert d.frame.height == 0 and d.dead == []
    assert dict(d.frame.schema) == TRADE_SCHEMA


# ---------------------------------------------------------------------------------------------
# RawBatch: every dead-letter reason

NAN_PAYLOAD = json.dumps(msg(price=float("nan"))).encode()  # Python writes the bare token NaN
INF_PAYLOAD = json.dumps(msg(amount=float("inf"))).encode()  # ... and Infinity
assert b"NaN" in NAN_PAYLOAD and b"Infinity" in INF_PAYLOAD

BAD_CASES = [
    # (payload, reason, words the detail must contain)
    (b'{"exchange": "x", "symbol": ', "bad_json", []),
    (b"not json at all", "bad_json", []),
    (b"\xff\xfe{}", "bad_json", []),  # not UTF-8
    (b"", "bad_json", []),
    (without("price"), "missing_field", ["price"]),
    (without("side"), "missing_field", ["side"]),
    (msg(price=None), "missing_field", ["price"]),
    (msg(ts=None), "missing_field", ["ts"]),
    (msg(id=None), "missing_field", ["id"]),
    (msg(id=""), "missing_field", ["id"]),
    (msg(symbol=""), "missing_field", ["symbol"]),
    (msg(exchange=""), "missing_field", ["exchange"]),
    (msg(price="abc"), "wrong_type", ["price"]),
    (msg(amount=True), "wrong_type", ["amount"]),
    (msg(ts=1.7e12), "wrong_type", ["ts"]),  # ts must be an int
    (msg(ts="1704067200000"), "wrong_type", ["ts"]),
    (msg(id=1.5), "wrong_type", ["id"]),
    (NAN_PAYLOAD, "non_finite", []),
    (INF_PAYLOAD, "non_finite", []),
    (enc(msg()).replace(b'"price":100.0', b'"price":1e999'), "non_finite", ["price"]),
    (enc(msg()).replace(b'"amount":1.0', b'"amount":-1e999'), "non_finite", ["amount"]),
    (msg(price=0.0), "non_positive", ["price"]),
    (msg(amount=-1.0), "non_positive", ["amount"]),
    (msg(side="BUY"), "unknown_side", ["BUY"]),
    (msg(side="hold"), "unknown_side", ["hold"]),
    (msg(side=""), "unknown_side", ["side"]),
    (msg(ts=T0 // 1000), "ts_out_of_range", ["seconds"]),  # seconds instead of ms
    (msg(ts=NOW + DAY_MS + 1), "ts_out_of_range", [str(NOW + DAY_MS + 1)]),  # far future
    (msg(ts=NOW + 30 * DAY_MS), "ts_out_of_range", []),
]


@pytest.mark.parametrize("payload,reason,words", BAD_CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD_CASES)])
def test_each_bad_message_becomes_a_dead_letter_with_reason_offset_and_detail(payload, reason, words):
    # the bad one sits in the middle of good ones, so we also see the others survive
    good_a, good_b = msg(id="g1", ts=T0 + 1), msg(id="g2", ts=T0 + 2)
    d = decode_batch(raw([good_a, payload, good_b], [500, 501, 502]), now_ms=NOW)
    assert d.frame["id"].to_list() == ["g1", "g2"]
    assert len(d.dead) == 1
    dl = d.dead[0]
    assert dl.reason == reason
    assert dl.reason in DEAD_LETTER_REASONS
    assert dl.offset == 501
    assert (dl.source, dl.partition, dl.recv_ts) == ("kafka", "p3", RECV)
    assert dl.payload == enc(payload).decode("utf-8", errors="backslashreplace")
    assert isinstance(dl.detail, str) and len(dl.detail) > 5 and dl.detail != dl.reason
    for w in words:
        assert w in dl.detail, f"detail {dl.detail!r} should mention {w!r}"


def test_ts_limits_are_inclusive_at_the_edges():
    ok = [msg(id="lo", ts=MIN_TS_MS), msg(id="hi", ts=NOW + DAY_MS)]
    bad = [msg(id="lo-1", ts=MIN_TS_MS - 1), msg(id="hi+1", ts=NOW + DAY_MS + 1)]
    d = decode_batch(raw(ok + bad, [1, 2, 3, 4]), now_ms=NOW)
    assert d.frame["id"].to_list() == ["lo", "hi"]
    assert {x.offset: x.reason for x in d.dead} == {3: "ts_out_of_range", 4: "ts_out_of_range"}


def test_max_future_is_configurable():
    d = decode_batch(raw([msg(id="a", ts=NOW + 60_000), msg(id="b", ts=NOW + 60_001)]), now_ms=NOW,
                     max_future_ms=60_000)
    assert d.frame["id"].to_list() == ["a"]
    assert [x.reason for x in d.dead] == ["ts_out_of_range"]


def test_value_rule_dead_letters_keep_their_offsets_on_the_fast_path():
    # all four parse, so the fast path is taken; the value rules reject two of them
    batch = raw([msg(id="1"), msg(id="2", price=0.0), msg(id="3"), msg(id="4", side="hold")], [10, 11, 12, 13])
    d = decode_batch(batch, now_ms=NOW)
    assert d.frame["seq"].to_list() == [10, 12]
    assert {k: v.reason for k, v in dead_by_offset(d).items()} == {11: "non_positive", 13: "unknown_side"}


def test_value_rule_dead_letters_keep_their_offsets_on_the_fallback_path():
    # a bad JSON payload first shifts every later message's position in the decoded list
    batch = raw([b"{oops", msg(id="2", amount=-3.0), msg(id="3"), b"}", msg(id="5", ts=12)],
                [20, 21, 22, 23, 24])
    d = decode_batch(batch, now_ms=NOW)
    assert d.frame["seq"].to_list() == [22]
    assert {k: v.reason for k, v in dead_by_offset(d).items()} == {
        20: "bad_json", 21: "non_positive", 23: "bad_json", 24: "ts_out_of_range"}
    assert dead_by_offset(d)[21].payload == enc(msg(id="2", amount=-3.0)).decode()


@pytest.mark.parametrize("payload", [
    b"[",  # truncated array
    b'{"exchange": 1,',  # truncated object whose first value also has the wrong type
    b'{"exchange":"x","symbol":"A","id":"1","ts":1704067200000,"price":null,"amount":',  # cut after a null
])
def test_payload_that_is_not_valid_json_is_bad_json_whatever_it_starts_with(payload):
    # "bad JSON" is its own reason; a payload cut short is not valid JSON, even when the
    # decoder happens to meet a type mismatch or a null before it meets the end of the input
    d = decode_batch(raw([payload], [3]), now_ms=NOW)
    assert [(x.offset, x.reason) for x in d.dead] == [(3, "bad_json")]


def test_a_payload_holding_two_trades_is_not_taken_as_two_messages():
    # joined naively into one array this would be 3 elements for 2 payloads
    two = enc(msg(id="a")) + b"," + enc(msg(id="b"))
    d = decode_batch(raw([two, msg(id="c")], [1, 2]), now_ms=NOW)
    assert d.frame["id"].to_list() == ["c"]
    assert [(x.offset, x.reason) for x in d.dead] == [(1, "bad_json")]


# ---------------------------------------------------------------------------------------------
# FrameBatch (columns as text, like a CSV)


def text_frame(rows: list[dict]) -> pl.DataFrame:
    cols = ["exchange", "symbol", "id", "ts", "price", "amount", "side", "offset"]
    return pl.DataFrame({c: [r.get(c) for r in rows] for c in cols},
                        schema={**{c: pl.String for c in cols[:-1]}, "offset": pl.Int64})


def row(offset, **kw) -> dict:
    d = {"exchange": "x", "symbol": "A/USDT:USDT", "id": f"r{offset}", "ts": str(T0 + offset),
         "price": "100.5", "amount": "2", "side": "sell", "offset": offset}
    d.update(kw)
    return d


def test_frame_batch_good_rows_are_typed():
    f = text_frame([row(0), row(1, side="buy", price=" 99.25 ", amount="0.5")])
    d = decode_batch(FrameBatch("replay", "0:x.csv", f, RECV), now_ms=NOW)
    assert d.dead == []
    expected = pl.DataFrame(
        {"exchange": ["x", "x"], "symbol": ["A/USDT:USDT"] * 2, "id": ["r0", "r1"], "ts": [T0, T0 + 1],
         "price": [100.5, 99.25], "amount": [2.0, 0.5], "is_buy": [False, True], "trader": [None, None],
         "recv_ts": [RECV, RECV], "seq": [0, 1]},
        schema=TRADE_SCHEMA,
    )
    assert_frame_equal(d.frame, expected)


def test_frame_batch_int_ids_become_strings_and_recv_ts_column_is_used():
    f = pl.DataFrame({"exchange": ["x", "x"], "symbol": ["S", "S"], "id": [5, 6], "ts": [T0, T0 + 1],
                      "price": [1.0, 2.0], "amount": [1.0, 1.0], "side": ["buy", "sell"], "offset": [0, 1],
                      "recv_ts": [T0 + 10, None]})
    d = decode_batch(FrameBatch("s", "0", f, RECV), now_ms=NOW)
    assert d.frame["id"].to_list() == ["5", "6"]
    assert d.frame["recv_ts"].to_list() == [T0 + 10, RECV]


def test_frame_batch_float_ts_must_be_whole_milliseconds():
    # Parquet written by pandas often stores ts as float64
    f = pl.DataFrame({"exchange": ["x"] * 2, "symbol": ["S"] * 2, "id": ["a", "b"], "ts": [T0 + 5.0, T0 + 5.5],
                      "price": [1.0, 1.0], "amount": [1.0, 1.0], "side": ["buy", "buy"], "offset": [0, 1]})
    d = decode_batch(FrameBatch("s", "0", f, RECV), now_ms=NOW)
    assert d.frame["ts"].to_list() == [T0 + 5]
    assert [(x.offset, x.reason) for x in d.dead] == [(1, "wrong_type")]
    assert "ts" in d.dead[0].detail


FRAME_BAD = [
    # (row overrides, reason, words the detail must contain)
    ({"price": "abc"}, "wrong_type", ["price", "abc"]),
    ({"amount": "1,5"}, "wrong_type", ["amount"]),
    ({"ts": "yesterday"}, "wrong_type", ["ts"]),
    ({"price": None}, "missing_field", ["price"]),
    ({"side": None}, "missing_field", ["side"]),
    ({"id": ""}, "missing_field", ["id"]),
    ({"symbol": None}, "missing_field", ["symbol"]),
    ({"amount": ""}, "missing_field", ["amount"]),  # an empty CSV cell is a missing value
    ({"price": "NaN"}, "non_finite", ["price"]),
    ({"price": "1e999"}, "non_finite", ["price"]),
    ({"amount": "inf"}, "non_finite", ["amount"]),
    ({"price": "0"}, "non_positive", ["price"]),
    ({"amount": "-2"}, "non_positive", ["amount"]),
    ({"side": "short"}, "unknown_side", ["short"]),
    ({"ts": str(T0 // 1000)}, "ts_out_of_range", ["seconds"]),
    ({"ts": str(NOW + 2 * DAY_MS)}, "ts_out_of_range", []),
]


@pytest.mark.parametrize("over,reason,words", FRAME_BAD, ids=[f"{i}-{c[1]}" for i, c in enumerate(FRAME_BAD)])
def test_frame_batch_bad_rows_become_dead_letters_with_the_original_row(over, reason, words):
    rows = [row(10), row(11, **over), row(12)]
    f = text_frame(rows)
    d = decode_batch(FrameBatch("replay", "0:x.csv", f, RECV), now_ms=NOW)
    assert d.frame["seq"].to_list() == [10, 12]
    assert len(d.dead) == 1
    dl = d.dead[0]
    assert dl.reason == reason
    assert dl.offset == 11
    assert (dl.source, dl.partition, dl.recv_ts) == ("replay", "0:x.csv", RECV)
    assert json.loads(dl.payload) == rows[1]  # the row exactly as it was in the file
    assert len(dl.detail) > 5 and dl.detail != reason
    for w in words:
        assert w in dl.detail, f"detail {dl.detail!r} should mention {w!r}"


def test_frame_batch_and_raw_batch_agree_on_the_same_trades():
    rows = [row(0), row(1, price="0"), row(2, side="buy"), row(3, side="?"), row(4, ts=str(T0 // 1000))]
    msgs = [msg(exchange=r["exchange"], symbol=r["symbol"], id=r["id"], ts=int(r["ts"]), price=float(r["price"]),
                amount=float(r["amount"]), side=r["side"]) for r in rows]
    a = decode_batch(FrameBatch("s", "0", text_frame(rows), RECV), now_ms=NOW)
    b = decode_batch(raw(msgs, [0, 1, 2, 3, 4]), now_ms=NOW)
    assert_frame_equal(a.frame, b.frame)
    assert {x.offset: x.reason for x in a.dead} == {x.offset: x.reason for x in b.dead} == {
        1: "non_positive", 3: "unknown_side", 4: "ts_out_of_range"}


def test_frame_batch_without_required_columns_is_an_error_naming_them():
    f = text_frame([row(0)]).drop("side", "offset")
    with pytest.raises(ValueError, match="offset.*side|side.*offset"):
        decode_batch(FrameBatch("s", "0", f, RECV), now_ms=NOW)


# ---------------------------------------------------------------------------------------------
# admit: dedup


def trades_frame(items, exchange="x", symbol="A/USDT:USDT") -> pl.DataFrame:
    """items: (id, ts) or (id, ts, price); one instrument, arrival order = list order."""
    n = len(items)
    return pl.DataFrame(
        {
            "exchange": [exchange] * n,
            "symbol": [symbol] * n,
            "id": [str(it[0]) for it in items],
            "ts": [it[1] for it in items],
            "price": [float(it[2]) if len(it) > 2 else 100.0 for it in items],
            "amount": [1.0] * n,
            "is_buy": [i % 2 == 0 for i in range(n)],
            "trader": [None] * n,
            "recv_ts": [RECV] * n,
            "seq": list(range(n)),
        },
        schema=TRADE_SCHEMA,
    )


def established() -> AdmitState:
    """An instrument whose event time is already established at T0. (A new stream's first trades are
    held until ``jump_confirm`` of them agree: tested with the jump rule below; the dedup and lateness
    tests are about what happens after that.)"""
    return AdmitState(max_ts=T0)


def admitted_ids(adm) -> list[str]:
    return [i for c in adm.chunks for i in c.trades["id"].to_list()]


def test_duplicates_within_a_batch_are_dropped_and_counted():
    st = AdmitState()
    adm = admit(st, trades_frame([("1", T0 + 1), ("2", T0 + 2), ("1", T0 + 1), ("3", T0 + 3), ("2", T0 + 2),
                                  ("2", T0 + 2)]), AdmitConfig())
    assert adm.duplicates == 3
    assert admitted_ids(adm) == ["1", "2", "3"]  # first occurrence kept
    assert adm.chunks[0].trades["seq"].to_list() == [0, 1, 3]


def test_duplicates_across_batches_are_dropped_and_counted():
    st, cfg = established(), AdmitConfig()
    a = admit(st, trades_frame([("1", T0 + 1), ("2", T0 + 2)]), cfg)
    b = admit(st, trades_frame([("2", T0 + 2), ("3", T0 + 3), ("1", T0 + 1)]), cfg)
    c = admit(st, trades_frame([("3", T0 + 3)]), cfg)  # only duplicates: nothing out but the count
    assert (a.duplicates, b.duplicates, c.duplicates) == (0, 2, 1)
    assert admitted_ids(a) == ["1", "2"] and admitted_ids(b) == ["3"] and admitted_ids(c) == []
    assert c.late is None


def test_same_id_on_another_instrument_is_not_a_duplicate():
    frame = pl.concat([trades_frame([("1", T0 + 1), ("2", T0 + 2)], symbol="A/USDT:USDT"),
                       trades_frame([("1", T0 + 1)], symbol="B/USDT:USDT"),
                       trades_frame([("1", T0 + 5)], exchange="y", symbol="A/USDT:USDT")])
    parts = split_instruments(frame)
    assert [k for k, _ in parts] == ["x:A/USDT:USDT", "x:B/USDT:USDT", "y:A/USDT:USDT"]
    states = {}
    got = {k: admit(states.setdefault(k, established()), p, AdmitConfig()) for k, p in parts}
    assert {k: (admitted_ids(a), a.duplicates) for k, a in got.items()} == {
        "x:A/USDT:USDT": (["1", "2"], 0), "x:B/USDT:USDT": (["1"], 0), "y:A/USDT:USDT": (["1"], 0)}
    # but a repeat on the same instrument is
    again = admit(states["x:B/USDT:USDT"], trades_frame([("1", T0 + 1)], symbol="B/USDT:USDT"), AdmitConfig())
    assert again.duplicates == 1 and admitted_ids(again) == []


def test_dedup_forgets_ids_older_than_the_horizon():
    cfg = AdmitConfig(lateness_ms=2_000, dedup_horizon_ms=60_000)
    st = AdmitState()
    admit(st, trades_frame([("a", T0 + 1_000)]), cfg)
    admit(st, trades_frame([("b", T0 + 30_000)]), cfg)
    # 29 s after "a": inside the horizon, still a duplicate
    assert admit(st, trades_frame([("a", T0 + 31_000)]), cfg).duplicates == 1
    # newest ts now T0+62 s: the horizon starts at T0+2 s, so "a" (T0+1 s) is forgotten, "b" is not
    admit(st, trades_frame([("c", T0 + 62_000)]), cfg)
    adm = admit(st, trades_frame([("a", T0 + 62_500), ("b", T0 + 62_500)]), cfg)
    assert admitted_ids(adm) == ["a"]
    assert adm.duplicates == 1


def test_dedup_memory_is_capped_oldest_first():
    cfg = AdmitConfig(dedup_max_ids=2)
    st = AdmitState()
    for i in ("1", "2", "3"):
        admit(st, trades_frame([(i, T0 + int(i))]), cfg)
    # three ids seen, room for two: "1" is forgotten
    adm = admit(st, trades_frame([("1", T0 + 10), ("2", T0 + 10), ("3", T0 + 10)]), cfg)
    assert admitted_ids(adm) == ["1"] and adm.duplicates == 2


# ---------------------------------------------------------------------------------------------
# admit: lateness and chunks


def test_lateness_is_per_trade_against_the_newest_earlier_ts():
    cfg = AdmitConfig(lateness_ms=2_000)
    s = 1_000
    items = [("1", T0 + 10 * s), ("2", T0 + 20 * s),
             ("3", T0 + 18 * s - 1),  # 20 s - 2 s = 18 s watermark; 1 ms below -> late
             ("4", T0 + 18 * s),  # exactly at the watermark: on time
             ("5", T0 + 25 * s),
             ("6", T0 + 22 * s),  # 25 - 2 = 23 s watermark -> late
             ("7", T0 + 23 * s)]  # on time
    adm = admit(AdmitState(), trades_frame(items), cfg)
    assert adm.late is not None and adm.late.reason == "behind_watermark"
    assert adm.late.trades["id"].to_list() == ["3", "6"]
    assert adm.late.trades["watermark"].to_list() == [T0 + 18 * s, T0 + 23 * s]
    assert set(TRADE_SCHEMA) <= set(adm.late.trades.columns)
    assert (adm.late.exchange, adm.late.symbol) == ("x", "A/USDT:USDT")
    assert admitted_ids(adm) == ["1", "2", "4", "5", "7"]


def test_lateness_carries_across_batches():
    cfg = AdmitConfig(lateness_ms=2_000)
    st = established()
    assert admit(st, trades_frame([("1", T0 + 50_000)]), cfg).late is None
    adm = admit(st, trades_frame([("2", T0 + 47_999), ("3", T0 + 48_000)]), cfg)
    assert adm.late.trades["id"].to_list() == ["2"]
    assert adm.late.trades["watermark"].to_list() == [T0 + 48_000]
    assert admitted_ids(adm) == ["3"]
    assert st.max_ts == T0 + 50_000


def _reference_admission(items, lateness):
    """Independent reference: a plain loop over the stream in arrival order."""
    seen, newest = set(), None
    late, late_wm, on_time, dups = [], [], {}, 0
    for i, ts in items:
        if i in seen:
            dups += 1
            continue
        seen.add(i)
        if newest is not None and ts < newest - lateness:
            late.append(i)
            late_wm.append(newest - lateness)
        else:
            on_time.setdefault(ts - ts % 60_000, []).append(i)
        newest = ts if newest is None else max(newest, ts)
    return late, late_wm, on_time, dups


def test_lateness_and_chunk_contents_do_not_depend_on_batch_cuts():
    rng = np.random.default_rng(11)
    n = 600
    ts = T0 + np.arange(n) * 700 + rng.integers(-5_000, 5_000, n)  # ~7 minutes, jittered by ±5 s
    items = [(f"t{i}", int(t)) for i, t in enumerate(ts)]
    for j in (30, 200, 201, 450):  # a few repeats, sent again a little later
        items.insert(j + 3, items[j])
    late_ref, wm_ref, on_time_ref, dups_ref = _reference_admission(items, 2_000)
    assert 10 < len(late_ref) < n // 2 and dups_ref == 4  # the stream is interesting
    assert len(on_time_ref) >= 7

    full = trades_frame(items)
    news_ref = None
    for size in (1, 2, 3, 7, 64, 250, len(items)):
        st = AdmitState()
        late_ids, late_wm, by_window, dups, news = [], [], {}, 0, {}
        for lo in range(0, full.height, size):
            adm = admit(st, full.slice(lo, size), AdmitConfig(lateness_ms=2_000))
            dups += adm.duplicates
            if adm.late is not None:
                late_ids += adm.late.trades["id"].to_list()
                late_wm += adm.late.trades["watermark"].to_list()
            starts = [c.window_start for c in adm.chunks]
            assert starts == sorted(starts) and len(set(starts)) == len(starts)
            for c in adm.chunks:
                by_window.setdefault(c.window_start, []).extend(c.trades["id"].to_list())
                for x in c.news:  # late counts ride the window of the frontier they were judged by
                    news.setdefault(c.window_start, {}).setdefault(x.minute, 0)
                    news[c.window_start][x.minute] += x.n
        assert sum(n for w in news.values() for n in w.values()) == len(late_ref)
        assert set(news) <= set(by_window), "a carrier window has on-time trades"
        news_ref = news_ref or news
        assert news == news_ref, f"batch size {size}: the news rides other windows"
        assert late_ids == late_ref, f"batch size {size}"
        assert late_wm == wm_ref, f"batch size {size}"
        assert dups == dups_ref, f"batch size {size}"
        assert by_window == on_time_ref, f"batch size {size}"


def test_chunks_are_one_per_window_oldest_first_with_max_ts():
    cfg = AdmitConfig(lateness_ms=2_000)
    items = [("a", T0 + 59_000), ("b", T0 + 60_500),
             ("c", T0 + 59_500),  # window 0 again, 1 s behind the newest: on time
             ("d", T0 + 121_000), ("e", T0 + 119_500), ("f", T0 + 125_000)]
    adm = admit(AdmitState(), trades_frame(items), cfg)
    assert adm.late is None
    got = [(c.window_start, c.max_ts, c.trades["id"].to_list()) for c in adm.chunks]
    assert got == [(T0, T0 + 59_500, ["a", "c"]),
                   (T0 + 60_000, T0 + 119_500, ["b", "e"]),
                   (T0 + 120_000, T0 + 125_000, ["d", "f"])]
    for c in adm.chunks:
        assert c.trades.columns == CHUNK_COLUMNS
        assert (c.exchange, c.symbol) == ("x", "A/USDT:USDT")
        assert all(c.window_start <= t < c.window_start + 60_000 for t in c.trades["ts"])


def test_a_batch_inside_one_window_is_one_chunk():
    adm = admit(AdmitState(), trades_frame([("a", T0 + 61_000), ("b", T0 + 60_000), ("c", T0 + 62_000)]),
                AdmitConfig())
    assert [(c.window_start, c.max_ts, c.trades["id"].to_list()) for c in adm.chunks] == [
        (T0 + 60_000, T0 + 62_000, ["a", "b", "c"])]


def test_prices_survive_admission_unchanged():
    items = [("a", T0 + 1, 10.5), ("b", T0 + 2, 11.25), ("c", T0 + 60_001, 9.75)]
    adm = admit(AdmitState(), trades_frame(items), AdmitConfig())
    prices = [p for c in adm.chunks for p in c.trades["price"].to_list()]
    assert prices == [10.5, 11.25, 9.75]
    assert not any(math.isnan(p) for p in prices)


# ---------------------------------------------------------------------------------------------
# admit: robust event time (the jump rule)

HOUR = 3_600_000


def run_admit(items, cfg=AdmitConfig(), size=None, recv=None, end=True):
    """Admit ``items`` ((id, ts) in arrival order) in batches of ``size``; returns on-time ids,
    behind-watermark ids, outlier ids and unconfirmed ids, plus the state."""
    frame = trades_frame(items)
    # received "now", years after the trades (a replay), unless the test says otherwise
    recv = recv if recv is not None else [T0 + 3 * 365 * 24 * HOUR] * len(items)
    frame = frame.with_columns(pl.Series("recv_ts", recv, dtype=pl.Int64))
    st = AdmitState()
    on_time, late, outliers, unconfirmed = [], [], [], []

    def take(adm):
        on_time.extend(admitted_ids(adm))
        if adm.late is not None:
            late.extend(adm.late.trades["id"].to_list())
        if adm.outliers is not None:
            assert adm.outliers.reason in LATE_REASONS
            (outliers if adm.outliers.reason == "ts_outlier" else unconfirmed).extend(
                adm.outliers.trades["id"].to_list())

    size = size or frame.height
    for lo in range(0, frame.height, size):
        take(admit(st, frame.slice(lo, size), cfg))
    if end:
        take(flush(st, cfg))
    return on_time, late, outliers, unconfirmed, st


def steady(n, start=T0, step=1_000, prefix="t"):
    return [(f"{prefix}{i}", start + i * step) for i in range(n)]


@pytest.mark.parametrize("ahead", [3 * HOUR, 2 * 365 * 24 * HOUR], ids=["hours", "years"])
def test_one_trade_stamped_far_ahead_is_an_outlier_and_loses_no_other_trade(ahead):
    items = steady(200)
    items.insert(100, ("bad", T0 + 100_000 + ahead))  # mid-stream, like the Binance tape of the issue
    for size in (1, 7, 64, None):
        on_time, late, outliers, unconfirmed, st = run_admit(items, size=size)
        assert outliers == ["bad"] and late == [] and unconfirmed == []
        assert on_time == [i for i, _ in items if i != "bad"]
        assert st.max_ts == T0 + 199_000  # the frontier never leapt


def test_a_handful_of_bad_timestamps_in_a_row_is_still_refuted():
    items = steady(50) + [("b1", T0 + 5 * HOUR), ("b2", T0 + 5 * HOUR + 1)] + steady(50, start=T0 + 50_000, prefix="u")
    on_time, late, outliers, _, _ = run_admit(items)
    assert outliers == ["b1", "b2"] and late == [] and len(on_time) == 100


def test_a_real_gap_is_confirmed_by_the_trades_after_it():
    # an instrument quiet for an hour, then trading again: nothing is lost, nothing is late
    items = steady(30) + steady(30, start=T0 + 30_000 + HOUR, prefix="after")
    for size in (1, 4, None):
        on_time, late, outliers, unconfirmed, st = run_admit(items, size=size)
        assert on_time == [i for i, _ in items] and late == outliers == unconfirmed == []
        assert st.max_ts == items[-1][1]


def test_a_sparse_stream_with_gaps_longer_than_jump_ms_loses_nothing_but_a_lone_last_trade():
    # every gap is 20 min (> jump_ms 15 min): each jump is held until the next trades follow it
    items = [(f"s{i}", T0 + i * 20 * 60_000) for i in range(10)]
    on_time, late, outliers, unconfirmed, _ = run_admit(items)
    assert late == outliers == []
    assert on_time + unconfirmed == [i for i, _ in items]
    assert unconfirmed == ["s9"]  # a lone trade after a jump at the very end cannot be told from a bad stamp


def test_held_trades_that_two_agree_on_are_admitted_at_the_end():
    items = steady(10) + [("j1", T0 + 2 * HOUR), ("j2", T0 + 2 * HOUR + 500)]
    on_time, late, outliers, unconfirmed, _ = run_admit(items)
    assert on_time == [i for i, _ in items] and late == outliers == unconfirmed == []


def test_a_bad_first_trade_does_not_define_the_stream_time():
    # (one stamped far *before* the rest would be admitted as a bar of its own: documented limit)
    items = [("first", T0 + 2 * 365 * 24 * HOUR)] + steady(20)
    on_time, late, outliers, _, st = run_admit(items)
    assert outliers == ["first"] and late == [] and on_time == [i for i, _ in steady(20)]


def test_a_trade_ahead_of_its_own_receipt_is_an_outlier_at_once():
    items = steady(10) + [("future", T0 + 10_000 + HOUR)] + steady(5, start=T0 + 10_000, prefix="u")
    recv = [t + 50 for _, t in items]
    recv[10] = T0 + 10_050  # received at the time of its neighbours, stamped an hour later
    on_time, late, outliers, _, _ = run_admit(items, recv=recv, end=False)
    assert outliers == ["future"] and late == [] and len(on_time) == 15


def test_on_a_live_feed_a_jump_stamped_near_its_receipt_needs_no_confirmation():
    # quiet for an hour, then one trade received the moment it happened: admitted at once, not held
    items = steady(5) + [("live", T0 + 5_000 + HOUR)]
    recv = [t + 30 for _, t in items]
    on_time, _, _, _, st = run_admit(items, recv=recv, end=False)
    assert on_time == [i for i, _ in items] and st.pending is None


def test_the_jump_rule_does_not_depend_on_batch_cuts():
    rng = np.random.default_rng(5)
    items = steady(400, step=700)
    for k, j in enumerate(sorted(rng.choice(np.arange(20, 380), 6, replace=False).tolist())):
        items.insert(j + k, (f"bad{k}", int(T0 + j * 700 + rng.integers(1, 50) * HOUR)))
    items.insert(200, ("late", T0 + 100_000))
    results = {size: run_admit(items, size=size)[:4] for size in (1, 2, 5, 33, None)}
    first = results[None]
    assert sorted(first[2]) == [f"bad{k}" for k in range(6)] and first[1] == ["late"]
    assert all(r == first for r in results.values())


def test_an_instrument_with_fewer_trades_than_jump_confirm_is_admitted_at_the_end():
    on_time, late, outliers, unconfirmed, _ = run_admit([("only", T0)])
    assert on_time == ["only"] and late == outliers == unconfirmed == []


class _Explodes:
    """A decoder failing in a way nobody foresaw (fault seam for ``undecodable``)."""

    def decode(self, *_):
        raise RuntimeError("decoder exploded")


def test_an_unforeseen_decoder_failure_is_a_dead_letter_not_a_crash(monkeypatch):
    monkeypatch.setattr("operators.decode._ONE_DECODER", _Explodes())
    d = decode_batch(raw([msg(id="a")], [9]), now_ms=NOW)
    assert d.frame.height == 0
    assert [(x.offset, x.reason) for x in d.dead] == [(9, "undecodable")]
    assert "RuntimeError: decoder exploded" in d.dead[0].detail


@pytest.mark.parametrize("payload,reason", [
    (b"[" * 5_000, "bad_json"),  # 5,000 unclosed arrays (was a RecursionError that stopped the run)
    (b'{"a":' * 3_000, "bad_json"),  # nested deeper than any decoder goes (was a RecursionError)
    (b"\x00\x01\x02\xff" * 100, "bad_json"),  # binary
    (enc(msg(id="a")) + b"," + enc(msg(id="b")), "bad_json"),  # two objects joined in one message
    (enc(msg(id="a"))[:40], "bad_json"),  # the first half of an object split over two messages
    (enc(msg(id="a"))[40:], "bad_json"),  # ... and its second half
    (enc(msg(id="a", ts=10**30)), "wrong_type"),  # an integer no int64 holds
    (enc(msg(id="a" * 200)), "field_too_long"),
    (enc(msg(symbol="S" * 100_000)), "too_large"),  # 100,000-character symbol: larger than the message bound
])
def test_malformed_messages_are_each_one_dead_letter(payload, reason):
    d = decode_batch(raw([msg(id="g1", ts=T0 + 1), payload, msg(id="g2", ts=T0 + 2)], [1, 2, 3]), now_ms=NOW)
    assert d.frame["id"].to_list() == ["g1", "g2"]
    assert [(x.offset, x.reason) for x in d.dead] == [(2, reason)]
    assert len(d.dead[0].payload) <= DecodeLimits().max_message_bytes + 100


def test_a_split_object_cannot_borrow_the_comma_of_a_joined_neighbour():
    # with naive batch joining, "{A},{B}" + "{C" + "D}" decodes to 3 trades for 3 messages
    a, b = enc(msg(id="a")), enc(msg(id="b"))
    c = enc(msg(id="c"))
    cut = c.index(b',"id"')
    d = decode_batch(raw([a + b"," + b, c[:cut], c[cut + 1:]], [1, 2, 3]), now_ms=NOW)
    assert d.frame.height == 0 and [x.reason for x in d.dead] == ["bad_json"] * 3


def test_the_kafka_key_must_name_the_trades_own_instrument():
    batch = raw([msg(id="1"), msg(id="2"), msg(id="3")], [1, 2, 3])
    batch.keys = [b"x:A/USDT:USDT", b"x:BTC/USDT:USDT", None]  # None: no key, nothing to check
    d = decode_batch(batch, now_ms=NOW)
    assert d.frame["id"].to_list() == ["1", "3"]
    assert [(x.offset, x.reason) for x in d.dead] == [(2, "key_mismatch")]
    assert "x:BTC/USDT:USDT" in d.dead[0].detail and "x:A/USDT:USDT" in d.dead[0].detail


def test_message_limits_are_settings():
    limits = DecodeLimits(max_message_bytes=100_000, max_field_chars=2_000)
    d = decode_batch(raw([msg(id="a" * 1_500)], [1]), now_ms=NOW, limits=limits)
    assert d.frame.height == 1 and d.dead == []
