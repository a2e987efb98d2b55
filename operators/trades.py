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
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec
import polars as pl

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

#: Every dead-letter reason, with what it means.
DEAD_LETTER_REASONS = {
    "bad_json": "the payload is not valid JSON (or not UTF-8)",
    "missing_field": "a required field is absent, null or empty",
    "wrong_type": "a field has the wrong type (e.g. price as text, ts as float)",
    "non_finite": "price or amount is NaN or infinite",
    "non_positive": "price or amount is zero or negative",
    "unknown_side": "side is neither 'buy' nor 'sell'",
    "ts_out_of_range": "ts is more than the allowed time in the future, or before 2010 (seconds instead of ms?)",
}


class Trade(msgspec.Struct, gc=False):
    """One trade as it travels on Kafka topic ``trades`` (JSON). (``gc=False``: holds no
    containers, so the garbage collector need not track it; decoding is ~35% faster.)"""

    exchange: str
    symbol: str
    id: Union[str, int]
    ts: int
    price: float
    amount: float
    side: str
    cost: Union[float, None] = None
    trader: Union[str, None] = None
    recv_ts: Union[int, None] = None


class RawBatch(msgspec.Struct):
    """Raw messages as read from a source; ``offsets[i]`` locates ``payloads[i]`` in it."""

    source: str
    partition: str
    offsets: list[int]
    payloads: list[bytes]
    recv_ts: int


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


_BATCH_DECODER = msgspec.json.Decoder(list[Trade])
_ONE_DECODER = msgspec.json.Decoder(Trade)


_NON_FINITE_TOKEN = re.compile(rb"[:\[,]\s*-?(NaN|Infinity)\b")


def _classify_msgspec_error(err: Exception, payload: bytes) -> str:
    text = str(err)
    if "Number out of range" in text or _NON_FINITE_TOKEN.search(payload):
        return "non_finite"  # 1e999, or Python's json.dumps(float("nan")) -> NaN
    if not isinstance(err, msgspec.ValidationError):
        return "bad_json"
    try:  # typed decoding stops at the first type error; is the rest even JSON?
        msgspec.json.decode(payload)
    except msgspec.DecodeError:
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


def _reason_expr(now_ms: int, max_future_ms: int) -> pl.Expr:
    """One expression giving each row's dead-letter reason, or null for a good row."""
    missing = pl.lit(False)
    for c in ("exchange", "symbol", "id", "ts", "price", "amount", "side"):
        missing = missing | pl.col(c).is_null()
    for c in ("exchange", "symbol", "id"):
        missing = missing | (pl.col(c).str.len_bytes() == 0)
    price, amount, ts = pl.col("price"), pl.col("amount"), pl.col("ts")
    return (
        pl.when(pl.col("_wrong_type"))  # first: a failed cast leaves a null behind
        .then(pl.lit("wrong_type"))
        .when(missing)
        .then(pl.lit("missing_field"))
        .when(~price.is_finite() | ~amount.is_finite())
        .then(pl.lit("non_finite"))
        .when((price <= 0) | (amount <= 0))
        .then(pl.lit("non_positive"))
        .when(~pl.col("side").is_in(["buy", "sell"]))
        .then(pl.lit("unknown_side"))
        .when((ts > now_ms + max_future_ms) | (ts < MIN_TS_MS))
        .then(pl.lit("ts_out_of_range"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("_reason")
    )


def explain(reason: str, row: dict, now_ms: int, max_future_ms: int) -> str:
    """A sentence a person can act on, for a row that failed the value checks."""
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


def _split_valid(frame: pl.DataFrame, now_ms: int, max_future_ms: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply the value rules. ``frame`` has the decoded columns plus ``_wrong_type`` and ``_row``."""
    checked = frame.with_columns(_reason_expr(now_ms, max_future_ms))
    bad = checked.filter(pl.col("_reason").is_not_null())
    good = checked.filter(pl.col("_reason").is_null()).select(
        "exchange", "symbol", "id", "ts", "price", "amount",
        (pl.col("side") == "buy").alias("is_buy"), "trader", "recv_ts", "seq",
    )
    return good, bad


def _decode_raw(batch: RawBatch, now_ms: int, max_future_ms: int) -> Decoded:
    payloads = batch.payloads
    trades: list[Trade] | None = None
    if payloads:
        try:  # fast path: the whole batch as one JSON array (one payload = one element)
            trades = _BATCH_DECODER.decode(b"[" + b",".join(payloads) + b"]")
            if len(trades) != len(payloads):
                trades = None
        except (msgspec.DecodeError, msgspec.ValidationError):
            trades = None
    dead: list[DeadLetter] = []
    events: list = []
    if trades is not None:
        ok_idx = list(range(len(payloads)))
    else:
        from operators.events import EVENT_DECODER, decode_in_band  # events import this module

        trades, ok_idx = [], []
        for i, p in enumerate(payloads):
            try:
                trades.append(_ONE_DECODER.decode(p))
                ok_idx.append(i)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                try:  # an in-band event (gap, reconnect, refused trade)?
                    ev = decode_in_band(EVENT_DECODER.decode(p), batch.source, batch.partition,
                                        batch.offsets[i], batch.recv_ts)
                    (dead if isinstance(ev, DeadLetter) else events).append(ev)
                    continue
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass
                dead.append(
                    DeadLetter(batch.source, batch.partition, batch.offsets[i], _text(p),
                               _classify_msgspec_error(err, p), str(err), batch.recv_ts)
                )
    seqs = [batch.offsets[i] for i in ok_idx]
    frame = _trades_to_frame(trades, seqs, batch.recv_ts).with_columns(
        pl.lit(False).alias("_wrong_type"), pl.Series("_row", ok_idx, dtype=pl.Int64)
    )
    good, bad = _split_valid(frame, now_ms, max_future_ms)
    for row in bad.iter_rows(named=True):
        i = row["_row"]
        dead.append(
            DeadLetter(batch.source, batch.partition, batch.offsets[i], _text(payloads[i]),
                       row["_reason"], explain(row["_reason"], row, now_ms, max_future_ms), batch.recv_ts)
        )
    return Decoded(good, dead, events)


_NUMERIC = {"ts": pl.Int64, "price": pl.Float64, "amount": pl.Float64, "recv_ts": pl.Int64}


def _decode_frame(batch: FrameBatch, now_ms: int, max_future_ms: int) -> Decoded:
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
              detail.alias("_type_detail"), pl.int_range(pl.len(), dtype=pl.Int64).alias("_row")]
    frame = raw.select(exprs)
    if "recv_ts" in cols:
        frame = frame.with_columns(pl.col("recv_ts").fill_null(batch.recv_ts))
    good, bad = _split_valid(frame, now_ms, max_future_ms)
    dead = []
    if bad.height:
        originals = raw.with_row_index("_row").filter(pl.col("_row").is_in(bad["_row"].to_list()))
        payload_by_row = {r["_row"]: r for r in originals.iter_rows(named=True)}
        for row in bad.iter_rows(named=True):
            orig = dict(payload_by_row[row["_row"]])
            orig.pop("_row")
            dead.append(
                DeadLetter(batch.source, batch.partition, row["seq"] if row["seq"] is not None else -1,
                           msgspec.json.encode(orig, enc_hook=str).decode(), row["_reason"],
                           explain(row["_reason"], row, now_ms, max_future_ms), batch.recv_ts)
            )
    live_dead = [e for e in batch.events if isinstance(e, DeadLetter)]
    return Decoded(good, dead + live_dead, [e for e in batch.events if not isinstance(e, DeadLetter)])


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", errors="backslashreplace")


def decode_batch(batch: RawBatch | FrameBatch, now_ms: int, max_future_ms: int = DAY_MS) -> Decoded:
    """Decode and validate a batch: good trades as one frame, every bad one as a dead letter."""
    if isinstance(batch, RawBatch):
        return _decode_raw(batch, now_ms, max_future_ms)
    return _decode_frame(batch, now_ms, max_future_ms)


def split_instruments(frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """``[("exchange:symbol", trades of that instrument in arrival order), ...]``."""
    if frame.height == 0:
        return []
    parts = frame.partition_by("exchange", "symbol", as_dict=True, maintain_order=True)
    return [(f"{ex}:{sym}", part) for (ex, sym), part in parts.items()]


# ---------------------------------------------------------------------------------------------
# admission: dedup, lateness, cut into window chunks


@dataclass(frozen=True)
class AdmitConfig:
    lateness_ms: int = 2_000
    dedup_horizon_ms: int = 10 * MINUTE_MS
    dedup_max_ids: int = 500_000
    window_ms: int = MINUTE_MS


@dataclass
class AdmitState:
    """Per instrument: the newest event time seen and the ids seen within the dedup horizon."""

    max_ts: int | None = None
    seen: set = field(default_factory=set)
    expiry: deque = field(default_factory=deque)  # (max ts of the group, tuple of the group's ids)
    n_seen: int = 0

    def __deepcopy__(self, memo: dict) -> "AdmitState":
        # ids are immutable strings in immutable tuples: copying the containers is enough
        return AdmitState(self.max_ts, set(self.seen), deque(self.expiry), self.n_seen)


@dataclass(frozen=True)
class Chunk:
    """On-time trades of one instrument inside one window, from one source batch."""

    exchange: str
    symbol: str
    window_start: int
    max_ts: int
    trades: pl.DataFrame  # CHUNK_COLUMNS


@dataclass(frozen=True)
class LateTrades:
    exchange: str
    symbol: str
    trades: pl.DataFrame  # TRADE_SCHEMA columns + watermark
    reason: str  # behind_watermark | window_closed


@dataclass(frozen=True)
class Counter:
    name: str
    value: int
    instrument: str = ""


@dataclass
class Admitted:
    chunks: list[Chunk]
    late: LateTrades | None
    duplicates: int


def admit(state: AdmitState, trades: pl.DataFrame, cfg: AdmitConfig) -> Admitted:
    """Drop duplicate ids, separate trades behind the watermark, cut the rest into window chunks.

    ``trades`` is one instrument's slice of a decoded batch, in arrival order. A trade is late when
    its ts is below the watermark at its arrival: the newest ts seen before it minus the allowed
    lateness. This is bytewax's EventClock rule applied trade by trade, so where the batches
    happen to be cut does not change which trades are late. Mutates and keeps ``state``.
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

    prev = state.max_ts if state.max_ts is not None else -(2**62)
    newest = trades["ts"].max()
    state.max_ts = max(prev, newest)
    _remember(state, ids, newest, cfg)

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
    return Admitted(window_chunks(exchange, symbol, on_time, cfg.window_ms), late, duplicates)


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
    horizon_start = state.max_ts - cfg.dedup_horizon_ms
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

