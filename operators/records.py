"""Typed records and units that every room may import. A leaf: it imports nothing of ours.

Time on the wire is integer epoch milliseconds (UTC); these are its units. The records are what
travels between the rooms: a trade as it comes (``Trade``), the batches sources hand over
(``RawBatch``, ``FrameBatch``), what admission hands downstream (``Chunk``, ``LateTrades``,
``LateCount``, ``NamedCount``), refused input (``DeadLetter``) and things that happened (``Event``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

import msgspec

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS
MINUTES_PER_YEAR = 365 * 24 * 60  # annualising per-minute statistics (crypto trades every minute of the year)
MIN_TS_MS = 1_262_304_000_000  # 2010-01-01: anything earlier is a unit mistake (seconds?) or junk

#: Columns a chunk keeps for bar computation (identity travels on the chunk itself).
CHUNK_COLUMNS = ["id", "ts", "seq", "price", "amount", "is_buy", "trader", "recv_ts"]

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
    """Input that could not be used, where it came from and why (``reason``: a dead-letter reason
    code, ``detail``: a sentence a person can act on)."""

    source: str
    partition: str
    offset: int
    payload: str
    reason: str
    detail: str
    recv_ts: int


@dataclass(frozen=True)
class Chunk:
    """On-time trades of one instrument inside one window, from one source batch."""

    exchange: str
    symbol: str
    window_start: int
    max_ts: int
    trades: Any  # pl.DataFrame with CHUNK_COLUMNS
    # data-quality news for the portfolio, carried by the window of the frontier at which it was
    # learnt: LateCount and data-gap Event items (see ``operators.chunk_news.carry_news``)
    news: tuple = ()


@dataclass(frozen=True)
class LateCount:
    """``n`` trades of the minute starting at ``minute`` came behind the watermark."""

    minute: int
    n: int


@dataclass(frozen=True)
class LateTrades:
    """Trades of one instrument that did not make a bar, and why."""

    exchange: str
    symbol: str
    trades: Any  # pl.DataFrame: operators.decode.TRADE_SCHEMA columns + watermark
    reason: str  # one of operators.admission.LATE_REASONS


@dataclass(frozen=True)
class NamedCount:
    """``value`` more of what the pipeline counts under ``name`` (``duplicates``: trades dropped
    as repeats of an id already seen); summed per name downstream."""

    name: str
    value: int
    instrument: str = ""


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened to the data or the system (table ``events``; see ``operators.events``)."""

    kind: str  # id_gap | data_gap | feed_down | reconnect | ... (later: kill_switch, promotion, model_swap)
    ts: int  # when it was observed (ms)
    exchange: str = ""
    symbol: str = ""
    from_ts: Optional[int] = None  # the span it concerns, when it concerns one
    to_ts: Optional[int] = None
    reason: str = ""
    detail: str = ""  # JSON or text
    source: str = ""  # who emitted it: ingest:<exchange>, pipeline, cli
