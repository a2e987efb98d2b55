"""Events on the wire: ingest records as ``Event`` rows, and events and refused trades in band on the
trade topic. An ``Event`` (``operators.records``) is a thing that happened to the data or the system
(gaps, reconnects, later kill switches, promotions, model swaps), stored in table ``events``.

Ingest events travel *in band*: on the trade topic, keyed by the instrument like its trades, as a
JSON object with an ``event`` field (``{"event": "data_gap", "exchange": ..., ...}``). Kafka keeps
them in order with the instrument's trades, so the pipeline learns of a gap before it decides on
the bars after it. A trade the ingest refused travels the same way (``"event": "rejected"``) and
becomes a dead letter with its Kafka offset.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional, Union

import msgspec

from operators.records import DeadLetter, Event
from operators.venue_gaps import DataGapEvent, GapEvent
from operators.venue_outages import FeedDown, FeedUp
from operators.venue_trades import RejectedTrade, reason_code


class EventMessage(msgspec.Struct, kw_only=True):
    """An event on the trade topic (in band)."""

    event: str
    ts: int
    exchange: str = ""
    symbol: str = ""
    from_ts: Optional[int] = None
    to_ts: Optional[int] = None
    reason: str = ""
    detail: str = ""
    source: str = ""
    payload: Optional[str] = None  # for "rejected": the refused input


_ENC = msgspec.json.Encoder()
EVENT_DECODER = msgspec.json.Decoder(EventMessage)


def split_instrument(instrument: str) -> tuple[str, str]:
    """``exchange:symbol`` -> (exchange, symbol); the symbol may hold colons (BTC/USDT:USDT)."""
    ex, _, sym = instrument.partition(":")
    return ex, sym


def from_ingest(obj: object, now_ms: int, source: str) -> Union[Event, DeadLetter]:
    """A venue feed record (gap, outage: ``operators.venue_gaps``, ``venue_outages``) as an Event, or a
    DeadLetter for a refused trade (``operators.venue_trades``)."""
    if isinstance(obj, GapEvent):
        ex, sym = split_instrument(obj.instrument)
        return Event(kind="id_gap", ts=now_ms, exchange=ex, symbol=sym, from_ts=obj.from_ts, to_ts=obj.to_ts,
                     reason=f"{obj.missing} ids missing",
                     detail=json.dumps({"from_id": obj.from_id, "to_id": obj.to_id, "nth": obj.nth}), source=source)
    if isinstance(obj, DataGapEvent):
        ex, sym = split_instrument(obj.instrument)
        return Event(kind="data_gap", ts=now_ms, exchange=ex, symbol=sym, from_ts=obj.from_ts, to_ts=obj.to_ts,
                     reason=obj.reason, detail=obj.detail, source=source)
    if isinstance(obj, FeedDown):  # once per outage: the first failed attempt
        return Event(kind="feed_down", ts=now_ms, exchange=obj.exchange, symbol=",".join(obj.symbols),
                     reason=obj.error[:300],
                     detail=json.dumps({"stage": obj.stage, "attempt": obj.attempt}), source=source)
    if isinstance(obj, FeedUp):  # the end of that outage
        return Event(kind="reconnect", ts=now_ms, exchange=obj.exchange, symbol=",".join(obj.symbols),
                     from_ts=now_ms - obj.down_ms, to_ts=now_ms,
                     reason=f"back after {obj.attempts} failed attempt(s)",
                     detail=json.dumps({"stage": obj.stage, "attempts": obj.attempts, "down_ms": obj.down_ms,
                                        "last_error": obj.error[:300]}), source=source)
    if isinstance(obj, RejectedTrade):
        return DeadLetter(source, obj.instrument, payload_offset(obj.payload), obj.payload,
                          reason_code(obj.reason), obj.reason, now_ms)
    raise TypeError(f"not an ingest event: {type(obj).__name__}")


def payload_offset(payload: str) -> int:
    """A stable pseudo-offset for input that has no position (a refused live trade): same payload,
    same dead-letter key."""
    return int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=7).digest(), "big")


def encode_in_band(item: Union[Event, DeadLetter]) -> tuple[str, bytes]:
    """(Kafka key, message) for an event or a refused trade on the trade topic."""
    if isinstance(item, DeadLetter):
        ex, sym = split_instrument(item.partition)
        msg = EventMessage(event="rejected", ts=item.recv_ts, exchange=ex, symbol=sym, reason=item.reason,
                           detail=item.detail, source=item.source, payload=item.payload)
        return item.partition, _ENC.encode(msg)
    msg = EventMessage(event=item.kind, ts=item.ts, exchange=item.exchange, symbol=item.symbol,
                       from_ts=item.from_ts, to_ts=item.to_ts, reason=item.reason, detail=item.detail,
                       source=item.source)
    return f"{item.exchange}:{item.symbol}", _ENC.encode(msg)


def decode_in_band(msg: EventMessage, source: str, partition: str, offset: int,
                   recv_ts: int) -> Union[Event, DeadLetter]:
    if msg.event == "rejected":
        return DeadLetter(source, partition, offset, msg.payload or "", msg.reason or "rejected",
                          f"refused at ingest ({msg.source}): {msg.detail}", recv_ts)
    return Event(kind=msg.event, ts=msg.ts, exchange=msg.exchange, symbol=msg.symbol, from_ts=msg.from_ts,
                 to_ts=msg.to_ts, reason=msg.reason, detail=msg.detail, source=msg.source)
