"""Trade contract (SPEC §1): decode, validate, dedup and lateness. Pure logic, no bytewax.

A trade travels in batches. Sources hand over either raw messages (``RawBatch``: Kafka
payloads, JSON lines) or columns (``FrameBatch``: replay files, the synthetic generator);
``decode_batch`` turns either into one validated Polars frame plus dead letters. The frame is
then split per instrument and ``admit`` drops duplicates, separates late trades and cuts the
rest into one chunk per 1-minute window.

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
from collections import deque
from operator import attrgetter
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Union

import msgspec
import numpy as np
import polars as pl

from operators.perp import PERP_DECODER, PerpUpdate, problem as perp_problem

MINUTE_MS = 60_000
DAY_MS = 86_400_000
MIN_TS_MS = 1_262_304_000_000  # 2010-01-01: anything earlier is a unit mistake (seconds?) or junk

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

#: Columns a chunk keeps for bar computation (identity travels on the chunk itself).
CHUNK_COLUMNS = ["id", "ts", "seq", "price", "amount", "is_buy", "trader", "recv_ts"]

_EMPTY_CHUNK = pl.DataFrame(schema={c: TRADE_SCHEMA[c] for c in CHUNK_COLUMNS})

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

#: Every reason a trade can end in ``late_trades`` instead of a bar.
LATE_REASONS = {
    "behind_watermark": "ts below the instrument's newest ts minus the allowed lateness",
    "window_closed": "its 1m window had already closed (wall-clock watermark on live sources)",
    "ts_outlier": "ts jumped more than jump_ms away from its instrument's stream and the stream did not follow",
    "ts_jump_unconfirmed": "ts jumped more than jump_ms ahead and the input ended before the jump was confirmed",
}

_I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Trade(msgspec.Struct, gc=False):
    """One trade as it travels on Kafka topic ``trades`` (JSON). (``gc=False``: holds no
    containers, so the garbage collector need not track it; decoding is ~35% faster.)"""

    exchange: str
    symbol: str
    id: Union[str, _I64]
    ts: _I64
    price: float
    amount: float
    side: str
    cost: Union[float, None] = None
    trader: Union[str, None] = None
    recv_ts: Union[_I64, None] = None


class RawBatch(msgspec.Struct):
    """Raw messages as read from a source; ``offsets[i]`` locates ``payloads[i]`` in it and
    ``keys[i]`` is its Kafka key (``exchange:symbol``; None or an empty list: not checked)."""

    source: str
    partition: str
    offsets: list[int]
    payloads: list[bytes]
    recv_ts: int
    keys: list = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one message may hold (settings ``max_message_bytes``, ``max_field_chars``)."""

    max_message_bytes: int = 16_384
    max_field_chars: int = 128


class FrameBatch(msgspec.Struct):
    """Trades already in columns (files, generator, ccxt). Columns: exchange, symbol, id, ts, price,
    amount, side, optional trader and recv_ts, and ``offset`` (position in the source).
    ``events``: events and refused input that came with the batch (live sources)."""

    source: str
    partition: str
    frame: Any  # pl.DataFrame
    recv_ts: int
    events: list = msgspec.field(default_factory=list)


class DeadLetter(msgspec.Struct, frozen=True):
    source: str
    partition: str
    offset: int
    payload: str
    reason: str
    detail: str
    recv_ts: int


@dataclass
class Decoded:
    frame: pl.DataFrame  # TRADE_SCHEMA, valid rows only
    dead: list[DeadLetter]
    events: list = field(default_factory=list)  # operators.events.Event, in arrival order


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


def _trades_to_frame(trades: list[Trade], seqs: list[int], recv_ts: int) -> pl.DataFrame:
    cols = {name: list(map(attrgetter(name), trades)) for name in _FRAME_FIELDS}
    try:
        frame = pl.DataFrame(cols, schema=_RAW_SCHEMA)
    except (TypeError, pl.exceptions.PolarsError):  # integer ids: the contract allows them
        cols["id"] = [i if isinstance(i, str) else str(i) for i in cols["id"]]
        frame = pl.DataFrame(cols, schema=_RAW_SCHEMA)
    return frame.with_columns(pl.col("recv_ts").fill_null(recv_ts), pl.Series("seq", seqs, dtype=pl.Int64))


_TEXT_FIELDS = ("exchange", "symbol", "id", "trader")


def _reason_expr(now_ms: int, max_future_ms: int, limits: DecodeLimits) -> pl.Expr:
    """One expression giving each row's dead-letter reason, or null for a good row."""
    missing = pl.lit(False)
    for c in ("exchange", "symbol", "id", "ts", "price", "amount", "side"):
        missing = missing | pl.col(c).is_null()
    for c in ("exchange", "symbol", "id"):
        missing = missing | (pl.col(c).str.len_bytes() == 0)
    too_long = pl.lit(False)
    for c in _TEXT_FIELDS:
        too_long = too_long | (pl.col(c).str.len_chars() > limits.max_field_chars).fill_null(False)
    key = pl.col("_key")
    key_mismatch = (key.is_not_null() & (key != pl.concat_str("exchange", pl.lit(":"), "symbol"))).fill_null(False)
    price, amount, ts = pl.col("price"), pl.col("amount"), pl.col("ts")
    return (
        pl.when(pl.col("_wrong_type"))  # first: a failed cast leaves a null behind
        .then(pl.lit("wrong_type"))
        .when(missing)
        .then(pl.lit("missing_field"))
        .when(too_long)
        .then(pl.lit("field_too_long"))
        .when(~price.is_finite() | ~amount.is_finite())
        .then(pl.lit("non_finite"))
        .when((price <= 0) | (amount <= 0))
        .then(pl.lit("non_positive"))
        .when(~pl.col("side").is_in(["buy", "sell"]))
        .then(pl.lit("unknown_side"))
        .when((ts > now_ms + max_future_ms) | (ts < MIN_TS_MS))
        .then(pl.lit("ts_out_of_range"))
        .when(key_mismatch)
        .then(pl.lit("key_mismatch"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("_reason")
    )


def explain(reason: str, row: dict, now_ms: int, max_future_ms: int, limits: DecodeLimits = DecodeLimits()) -> str:
    """A sentence a person can act on, for a row that failed the value checks."""
    if reason == "field_too_long":
        long = [f"{c} ({len(row[c])} chars)" for c in _TEXT_FIELDS
                if isinstance(row.get(c), str) and len(row[c]) > limits.max_field_chars]
        return f"{', '.join(long)} longer than max_field_chars={limits.max_field_chars}"
    if reason == "key_mismatch":
        return (f"Kafka key {row.get('_key')!r} is not the trade's exchange:symbol "
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


def _split_valid(frame: pl.DataFrame, now_ms: int, max_future_ms: int,
                 limits: DecodeLimits) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply the value rules. ``frame`` has the decoded columns plus ``_wrong_type``, ``_key`` and ``_row``."""
    checked = frame.with_columns(_reason_expr(now_ms, max_future_ms, limits))
    bad = checked.filter(pl.col("_reason").is_not_null())
    good = checked.filter(pl.col("_reason").is_null()).select(
        "exchange", "symbol", "id", "ts", "price", "amount",
        (pl.col("side") == "buy").alias("is_buy"), "trader", "recv_ts", "seq",
    )
    return good, bad


def _decode_one(batch: RawBatch, i: int, limits: DecodeLimits) -> Union[Trade, DeadLetter, Any]:
    """One message on its own: a Trade, an in-band event, or a dead letter. Never raises: whatever
    a payload holds (deep nesting, binary, joined or split objects, huge numbers), it ends here."""
    from operators.events import EVENT_DECODER, decode_in_band  # events import this module

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
    seqs = [batch.offsets[i] for i in ok_idx]
    keys = batch.keys
    key_col = (pl.Series("_key", [None if keys[i] is None else bytes(keys[i]).decode("utf-8", "replace")
                                  for i in ok_idx], dtype=pl.String)
               if keys else pl.lit(None, dtype=pl.String).alias("_key"))
    frame = _trades_to_frame(trades, seqs, batch.recv_ts).with_columns(
        pl.lit(False).alias("_wrong_type"), pl.Series("_row", ok_idx, dtype=pl.Int64), key_col
    )
    good, bad = _split_valid(frame, now_ms, max_future_ms, limits)
    for row in bad.iter_rows(named=True):
        i = row["_row"]
        dead.append(
            DeadLetter(batch.source, batch.partition, batch.offsets[i], _text(payloads[i], limits),
                       row["_reason"], explain(row["_reason"], row, now_ms, max_future_ms, limits), batch.recv_ts)
        )
    events = _check_perps(events, dead, batch.source, batch.partition, batch.recv_ts, now_ms, max_future_ms, limits,
                          dict(zip(batch.offsets, payloads)))
    dead.sort(key=lambda d: d.offset)
    return Decoded(good, dead, events)


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


def _decode_frame(batch: FrameBatch, now_ms: int, max_future_ms: int, limits: DecodeLimits) -> Decoded:
    raw: pl.DataFrame = batch.frame
    cols = set(raw.columns)
    need = {"exchange", "symbol", "id", "ts", "price", "amount", "side", "offset"}
    if not need <= cols:
        raise ValueError(f"FrameBatch from {batch.source} lacks columns {sorted(need - cols)}")
    exprs, wrong, detail = [], pl.lit(False), pl.lit(None, dtype=pl.String)
    for c, dt in _NUMERIC.items():
        if c not in cols:
            exprs.append(pl.lit(batch.recv_ts if c == "recv_ts" else None, dtype=dt).alias(c))
            continue
        src = pl.col(c)
        if raw.schema[c] == pl.String:  # blank text counts as absent, not as a wrong type
            src = src.str.strip_chars()
            src = pl.when(src.str.len_bytes() == 0).then(None).otherwise(src)
        cast = src.cast(dt, strict=False)
        if dt == pl.Int64 and raw.schema[c] in (pl.Float32, pl.Float64):
            cast = pl.when(src == src.floor()).then(src.cast(pl.Int64, strict=False)).otherwise(None)
        exprs.append(cast.alias(c))
        failed = cast.is_null() & src.is_not_null()
        wrong = wrong | failed
        detail = pl.when(failed & detail.is_null()).then(
            pl.format("{} is not a valid {}: {}", pl.lit(c), pl.lit(str(dt)), pl.col(c).cast(pl.String))
        ).otherwise(detail)
    for c in ("exchange", "symbol", "id", "side", "trader"):
        exprs.append(pl.col(c).cast(pl.String) if c in cols else pl.lit(None, dtype=pl.String).alias(c))
    exprs += [pl.col("offset").cast(pl.Int64).alias("seq"), wrong.alias("_wrong_type"),
              detail.alias("_type_detail"), pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
              pl.lit(None, dtype=pl.String).alias("_key")]
    frame = raw.select(exprs)
    if "recv_ts" in cols:
        frame = frame.with_columns(pl.col("recv_ts").fill_null(batch.recv_ts))
    good, bad = _split_valid(frame, now_ms, max_future_ms, limits)
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


def split_instruments(frame: pl.DataFrame, events: list = ()) -> list[tuple[str, Any]]:
    """``[("exchange:symbol", trades of that instrument in arrival order), ...]``; an instrument
    with data-gap events or perp updates (``operators.perp``) in the batch gets an
    ``InstrumentSlice`` (its trades, or None, and those items), so they travel with its trades
    (``admit``: news carried to the portfolio, perp data placed in its bars)."""
    extra: dict[str, list] = {}
    for ev in events:
        if isinstance(ev, PerpUpdate) or (getattr(ev, "kind", None) == "data_gap" and ev.exchange and ev.symbol):
            extra.setdefault(f"{ev.exchange}:{ev.symbol}", []).append(ev)
    parts = {} if frame.height == 0 else {
        f"{ex}:{sym}": part for (ex, sym), part in
        frame.partition_by("exchange", "symbol", as_dict=True, maintain_order=True).items()}
    out: list[tuple[str, Any]] = []
    for inst, part in parts.items():
        out.append((inst, InstrumentSlice(part, tuple(extra.pop(inst))) if inst in extra else part))
    out.extend((inst, InstrumentSlice(None, tuple(evs))) for inst, evs in extra.items())
    return out


@dataclass(frozen=True)
class InstrumentSlice:
    """One instrument's part of a batch when it carries data-gap events or perp updates (else a bare frame)."""

    trades: pl.DataFrame | None
    events: tuple


# ---------------------------------------------------------------------------------------------
# admission: dedup, lateness, cut into window chunks


@dataclass(frozen=True)
class AdmitConfig:
    """Admission rules per instrument. ``jump_ms``/``jump_confirm``/``receipt_skew_ms`` make event
    time robust to a bad timestamp (see ``admit``)."""

    lateness_ms: int = 2_000
    dedup_horizon_ms: int = 10 * MINUTE_MS
    dedup_max_ids: int = 500_000
    window_ms: int = MINUTE_MS
    jump_ms: int = 15 * MINUTE_MS
    jump_confirm: int = 3
    receipt_skew_ms: int = 5 * MINUTE_MS


@dataclass
class AdmitState:
    """Per instrument: the confirmed frontier (newest accepted ts), the ids seen within the dedup
    horizon, and the trades of a jump that is not confirmed yet (arrival order)."""

    max_ts: int | None = None
    seen: set = field(default_factory=set)
    expiry: deque = field(default_factory=deque)  # (frontier when the group came, tuple of the group's ids)
    n_seen: int = 0
    pending: pl.DataFrame | None = None
    news: tuple = ()  # data-gap events that came before any accepted trade: carried by the first chunk
    perp: tuple = ()  # perp updates ahead of every accepted trade: placed when the trades reach their ts

    def __deepcopy__(self, memo: dict) -> "AdmitState":
        # ids are immutable strings in immutable tuples, frames are immutable: copying containers is enough
        return AdmitState(self.max_ts, set(self.seen), deque(self.expiry), self.n_seen, self.pending,
                          getattr(self, "news", ()), getattr(self, "perp", ()))


@dataclass(frozen=True)
class Chunk:
    """On-time trades of one instrument inside one window, from one source batch."""

    exchange: str
    symbol: str
    window_start: int
    max_ts: int
    trades: pl.DataFrame  # CHUNK_COLUMNS
    # data-quality news for the portfolio, carried by the window of the frontier at which it was
    # learnt: LateCount and data-gap Event items (see ``carry_news``)
    news: tuple = ()


@dataclass(frozen=True)
class LateCount:
    """``n`` trades of the minute starting at ``minute`` came behind the watermark."""

    minute: int
    n: int


@dataclass(frozen=True)
class LateTrades:
    exchange: str
    symbol: str
    trades: pl.DataFrame  # TRADE_SCHEMA columns + watermark
    reason: str  # one of LATE_REASONS


@dataclass(frozen=True)
class Counter:
    name: str
    value: int
    instrument: str = ""


@dataclass
class Admitted:
    chunks: list[Chunk]
    late: LateTrades | None  # behind the watermark
    duplicates: int
    outliers: LateTrades | None = None  # ts_outlier / ts_jump_unconfirmed
    extra: list = field(default_factory=list)  # events (perp updates that could not be placed)

    def records(self) -> list:
        """What goes downstream: chunks, late and outlier rows, events, the duplicate count."""
        out: list[Any] = list(self.chunks)
        out += [x for x in (self.late, self.outliers) if x is not None]
        out += self.extra
        if self.duplicates:
            out.append(Counter("duplicates", self.duplicates))
        return out


_ON_TIME, _LATE, _OUTLIER = 0, 1, 2


def admit(state: AdmitState, trades: pl.DataFrame | InstrumentSlice | None, cfg: AdmitConfig) -> Admitted:
    """``_admit`` the trades, then ``carry_news``: the late counts and data-gap events of this
    slice ride in chunks to the portfolio."""
    events: tuple = ()
    if isinstance(trades, InstrumentSlice):
        trades, events = trades.trades, trades.events
    frontier_before = state.max_ts
    got = _admit(state, trades, cfg) if trades is not None and trades.height else Admitted([], None, 0)
    perps = tuple(e for e in events if isinstance(e, PerpUpdate))
    if perps:
        events = tuple(e for e in events if not isinstance(e, PerpUpdate))
    return carry_news(state, got, events, frontier_before, cfg, perps)


def carry_news(state: AdmitState, got: Admitted, events: tuple, frontier_before: int | None,
               cfg: AdmitConfig, perps: tuple = ()) -> Admitted:
    """Put what the data-quality gate must learn into the instrument's own chunks, so it reaches
    the portfolio with the instrument's bars, in their order (the order it is applied in then does
    not depend on how partitions and processes interleave, issue 11).

    - late trades (``behind_watermark``): per trade, a count for its own minute, carried by the
      window of the frontier it was judged by (``watermark + lateness``): a window with an accepted
      trade, still open, and the same whatever the batch cuts;
    - data-gap events: carried by the window of the frontier before this slice (the gap's trades
      come after it), or by the first chunk ever when there is no frontier yet.
    - perp updates (``operators.perp``): by the window ``place_perp`` gives them.
    Ts outliers are not counted: their ts says nothing about which bar they belong to."""
    news: dict[int, list] = {}  # window start -> items
    events_of = events  # for _instrument_of when the slice has no trade
    if perps or getattr(state, "perp", ()):
        for w, u in place_perp(state, got, perps, frontier_before, cfg):
            news.setdefault(w, []).append(u)
            events_of = (*events_of, u)
    if got.late is not None:
        df = got.late.trades
        carrier = (pl.col("watermark") + cfg.lateness_ms)
        counts = df.group_by((carrier - carrier % cfg.window_ms).alias("_w"),
                             (pl.col("ts") - pl.col("ts") % MINUTE_MS).alias("_m")).len().sort("_w", "_m")
        for w, m, n in counts.iter_rows():
            news.setdefault(int(w), []).append(LateCount(int(m), int(n)))
    if events:
        if frontier_before is None:
            state.news = (*getattr(state, "news", ()), *events)
        else:
            news.setdefault(frontier_before - frontier_before % cfg.window_ms, []).extend(events)
    held = getattr(state, "news", ())
    if held and got.chunks:
        news.setdefault(got.chunks[0].window_start, [])[:0] = list(held)
        state.news = ()
    if not news:
        return got
    chunks = {c.window_start: c for c in got.chunks}
    first = got.chunks[0] if got.chunks else None
    for w, items in news.items():
        c = chunks.get(w)
        if c is not None:
            chunks[w] = replace(c, news=c.news + tuple(items))
        else:  # no on-time trade of that window in this slice: an empty chunk carries it
            ex, sym = (first.exchange, first.symbol) if first else _instrument_of(got, events_of)
            chunks[w] = Chunk(ex, sym, w, min(w + cfg.window_ms - 1, state.max_ts or w), _EMPTY_CHUNK, tuple(items))
    got.chunks = sorted(chunks.values(), key=lambda c: c.window_start)
    return got


def _instrument_of(got: Admitted, events: tuple) -> tuple[str, str]:
    for x in (got.late, got.outliers):
        if x is not None:
            return x.exchange, x.symbol
    return events[0].exchange, events[0].symbol


def _admit(state: AdmitState, trades: pl.DataFrame, cfg: AdmitConfig) -> Admitted:
    """Drop duplicate ids, separate late trades and timestamp outliers, cut the rest into window chunks.

    ``trades`` is one instrument's slice of a decoded batch, in arrival order. Mutates ``state``.

    Lateness: a trade is late when its ts is below the watermark at its arrival, the frontier (the
    newest accepted ts before it) minus the allowed lateness. This is bytewax's EventClock rule
    applied trade by trade, so where the batches happen to be cut does not change which trades are late.

    Robust event time: the frontier never leaps on one trade's word. A trade more than ``jump_ms``
    ahead of the frontier (or the instrument's first trades) opens a *jump*: it and the trades that
    follow it are held until ``jump_confirm`` trades in a row agree (each no more than ``jump_ms``
    behind the one before), or one
    of them lies within ``receipt_skew_ms`` of its own receive time (a live feed saying "now").
    Then they are admitted in arrival order and the frontier moves. A trade back near the frontier
    refutes the held ones: they become ``ts_outlier`` rows in ``late_trades``, and no other trade is
    lost. A trade more than ``receipt_skew_ms`` ahead of its own receive time is a ``ts_outlier`` at
    once. A real gap (an instrument quiet for an hour) is a jump that the next trades confirm.
    ``flush`` decides what is still held when the input ends.
    """
    exchange, symbol = trades["exchange"][0], trades["symbol"][0]
    ids = trades["id"].to_list()
    dup_mask = None
    if not state.seen.isdisjoint(ids) or trades["id"].is_duplicated().any():
        seen_now, dup_mask = set(), []
        for i in ids:
            d = i in state.seen or i in seen_now
            dup_mask.append(d)
            seen_now.add(i)
        trades = trades.filter(~pl.Series(dup_mask))
        ids = trades["id"].to_list()
    duplicates = 0 if dup_mask is None else sum(dup_mask)
    if trades.height == 0:
        return Admitted([], None, duplicates)

    if state.pending is None and state.max_ts is not None and not _needs_care(state.max_ts, trades, cfg):
        got = _admit_steady(state, trades, exchange, symbol, cfg)
    else:
        got = _admit_careful(state, trades, exchange, symbol, cfg)
    _remember(state, ids, state.max_ts if state.max_ts is not None else int(trades["ts"].max()), cfg)
    got.duplicates = duplicates
    return got


def flush(state: AdmitState, cfg: AdmitConfig) -> Admitted:
    """At the end of the input: held trades that two or more agree on, or that no earlier trade
    contradicts (the instrument's only trades), are admitted; a lone trade that jumped ahead of an
    established stream is a ``ts_jump_unconfirmed`` row (a trailing bad timestamp must not make a bar)."""
    held, state.pending = state.pending, None
    if held is None:
        return _unplaced(state, Admitted([], None, 0))
    exchange, symbol = held["exchange"][0], held["symbol"][0]
    if held.height >= 2 or state.max_ts is None:
        labels, marks = _classify_run(held["ts"].to_numpy(), state, cfg)
        got = carry_news(state, _split(held, labels, marks, exchange, symbol, cfg), (), state.max_ts, cfg)
        return _unplaced(state, got)
    mark = state.max_ts if state.max_ts is not None else 0
    return _unplaced(state, Admitted([], None, 0, LateTrades(exchange, symbol, held.with_columns(
        pl.lit(mark, dtype=pl.Int64).alias("watermark")), "ts_jump_unconfirmed")))


def place_perp(state: AdmitState, got: Admitted, perps: tuple, frontier_before: int | None,
               cfg: AdmitConfig) -> list[tuple[int, PerpUpdate]]:
    """(window start, update) for the perp updates that can be placed now (``operators.perp``).

    An update's frontier is the newest accepted trade ts before its position (``seq``). Behind that
    frontier's watermark it rides the frontier's window (like a late trade's count); otherwise its
    own window, at once if the frontier has reached its ts, else when a later trade does (held in
    ``state.perp``). Repeated updates (same content) are dropped. Every rule reads the data, not the
    batch cuts."""
    w = cfg.window_ms
    fresh = []
    for u in perps:
        key = u.dedup_key()
        if key not in state.seen:
            fresh.append(u)
            _remember(state, [key], state.max_ts if state.max_ts is not None else u.ts, cfg)
    if fresh and got.chunks:
        seqs = np.concatenate([c.trades["seq"].to_numpy() for c in got.chunks])
        order = np.argsort(seqs, kind="stable")
        seqs = seqs[order]
        run_max = np.maximum.accumulate(np.concatenate([c.trades["ts"].to_numpy() for c in got.chunks])[order])
    else:
        seqs = run_max = None
    out: list[tuple[int, PerpUpdate]] = []
    held = list(getattr(state, "perp", ()))
    for u in fresh:
        front = frontier_before
        if seqs is not None and len(seqs):
            k = len(seqs) if u.seq is None else int(np.searchsorted(seqs, u.seq))
            if k:
                front = int(run_max[k - 1]) if front is None else max(front, int(run_max[k - 1]))
        if front is None or u.ts > front:
            held.append(u)
        else:
            at = u.ts if u.ts >= front - cfg.lateness_ms else front
            out.append((at - at % w, u))
    keep = []
    for u in held:
        if state.max_ts is not None and u.ts <= state.max_ts:
            out.append((u.ts - u.ts % w, u))
        else:
            keep.append(u)
    state.perp = tuple(keep)
    return out


def _unplaced(state: AdmitState, got: Admitted) -> Admitted:
    """At the end of the input, perp updates still ahead of every trade of their instrument are
    reported (an ``Event`` added to ``got``), not silently dropped."""
    held = getattr(state, "perp", ())
    if not held:
        return got
    from operators.events import Event

    state.perp = ()
    u = held[0]
    ev = Event(kind="perp_unplaced", ts=max(x.ts for x in held), exchange=u.exchange, symbol=u.symbol,
               from_ts=min(x.ts for x in held), to_ts=max(x.ts for x in held),
               reason=f"{len(held)} perp update(s) later than the instrument's last trade at the end of the input",
               source="pipeline")
    got.extra.append(ev)
    return got


def _needs_care(prev: int, trades: pl.DataFrame, cfg: AdmitConfig) -> bool:
    """Does any trade jump ahead of the running frontier, or lie ahead of its own receipt?"""
    ts = trades["ts"].to_numpy()
    frontier = np.maximum.accumulate(np.concatenate(([prev], ts[:-1])))
    if (ts > frontier + cfg.jump_ms).any():
        return True
    recv = trades["recv_ts"]
    return bool(((trades["ts"] - recv) > cfg.receipt_skew_ms).any())


def _admit_steady(state: AdmitState, trades: pl.DataFrame, exchange: str, symbol: str, cfg: AdmitConfig) -> Admitted:
    """No jump anywhere: the lateness rule, vectorised."""
    prev = state.max_ts
    state.max_ts = max(prev, trades["ts"].max())
    running_max = pl.col("ts").cum_max().shift(1, fill_value=prev)
    marked = trades.with_columns(
        pl.max_horizontal(running_max, pl.lit(prev)).alias("_prev_max")
    ).with_columns((pl.col("ts") < pl.col("_prev_max") - cfg.lateness_ms).alias("_late"))
    late = None
    if marked["_late"].any():
        late_df = marked.filter("_late").with_columns(
            (pl.col("_prev_max") - cfg.lateness_ms).alias("watermark")
        ).drop("_prev_max", "_late")
        late = LateTrades(exchange, symbol, late_df, "behind_watermark")
        marked = marked.filter(~pl.col("_late"))
    on_time = marked.select(CHUNK_COLUMNS)
    return Admitted(window_chunks(exchange, symbol, on_time, cfg.window_ms), late, 0)


def _admit_careful(state: AdmitState, trades: pl.DataFrame, exchange: str, symbol: str, cfg: AdmitConfig) -> Admitted:
    """The jump rule, trade by trade (rare: only batches with a jump, a held jump or a stream's start)."""
    frame = trades if state.pending is None else pl.concat([state.pending, trades], how="vertical")
    ts = frame["ts"].to_numpy()
    recv = frame["recv_ts"].to_numpy()
    labels = np.full(len(ts), _ON_TIME, dtype=np.int8)
    marks = np.zeros(len(ts), dtype=np.int64)  # the watermark each late / outlier row was judged by
    run: list[int] = []

    def frontier_mark() -> int:
        return state.max_ts if state.max_ts is not None else 0

    def refute() -> None:
        for j in run:
            labels[j], marks[j] = _OUTLIER, frontier_mark()
        run.clear()

    def accept(j: int) -> None:
        labels[j], marks[j] = _accept(state, int(ts[j]), cfg)

    for i in range(len(ts)):
        t = int(ts[i])
        if t - recv[i] > cfg.receipt_skew_ms:  # ahead of its own receipt: a clock that is wrong
            labels[i], marks[i] = _OUTLIER, frontier_mark()
            continue
        if state.max_ts is not None and t <= state.max_ts + cfg.jump_ms:
            refute()  # back near the frontier: whatever jumped ahead was wrong
            accept(i)
            continue
        if run and t < int(ts[run[-1]]) - cfg.jump_ms:
            refute()  # far behind the held ones: they do not form one stream with it
        run.append(i)
        if len(run) >= cfg.jump_confirm or abs(t - recv[i]) <= cfg.receipt_skew_ms:
            for j in run:
                accept(j)
            run.clear()
    state.pending = frame[run] if run else None
    keep = np.ones(len(ts), dtype=bool)
    keep[run] = False
    return _split(frame.filter(pl.Series(keep)), labels[keep], marks[keep], exchange, symbol, cfg)


def _accept(state: AdmitState, t: int, cfg: AdmitConfig) -> tuple[int, int]:
    """Admit one trade against the frontier: (label, watermark it was judged by); moves the frontier."""
    f = state.max_ts
    state.max_ts = t if f is None else max(f, t)
    if f is not None and t < f - cfg.lateness_ms:
        return _LATE, f - cfg.lateness_ms
    return _ON_TIME, 0


def _classify_run(ts: np.ndarray, state: AdmitState, cfg: AdmitConfig) -> tuple[np.ndarray, np.ndarray]:
    """Admit held trades in arrival order (``flush``)."""
    got = [_accept(state, t, cfg) for t in ts.tolist()]
    return (np.array([g[0] for g in got], dtype=np.int8).reshape(-1),
            np.array([g[1] for g in got], dtype=np.int64).reshape(-1))


def _split(frame: pl.DataFrame, labels: np.ndarray, marks: np.ndarray, exchange: str, symbol: str,
           cfg: AdmitConfig) -> Admitted:
    tagged = frame.with_columns(pl.Series("_label", labels), pl.Series("watermark", marks, dtype=pl.Int64))

    def rows(label: int, reason: str) -> LateTrades | None:
        part = tagged.filter(pl.col("_label") == label)
        return LateTrades(exchange, symbol, part.drop("_label"), reason) if part.height else None

    on_time = tagged.filter(pl.col("_label") == _ON_TIME).select(CHUNK_COLUMNS)
    return Admitted(window_chunks(exchange, symbol, on_time, cfg.window_ms), rows(_LATE, "behind_watermark"), 0,
                    rows(_OUTLIER, "ts_outlier"))


def window_chunks(exchange: str, symbol: str, trades: pl.DataFrame, window_ms: int) -> list[Chunk]:
    """Cut trades into one chunk per window, oldest window first."""
    if trades.height == 0:
        return []
    lo, hi = trades["ts"].min(), trades["ts"].max()
    if lo // window_ms == hi // window_ms:
        return [Chunk(exchange, symbol, lo - lo % window_ms, hi, trades)]
    keyed = trades.with_columns((pl.col("ts") - pl.col("ts") % window_ms).alias("_w"))
    parts = keyed.partition_by("_w", as_dict=True, maintain_order=True, include_key=False)
    out = [Chunk(exchange, symbol, w, part["ts"].max(), part) for (w,), part in parts.items()]
    out.sort(key=lambda c: c.window_start)
    return out


def _remember(state: AdmitState, ids: list[str], newest: int, cfg: AdmitConfig) -> None:
    state.seen.update(ids)
    state.expiry.append((newest, tuple(ids)))
    state.n_seen += len(ids)
    horizon_start = (state.max_ts if state.max_ts is not None else newest) - cfg.dedup_horizon_ms
    while state.expiry and (state.expiry[0][0] < horizon_start or state.n_seen > cfg.dedup_max_ids):
        if len(state.expiry) == 1 and state.expiry[0][0] >= horizon_start:
            break  # never forget the group we just added
        _, old = state.expiry.popleft()
        state.seen.difference_update(old)
        state.n_seen -= len(old)


def concat_chunks(chunks: list[Chunk]) -> pl.DataFrame:
    return pl.concat([c.trades for c in chunks], how="vertical")


def chunk_late(chunk: Chunk, reason: str) -> LateTrades:
    """A chunk that reached its window after the window closed (wall-clock watermark)."""
    df = chunk.trades.with_columns(
        pl.lit(chunk.exchange).alias("exchange"),
        pl.lit(chunk.symbol).alias("symbol"),
        pl.lit(chunk.window_start + MINUTE_MS, dtype=pl.Int64).alias("watermark"),
    )
    return LateTrades(chunk.exchange, chunk.symbol, df, reason)

