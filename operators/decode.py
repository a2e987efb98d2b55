"""Decoding and validation of trade batches: good trades as one Polars frame, every bad one as a
dead letter. Pure logic, no bytewax.

A trade travels in batches. Sources hand over either raw messages (``RawBatch``: Kafka
payloads, JSON lines) or columns (``FrameBatch``: replay files, the synthetic generator);
``decode_batch`` turns either into one validated Polars frame plus dead letters. The frame is
then split per instrument (``operators.by_instrument``) for admission (``operators.admission``).

Validation rules live in one place (``_reason_expr``) for both kinds of batch, so a row from
a CSV file and the same trade as JSON from Kafka meet the same fate.

>>> import msgspec
>>> msg = msgspec.json.encode({"exchange": "x", "symbol": "A/B", "id": "1", "ts": 1700000000000,
...                            "price": 1.5, "amount": 2.0, "side": "buy"})
>>> d = decode_batch(RawBatch("t", "0", [0], [msg], 0), now_ms=1700000000000)
>>> d.frame.height, d.dead
(1, [])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from typing import Any, Union

import msgspec
import polars as pl
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from operators.events import EVENT_DECODER, decode_in_band
from operators.perp import PERP_DECODER, PerpUpdate, problem as perp_problem
from operators.records import DAY_MS, MIN_TS_MS, DeadLetter, FrameBatch, RawBatch, Trade

#: Columns of a decoded, validated trade frame, in order.
TRADE_SCHEMA: dict[str, pl.DataType] = {
    "exchange": pl.String,
    "symbol": pl.String,
    "id": pl.String,
    "ts": pl.Int64,
    "price": pl.Float64,
    "amount": pl.Float64,
    "is_buy": pl.Boolean,
    "trader": pl.String,
    "recv_ts": pl.Int64,
    "seq": pl.Int64,
}

#: Every dead-letter reason, with what it means.
DEAD_LETTER_REASONS = {
    "bad_json": "the payload is not valid JSON (or not UTF-8)",
    "missing_field": "a required field is absent, null or empty",
    "wrong_type": "a field has the wrong type (e.g. price as text, ts as float)",
    "non_finite": "price or amount is NaN or infinite",
    "non_positive": "price or amount is zero or negative",
    "unknown_side": "side is neither 'buy' nor 'sell'",
    "ts_out_of_range": "ts is more than the allowed time in the future, or before 2010 (seconds instead of ms?)",
    "too_large": "the message is larger than max_message_bytes (its stored payload is cut)",
    "field_too_long": "exchange, symbol, id or trader is longer than max_field_chars",
    "key_mismatch": "the Kafka key is not the trade's own exchange:symbol",
    "undecodable": "decoding failed in an unforeseen way (the detail says how); never stops the pipeline",
}


@pydantic_dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one message may hold (settings ``max_message_bytes``, ``max_field_chars``)."""

    max_message_bytes: int = Field(16_384, gt=0)
    max_field_chars: int = Field(128, gt=0)


@dataclass
class Decoded:
    frame: pl.DataFrame  # TRADE_SCHEMA, valid rows only
    dead: list[DeadLetter]
    events: list = field(default_factory=list)  # operators.records.Event, in arrival order


_ONE_DECODER = msgspec.json.Decoder(Trade)


_NON_FINITE_TOKEN = re.compile(rb"[:\[,]\s*-?(NaN|Infinity)\b")


def _classify_msgspec_error(err: Exception, payload: bytes) -> str:
    text = str(err)
    if "Number out of range" in text or _NON_FINITE_TOKEN.search(payload):
        return "non_finite"  # 1e999, or Python's json.dumps(float("nan")) -> NaN
    if not isinstance(err, msgspec.ValidationError):
        return "bad_json"
    if isinstance(err, RecursionError):
        return "bad_json"  # nested deeper than the decoder's recursion limit
    try:  # typed decoding stops at the first type error; is the rest even JSON?
        msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return "bad_json"
    if text.startswith("Object missing required field") or "got `null`" in text:
        return "missing_field"
    return "wrong_type"


_FRAME_FIELDS = ("exchange", "symbol", "id", "ts", "price", "amount", "side", "trader", "recv_ts")
_RAW_SCHEMA = {**{k: v for k, v in TRADE_SCHEMA.items() if k not in ("is_buy", "seq")}, "side": pl.String}


def _trades_to_frame(trades: list[Trade], seqs: list[int]) -> pl.DataFrame:
    cols = {name: list(map(attrgetter(name), trades)) for name in _FRAME_FIELDS}
    try:
        frame = pl.DataFrame(cols, schema=_RAW_SCHEMA)
    except (TypeError, pl.exceptions.PolarsError):  # integer ids: the contract allows them
        cols["id"] = [i if isinstance(i, str) else str(i) for i in cols["id"]]
        frame = pl.DataFrame(cols, schema=_RAW_SCHEMA)
    return frame.with_columns(pl.Series("seq", seqs, dtype=pl.Int64))


_TEXT_FIELDS = ("exchange", "symbol", "id", "trader")


@lru_cache(maxsize=16)
def _reason_expr(limits: DecodeLimits) -> pl.Expr:
    """One expression giving each row's dead-letter reason, or null for a good row. Built once per
    ``limits`` (a paced or live source hands over batches of a few trades, where building it took
    longer than applying it); the newest allowed ``ts`` comes from the frame's ``_ts_max`` column."""
    missing = pl.any_horizontal([pl.col(c).is_null() for c in ("exchange", "symbol", "id", "ts", "price", "amount", "side")]
                                + [pl.col(c).str.len_bytes() == 0 for c in ("exchange", "symbol", "id")])
    too_long = pl.any_horizontal([(pl.col(c).str.len_chars() > limits.max_field_chars).fill_null(False)
                                  for c in _TEXT_FIELDS])
    key = pl.col("_key")
    own_key = pl.concat_str("exchange", pl.lit(":"), "symbol").cast(pl.Binary)
    key_mismatch = (key.is_not_null() & (key != own_key)).fill_null(False)
    price, amount, ts, side = pl.col("price"), pl.col("amount"), pl.col("ts"), pl.col("side")
    rules = (  # in this order: the first that holds is the reason
        (pl.col("_wrong_type"), "wrong_type"),  # first: a failed cast leaves a null behind
        (missing, "missing_field"),
        (too_long, "field_too_long"),
        (~price.is_finite() | ~amount.is_finite(), "non_finite"),
        ((price <= 0) | (amount <= 0), "non_positive"),
        (~((side == "buy") | (side == "sell")), "unknown_side"),
        ((ts > pl.col("_ts_max")) | (ts < MIN_TS_MS), "ts_out_of_range"),
        (key_mismatch, "key_mismatch"),
    )
    # a coalesce of one when/then per rule: the same as one when/then chain, at half the cost a batch
    return pl.coalesce([pl.when(cond).then(pl.lit(reason)) for cond, reason in rules]).alias("_reason")


def explain(reason: str, row: dict, now_ms: int, max_future_ms: int, limits: DecodeLimits = DecodeLimits()) -> str:
    """A sentence a person can act on, for a row that failed the value checks."""
    if reason == "field_too_long":
        long = [f"{c} ({len(row[c])} chars)" for c in _TEXT_FIELDS
                if isinstance(row.get(c), str) and len(row[c]) > limits.max_field_chars]
        return f"{', '.join(long)} longer than max_field_chars={limits.max_field_chars}"
    if reason == "key_mismatch":
        key = row.get("_key")
        key = bytes(key).decode("utf-8", "replace") if isinstance(key, (bytes, bytearray)) else key
        return (f"Kafka key {key!r} is not the trade's exchange:symbol "
                f"{row.get('exchange')}:{row.get('symbol')}")
    if reason == "missing_field":
        absent = [c for c in ("exchange", "symbol", "id", "ts", "price", "amount", "side")
                  if row.get(c) is None or row.get(c) == ""]
        return f"required field(s) absent or empty: {', '.join(absent) or '?'}"
    if reason == "wrong_type":
        return f"a field has the wrong type: {row.get('_type_detail') or 'could not be read as a number'}"
    if reason == "non_finite":
        return f"price and amount must be finite numbers (price={row.get('price')}, amount={row.get('amount')})"
    if reason == "non_positive":
        return f"price and amount must be > 0 (price={row.get('price')}, amount={row.get('amount')})"
    if reason == "unknown_side":
        return f"side must be 'buy' or 'sell', got {row.get('side')!r}"
    if reason == "ts_out_of_range":
        ts = row.get("ts")
        if ts is not None and ts < MIN_TS_MS:
            return f"ts={ts} is before 2010-01-01: timestamps must be milliseconds since epoch (seconds given?)"
        return f"ts={ts} is more than {max_future_ms // 1000} s after now ({now_ms})"
    return DEAD_LETTER_REASONS.get(reason, reason)


_GOOD = ("exchange", "symbol", "id", "ts", "price", "amount", (pl.col("side") == "buy").alias("is_buy"), "trader",
         "recv_ts", "seq")


def _ts_max(now_ms: int, max_future_ms: int) -> pl.Expr:
    """The newest ``ts`` a trade may have (a column: ``_reason_expr`` is built once)."""
    return pl.lit(now_ms + max_future_ms, dtype=pl.Int64).alias("_ts_max")


def _split_valid(frame: pl.DataFrame, limits: DecodeLimits) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply the value rules. ``frame`` has the decoded columns plus ``_wrong_type``, ``_key``,
    ``_row`` and ``_ts_max`` (``_ts_max(now_ms, max_future_ms)``)."""
    checked = frame.with_columns(_reason_expr(limits))
    if checked["_reason"].null_count() == checked.height:  # the common case: no bad row
        return checked.select(_GOOD), checked.clear()
    bad = checked.filter(pl.col("_reason").is_not_null())
    return checked.filter(pl.col("_reason").is_null()).select(_GOOD), bad


def _decode_one(batch: RawBatch, i: int, limits: DecodeLimits) -> Union[Trade, DeadLetter, Any]:
    """One message on its own: a Trade, an in-band event, or a dead letter. Never raises: whatever
    a payload holds (deep nesting, binary, joined or split objects, huge numbers), it ends here."""
    p = batch.payloads[i]

    def dead(reason: str, detail: str) -> DeadLetter:
        return DeadLetter(batch.source, batch.partition, batch.offsets[i], _text(p, limits), reason, detail,
                          batch.recv_ts)

    if len(p) > limits.max_message_bytes:
        return dead("too_large", f"{len(p):,} bytes > max_message_bytes={limits.max_message_bytes:,}")
    try:
        return _ONE_DECODER.decode(p)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
        try:  # an in-band event (gap, reconnect, refused trade)?
            return decode_in_band(EVENT_DECODER.decode(p), batch.source, batch.partition, batch.offsets[i],
                                  batch.recv_ts)
        except Exception:  # noqa: BLE001 - not an event: perp data?
            pass
        if b'"perp"' in p:
            try:
                return msgspec.structs.replace(PERP_DECODER.decode(p), seq=batch.offsets[i])
            except (msgspec.DecodeError, msgspec.ValidationError) as perr:
                return dead(_classify_msgspec_error(perr, p), f"perp update: {str(perr)[:500]}")
            except Exception:  # noqa: BLE001 - classify as a trade below
                pass
        try:
            return dead(_classify_msgspec_error(err, p), str(err)[:500])
        except Exception as inner:  # noqa: BLE001
            return dead("undecodable", f"{type(inner).__name__}: {str(inner)[:300]}")
    except Exception as err:  # noqa: BLE001 - a message must never stop the pipeline
        return dead("undecodable", f"{type(err).__name__}: {str(err)[:300]}")


def _decode_all(payloads: list[bytes], limits: DecodeLimits) -> list[Trade]:
    """The common case, every message a trade: one C-level pass; raises at the first that is not."""
    if payloads and max(map(len, payloads)) > limits.max_message_bytes:
        raise ValueError("a message is too large")
    return list(map(_ONE_DECODER.decode, payloads))


def _decode_raw(batch: RawBatch, now_ms: int, max_future_ms: int, limits: DecodeLimits) -> Decoded:
    """Every message is decoded on its own (msgspec, in C): a payload can never borrow bytes from
    its neighbours (``{A},{B}`` in one message, or one object split over two, is refused), and
    decoding message by message measured as fast as decoding the joined batch as one array."""
    payloads = batch.payloads
    dead: list[DeadLetter] = []
    events: list = []
    try:
        trades = _decode_all(payloads, limits)
        ok_idx = list(range(len(payloads)))
    except Exception:  # noqa: BLE001 - sort it out message by message
        trades, ok_idx = [], []
        for i in range(len(payloads)):
            got = _decode_one(batch, i, limits)
            if isinstance(got, Trade):
                trades.append(got)
                ok_idx.append(i)
            elif isinstance(got, DeadLetter):
                dead.append(got)
            else:
                events.append(got)
    seqs = batch.offsets if len(ok_idx) == len(payloads) else [batch.offsets[i] for i in ok_idx]
    key_col = _key_column(batch.keys, ok_idx, len(payloads))
    rows = (pl.int_range(pl.len(), dtype=pl.Int64) if len(ok_idx) == len(payloads)
            else pl.Series(ok_idx, dtype=pl.Int64)).alias("_row")
    frame = _trades_to_frame(trades, seqs).with_columns(
        pl.col("recv_ts").fill_null(batch.recv_ts), pl.lit(False).alias("_wrong_type"), rows, key_col,
        _ts_max(now_ms, max_future_ms))
    good, bad = _split_valid(frame, limits)
    for row in bad.iter_rows(named=True):
        i = row["_row"]
        dead.append(
            DeadLetter(batch.source, batch.partition, batch.offsets[i], _text(payloads[i], limits),
                       row["_reason"], explain(row["_reason"], row, now_ms, max_future_ms, limits), batch.recv_ts)
        )
    if events:
        events = _check_perps(events, dead, batch.source, batch.partition, batch.recv_ts, now_ms, max_future_ms,
                              limits, dict(zip(batch.offsets, payloads)))
    dead.sort(key=lambda d: d.offset)
    return Decoded(good, dead, events)


def _key_column(keys: list, ok_idx: list[int], n: int) -> Any:
    """The Kafka keys of the decoded trades as bytes (compared with ``exchange:symbol`` in
    ``_reason_expr``); no keys: a null column."""
    if not keys:
        return pl.lit(None, dtype=pl.Binary).alias("_key")
    picked = keys if len(ok_idx) == n else [keys[i] for i in ok_idx]
    try:
        return pl.Series("_key", picked, dtype=pl.Binary)
    except (TypeError, ValueError, pl.exceptions.PolarsError):  # str or bytearray keys (tests, other clients)
        return pl.Series("_key", [k if k is None or isinstance(k, bytes) else
                                  k.encode() if isinstance(k, str) else bytes(k) for k in picked], dtype=pl.Binary)


def _check_perps(events: list, dead: list, source: str, partition: str, recv_ts: int, now_ms: int,
                 max_future_ms: int, limits: DecodeLimits, payloads: dict | None = None) -> list:
    """Perp updates that cannot be used become dead letters (into ``dead``) with their payload as it
    came (``payloads``: offset -> raw message) or, from a frame source, as JSON; the rest stay."""
    if not any(isinstance(e, PerpUpdate) for e in events):
        return events
    kept = []
    for e in events:
        bad = perp_problem(e, MIN_TS_MS, now_ms + max_future_ms) if isinstance(e, PerpUpdate) else None
        if bad is None:
            kept.append(e)
        else:
            raw = payloads.get(e.seq) if payloads else None
            payload = _text(raw, limits) if raw is not None else _cut(
                msgspec.json.encode(msgspec.structs.replace(e, seq=None)).decode(), limits)
            dead.append(DeadLetter(source, partition, e.seq if e.seq is not None else -1, payload, bad[0], bad[1],
                                   recv_ts))
    return kept


_NUMERIC = {"ts": pl.Int64, "price": pl.Float64, "amount": pl.Float64, "recv_ts": pl.Int64}


@lru_cache(maxsize=64)
def _frame_exprs(schema: tuple) -> tuple:
    """The casts and checks that turn a column batch of this ``schema`` ((name, dtype), ...) into
    decoded columns; built once per schema (see ``_reason_expr``)."""
    types = dict(schema)
    exprs, failures, details = [], [pl.lit(False)], [pl.lit(None, dtype=pl.String)]
    for c, dt in _NUMERIC.items():
        if c not in types:
            exprs.append(pl.lit(None, dtype=dt).alias(c))  # recv_ts: the batch's (filled in after)
            continue
        src = pl.col(c)
        if types[c] == pl.String:  # blank text counts as absent, not as a wrong type
            src = src.str.strip_chars()
            src = pl.when(src.str.len_bytes() == 0).then(None).otherwise(src)
        cast = src.cast(dt, strict=False)
        if dt == pl.Int64 and types[c] in (pl.Float32, pl.Float64):
            cast = pl.when(src == src.floor()).then(src.cast(pl.Int64, strict=False)).otherwise(None)
        exprs.append(cast.alias(c))
        failed = cast.is_null() & src.is_not_null()
        failures.append(failed)
        details.insert(-1, pl.when(failed).then(  # the first column that failed says what
            pl.format("{} is not a valid {}: {}", pl.lit(c), pl.lit(str(dt)), pl.col(c).cast(pl.String))))
    for c in ("exchange", "symbol", "id", "side", "trader"):
        exprs.append(pl.col(c).cast(pl.String) if c in types else pl.lit(None, dtype=pl.String).alias(c))
    exprs += [pl.col("offset").cast(pl.Int64).alias("seq"), pl.any_horizontal(failures).alias("_wrong_type"),
              pl.coalesce(details).alias("_type_detail"), pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
              pl.lit(None, dtype=pl.Binary).alias("_key")]
    return tuple(exprs)


def _decode_frame(batch: FrameBatch, now_ms: int, max_future_ms: int, limits: DecodeLimits) -> Decoded:
    raw: pl.DataFrame = batch.frame
    cols = set(raw.columns)
    need = {"exchange", "symbol", "id", "ts", "price", "amount", "side", "offset"}
    if not need <= cols:
        raise ValueError(f"FrameBatch from {batch.source} lacks columns {sorted(need - cols)}")
    frame = raw.select(_frame_exprs(tuple(raw.schema.items()))).with_columns(
        pl.col("recv_ts").fill_null(batch.recv_ts), _ts_max(now_ms, max_future_ms))
    good, bad = _split_valid(frame, limits)
    dead = []
    if bad.height:
        originals = raw.with_row_index("_row").filter(pl.col("_row").is_in(bad["_row"].to_list()))
        payload_by_row = {r["_row"]: r for r in originals.iter_rows(named=True)}
        for row in bad.iter_rows(named=True):
            orig = dict(payload_by_row[row["_row"]])
            orig.pop("_row")
            dead.append(
                DeadLetter(batch.source, batch.partition, row["seq"] if row["seq"] is not None else -1,
                           _cut(msgspec.json.encode(orig, enc_hook=str).decode(), limits), row["_reason"],
                           explain(row["_reason"], row, now_ms, max_future_ms, limits), batch.recv_ts)
            )
    dead += [e for e in batch.events if isinstance(e, DeadLetter)]
    events = _check_perps([e for e in batch.events if not isinstance(e, DeadLetter)], dead, batch.source,
                          batch.partition, batch.recv_ts, now_ms, max_future_ms, limits)
    return Decoded(good, dead, events)


def _cut(text: str, limits: DecodeLimits) -> str:
    """A dead letter keeps at most ``max_message_bytes`` characters of its payload (and says so)."""
    n = limits.max_message_bytes
    return text if len(text) <= n else f"{text[:n]}... [cut: {len(text):,} characters in all]"


def _text(payload: bytes, limits: DecodeLimits = DecodeLimits()) -> str:
    return _cut(bytes(payload).decode("utf-8", errors="backslashreplace"), limits)


def decode_batch(batch: RawBatch | FrameBatch, now_ms: int, max_future_ms: int = DAY_MS,
                 limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Decode and validate a batch: good trades as one frame, every bad one as a dead letter."""
    if isinstance(batch, RawBatch):
        return _decode_raw(batch, now_ms, max_future_ms, limits)
    return _decode_frame(batch, now_ms, max_future_ms, limits)
