"""The value rules of operators/decode.py when a row breaks several at once, and the parts of them
that change from batch to batch. The rules' expressions are built once and reused (a paced or
live source hands over batches of a few trades, where building them cost more than applying
them), so these tests check what reuse could break: the newest allowed ``ts`` follows each
batch's ``now_ms``, and the first broken rule in the documented order is the reason. The
expected reasons come from a plain Python loop over the documented order, not from a run."""

from __future__ import annotations

import math
import random

import msgspec
import polars as pl

from operators.decode import DecodeLimits, decode_batch
from operators.records import DAY_MS, MIN_TS_MS, FrameBatch, RawBatch

T0 = 1_704_067_200_000
NOW = T0 + 3_600_000
MAX_CHARS = DecodeLimits().max_field_chars


def expected_reason(r: dict, key: str | None = None, now_ms: int = NOW) -> str | None:
    """The documented order (DEAD_LETTER_REASONS, ``_reason_expr``): the first rule a row breaks."""
    if any(r[c] is None for c in ("exchange", "symbol", "id", "ts", "price", "amount", "side")) or any(
            r[c] == "" for c in ("exchange", "symbol", "id")):
        return "missing_field"
    if any(len(r[c]) > MAX_CHARS for c in ("exchange", "symbol", "id")):
        return "field_too_long"
    if not (math.isfinite(r["price"]) and math.isfinite(r["amount"])):
        return "non_finite"
    if r["price"] <= 0 or r["amount"] <= 0:
        return "non_positive"
    if r["side"] not in ("buy", "sell"):
        return "unknown_side"
    if r["ts"] > now_ms + DAY_MS or r["ts"] < MIN_TS_MS:
        return "ts_out_of_range"
    if key is not None and key != f"{r['exchange']}:{r['symbol']}":
        return "key_mismatch"
    return None


def faulty_rows(n: int, seed: int, finite_only: bool) -> list[dict]:
    """Rows that each break any number of rules (each fault with probability 0.3)."""
    rng = random.Random(seed)
    faults = {
        "id": ["", None], "symbol": ["S" * (MAX_CHARS + 1)], "exchange": [None, "x" * (MAX_CHARS + 5)],
        "price": [0.0, -1.0] + ([] if finite_only else [math.inf, math.nan]), "amount": [0.0, -0.5],
        "side": ["hold", None], "ts": [MIN_TS_MS - 1, NOW + DAY_MS + 1],
    }
    rows = []
    for i in range(n):
        r = {"exchange": "x", "symbol": "A/USDT:USDT", "id": str(i), "ts": T0 + i, "price": 100.0, "amount": 1.0,
             "side": "buy"}
        for field, bad in faults.items():
            if rng.random() < 0.3:
                r[field] = rng.choice(bad)
        rows.append(r)
    return rows


def test_the_first_broken_rule_is_the_reason_in_column_batches():
    rows = faulty_rows(400, seed=1, finite_only=False)
    frame = pl.DataFrame(rows, schema={"exchange": pl.String, "symbol": pl.String, "id": pl.String, "ts": pl.Int64,
                                       "price": pl.Float64, "amount": pl.Float64, "side": pl.String}
                         ).with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))
    d = decode_batch(FrameBatch("s", "0", frame, NOW), now_ms=NOW)
    got = {x.offset: x.reason for x in d.dead}
    want = {i: expected_reason(r) for i, r in enumerate(rows) if expected_reason(r) is not None}
    assert len(set(want.values())) == 6 and len(want) < len(rows)  # the sample reaches every rule, and good rows
    assert got == want
    assert d.frame["id"].to_list() == [r["id"] for i, r in enumerate(rows) if i not in want]


def test_the_first_broken_rule_is_the_reason_in_kafka_messages():
    rows = faulty_rows(400, seed=2, finite_only=True)  # JSON has no NaN or infinity (tested as bad_json elsewhere)
    rng = random.Random(3)
    # None: a message without a key (not checked); otherwise its own key, or a neighbour's
    keys = [None if rng.random() < 0.2 else f"{r['exchange']}:{r['symbol']}" if rng.random() < 0.8 else "y:B/USDT"
            for r in rows]
    # msgspec refuses a null field itself (a different path, tested elsewhere): only non-null values here
    rows = [r if all(v is not None for v in r.values()) else {**r, "id": ""} for r in rows]
    batch = RawBatch("kafka", "0", list(range(len(rows))), [msgspec.json.encode(r) for r in rows], NOW,
                     [k.encode() if k is not None else None for k in keys])
    d = decode_batch(batch, now_ms=NOW)
    got = {x.offset: x.reason for x in d.dead}
    want = {i: expected_reason(r, k) for i, (r, k) in enumerate(zip(rows, keys)) if expected_reason(r, k) is not None}
    assert "key_mismatch" in want.values() and len(want) < len(rows)
    assert got == want


def test_the_newest_allowed_ts_follows_each_batch_now():
    late = T0 + DAY_MS + 1  # a day and 1 ms after T0
    r = {"exchange": "x", "symbol": "S", "id": "1", "ts": late, "price": 1.0, "amount": 1.0, "side": "buy"}
    raw = RawBatch("kafka", "0", [7], [msgspec.json.encode(r)], T0)
    frame = FrameBatch("s", "0", pl.DataFrame([{**r, "offset": 7}]), T0)
    for batch in (raw, frame, raw, frame):  # alternating: nothing of one call's now stays behind
        assert [x.reason for x in decode_batch(batch, now_ms=T0).dead] == ["ts_out_of_range"]
        assert decode_batch(batch, now_ms=T0 + 1).frame["ts"].to_list() == [late]
        assert decode_batch(batch, now_ms=T0 + 1, max_future_ms=DAY_MS - 1).dead[0].reason == "ts_out_of_range"


def test_a_row_with_several_unreadable_numbers_names_the_first():
    f = pl.DataFrame({"exchange": ["x"], "symbol": ["S"], "id": ["1"], "ts": ["soon"], "price": ["n/a"],
                      "amount": ["lots"], "side": ["buy"], "offset": [0]})
    d = decode_batch(FrameBatch("replay", "0", f, NOW), now_ms=NOW)
    assert [x.reason for x in d.dead] == ["wrong_type"]
    assert "ts is not a valid Int64: soon" in d.dead[0].detail
    g = f.with_columns(pl.lit(str(T0)).alias("ts"))
    assert "price is not a valid Float64: n/a" in decode_batch(FrameBatch("replay", "0", g, NOW), now_ms=NOW).dead[0].detail


def test_the_limits_of_each_call_apply():
    r = {"exchange": "x", "symbol": "S", "id": "i" * 20, "ts": T0, "price": 1.0, "amount": 1.0, "side": "buy"}
    batch = RawBatch("kafka", "0", [0], [msgspec.json.encode(r)], NOW)
    assert decode_batch(batch, now_ms=NOW).dead == []
    assert decode_batch(batch, now_ms=NOW, limits=DecodeLimits(max_field_chars=19)).dead[0].reason == "field_too_long"
    assert decode_batch(batch, now_ms=NOW, limits=DecodeLimits(max_field_chars=20)).dead == []
