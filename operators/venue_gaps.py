"""Venue gaps: which venues number their trades, finding missing id ranges, merging a backfill.

What each venue allows (sequential ids, REST paging, page sizes, public history) decides what a
live feed (``dataflows.venue_feed``) can prove missing and how it fetches it back. ``IdGapTracker``
turns trade ids into ``Gap``s, ``RecentIds`` remembers the ids already delivered, and
``merge_backfill`` keeps the fetched trades that were not. Pure: no I/O, no ccxt import, no bytewax.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

from operators.records import Trade

# ---------------------------------------------------------------------------------------------
# what each venue allows (documented facts, not state)

#: Venues whose public trade ids are consecutive integers per instrument, so a missing id range
#: proves missing trades and an unbroken run proves nothing was missed (even across reconnects).
SEQUENTIAL_IDS: Mapping[str, bool] = MappingProxyType({
    # aggTrade id ``a``: consecutive per symbol; the aggTrade stream and REST aggTrades (ccxt's
    # default fetch_trades for linear swaps) share it, and REST pages forward by ``fromId``.
    # The raw ``@trade`` stream (ccxt's default ``name``) would use a different id space than
    # REST, which is why the feed watches with WATCH_PARAMS below.
    "binanceusdm": True,
    # tradeId: consecutive per instId. The public ``trades`` channel aggregates the fills of one
    # taker order at one price: tradeId is the *last* id and ``count`` the number of fills, so
    # one message covers ids tradeId-count+1 .. tradeId (see ``id_span``). REST trades are
    # single fills; a backfill only ever fills ids inside a gap, so the two never double-count.
    "okx": True,
    # execId is a UUID: no order, no gap detection; reconnects backfill by time.
    "bybit": False,
    # tradeId is an opaque string; the message ``sequence`` may well be consecutive per symbol,
    # but that is not documented clearly enough to raise gap alarms on it.
    "kucoinfutures": False,
    # tid is a large hash-like integer, not consecutive.
    "hyperliquid": False,
})

#: Extra params for ``watch_trades``/``watch_trades_for_symbols``, per venue.
WATCH_PARAMS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {"binanceusdm": MappingProxyType({"name": "aggTrade"})})

#: Venues whose REST ``fetch_trades`` pages forward by trade id, and the param that does it
#: (used instead of ``since`` when the first missing id is known).
FETCH_FROM_ID_PARAM: Mapping[str, str] = MappingProxyType({"binanceusdm": "fromId"})

#: REST page size per venue (what the venue allows at most; ccxt passes it through).
FETCH_LIMIT: Mapping[str, int] = MappingProxyType(
    {"binanceusdm": 1000, "bybit": 1000, "okx": 500, "kucoinfutures": 100})

#: False where there is no public REST trade history to backfill from. ccxt's hyperliquid
#: ``fetch_trades`` returns one *user's* fills and needs an address, so a hyperliquid outage can
#: only be reported, never filled.
PUBLIC_TRADE_HISTORY: Mapping[str, bool] = MappingProxyType({"hyperliquid": False})


def id_span(exchange_id: str, ccxt_trade: Any) -> Optional[tuple[int, int]]:
    """(first id, last id) a trade message covers, on venues with sequential ids; else None.

    okx's ``trades`` channel aggregates fills: tradeId is the last id, ``info['count']`` the
    number of fills. Every other message covers exactly its own id.
    """
    if not SEQUENTIAL_IDS.get(exchange_id) or not isinstance(ccxt_trade, dict):
        return None
    last = _as_id_int(ccxt_trade.get("id"))
    if last is None:
        return None
    count = 1
    info = ccxt_trade.get("info")
    if exchange_id == "okx" and isinstance(info, dict):
        c = _as_id_int(info.get("count"))
        count = c if c is not None and c >= 1 else 1
    return (last - count + 1, last)


def _as_id_int(v: Any) -> Optional[int]:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


# ---------------------------------------------------------------------------------------------
# records

@dataclass(frozen=True)
class Gap:
    """Ids ``from_id..to_id`` (inclusive) never arrived; ``from_ts`` is the time of the last trade
    before them, ``to_ts`` of the first trade after them."""

    instrument: str
    from_id: int
    to_id: int
    from_ts: int
    to_ts: int

    @property
    def missing(self) -> int:
        return self.to_id - self.from_id + 1


@dataclass(frozen=True)
class GapEvent:
    """A detected id gap (emitted once per gap, before the backfill tries to fill it).
    ``nth`` counts the gaps detected on this instrument so far (1 = first)."""

    instrument: str
    from_id: int
    to_id: int
    from_ts: int
    to_ts: int
    missing: int
    nth: int


@dataclass(frozen=True)
class DataGapEvent:
    """Trades of ``instrument`` between ``from_ts`` and ``to_ts`` (ms) may be missing for good:
    the backfill could not reach back that far, failed, or the venue has no public history."""

    instrument: str
    from_ts: int
    to_ts: int
    reason: str  # history_not_reachable | fetch_failed | ids_missing | no_public_history
    detail: str


# ---------------------------------------------------------------------------------------------
# state

@dataclass
class IdGapTracker:
    """Per instrument, the highest trade id seen (and its time); reports missing id ranges.

    Plain dicts of ints: picklable, deep-copyable.

    >>> g = IdGapTracker()
    >>> g.observe("x:A", 10, 1000) is None, g.observe("x:A", 11, 1001) is None
    (True, True)
    >>> g.observe("x:A", 15, 1005)
    Gap(instrument='x:A', from_id=12, to_id=14, from_ts=1001, to_ts=1005)
    """

    last: dict[str, tuple[int, int]] = field(default_factory=dict)  # instrument -> (id, ts)
    counts: dict[str, int] = field(default_factory=dict)  # instrument -> gaps detected

    def observe(self, instrument: str, first_id: int, ts: int, last_id: Optional[int] = None) -> Optional[Gap]:
        """Record a trade covering ids ``first_id..last_id`` (one id unless given). Returns the
        gap in front of it, if any. Ids at or below the highest seen change nothing."""
        last_id = first_id if last_id is None else last_id
        prev = self.last.get(instrument)
        if prev is not None and last_id <= prev[0]:
            return None
        self.last[instrument] = (last_id, ts)
        if prev is None or first_id <= prev[0] + 1:
            return None
        self.counts[instrument] = self.counts.get(instrument, 0) + 1
        return Gap(instrument, prev[0] + 1, first_id - 1, prev[1], ts)

    def is_behind(self, instrument: str, last_id: int) -> bool:
        """True when ids up to ``last_id`` were already passed (a re-delivery or a backfill)."""
        prev = self.last.get(instrument)
        return prev is not None and last_id <= prev[0]

    def gaps(self, instrument: str) -> int:
        return self.counts.get(instrument, 0)


class RecentIds:
    """The last ``maxlen`` trade ids of one instrument, for dedup (set + FIFO; picklable)."""

    def __init__(self, maxlen: int = 100_000):
        self.maxlen = maxlen
        self._order: deque[str] = deque()
        self._set: set[str] = set()

    def __contains__(self, tid: str) -> bool:
        return tid in self._set

    def __len__(self) -> int:
        return len(self._set)

    def add(self, tid: str) -> None:
        if tid in self._set:
            return
        self._set.add(tid)
        self._order.append(tid)
        while len(self._order) > self.maxlen:
            self._set.discard(self._order.popleft())

    def __getstate__(self):
        return {"maxlen": self.maxlen, "order": list(self._order)}

    def __setstate__(self, state):
        self.maxlen = state["maxlen"]
        self._order = deque(state["order"])
        self._set = set(self._order)


# ---------------------------------------------------------------------------------------------
# backfill merging


def trade_order_key(t: Trade) -> tuple:
    """(ts, id) with numeric ids compared as numbers ("9" before "10"), others as text."""
    tid = str(t.id)
    return (t.ts, 0, int(tid), "") if tid.isdigit() else (t.ts, 1, 0, tid)


def merge_backfill(seen_ids_recent, fetched: list[Trade]) -> list[Trade]:
    """Fetched trades not seen before (not in ``seen_ids_recent``, first copy only), ordered by
    (ts, id). ``seen_ids_recent`` is anything supporting ``in`` (a set, ``RecentIds``)."""
    out, taken = [], set()
    for t in fetched:
        tid = str(t.id)
        if tid in taken or tid in seen_ids_recent:
            continue
        taken.add(tid)
        out.append(t)
    out.sort(key=trade_order_key)
    return out
