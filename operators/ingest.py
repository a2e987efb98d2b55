"""Ingest logic (SPEC §1-§2, issue 3): ccxt trades -> contract ``Trade``s, id-gap detection,
reconnect backoff and backfill merging. Pure: no I/O, no ccxt import, no bytewax.

``dataflows/ccxt_feed.py`` drives this from a live ccxt.pro exchange; everything that decides
*what* a trade is, *whether* something is missing and *how long* to wait lives here, so it can be
tested with plain dicts.

What ccxt hands over, and what we do with it (ccxt 4.5 conventions, checked against its
``parse_trade``/``parse_ws_trade`` for the five venues):

- ``amount``: for contract markets ccxt's unified amount is in *contracts*; ``market['contractSize']``
  converts a contract to base units (linear) or to quote units (inverse; ccxt's own ``safe_trade``
  uses ``amount * contractSize / price`` there). We apply that rule to every contract market, so
  the venues whose contract is not 1 base unit -- kucoinfutures (``multiplier``, e.g. 0.001 BTC
  for XBTUSDTM) and okx swaps (``ctVal``, e.g. 0.01 BTC for BTC-USDT-SWAP) -- come out in base
  units, and binanceusdm, bybit linear and hyperliquid (contractSize 1) are unchanged.
- ``side``: for public trades ccxt's ``side`` is already the taker (aggressor) side on all five
  venues (binance derives it from ``m`` reversed, bybit ``S``, okx ``side``, kucoin ``side``,
  hyperliquid ``side`` A/B). ``takerOrMaker`` in a *public* trade does not describe the taker:
  binance's REST parser sets it from "was the buyer the maker". So we never flip the side on it.
- ``cost`` is recomputed as ``price * amount`` (quote notional) because ccxt's cost is in base
  currency for inverse markets.
- ``trader``: only hyperliquid publishes addresses: ``info['users'] == [buyer, seller]``; the
  trader is the taker's address (buyer when side is buy, else seller).

>>> t = normalise("okx", {"id": "7", "timestamp": 1718870412348, "symbol": "BTC/USDT:USDT",
...     "side": "buy", "price": 60000.0, "amount": 3.0, "info": {}},
...     {"symbol": "BTC/USDT:USDT", "contract": True, "linear": True, "contractSize": 0.01}, 0)
>>> round(t.amount, 10), round(t.cost, 6)
(0.03, 1800.0)
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

from operators.trades import MIN_TS_MS, Trade

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


def parse_symbols(spec: str) -> dict[str, list[str]]:
    """``"binanceusdm:BTC/USDT:USDT,ETH/USDT:USDT;bybit:BTC/USDT:USDT"`` -> {exchange: [symbols]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        ex, sep, syms = part.partition(":")
        if not sep or not syms:
            raise ValueError(f"expected 'exchange:SYM1,SYM2' in {part!r}")
        out.setdefault(ex.strip(), []).extend(s.strip() for s in syms.split(",") if s.strip())
    if not out:
        raise ValueError("no exchange:symbols given")
    return out


def instrument_key(exchange: str, symbol: str) -> str:
    """The instrument key used everywhere downstream: ``"exchange:symbol"``."""
    return f"{exchange}:{symbol}"


# ---------------------------------------------------------------------------------------------
# normalisation


def normalise(exchange_id: str, ccxt_trade: Any, market: Optional[dict], recv_ts: int) -> Union[Trade, str]:
    """One ccxt unified trade -> a contract ``Trade``, or a reason string ``"<code>: <detail>"``.

    ``code`` is one of ``operators.trades.DEAD_LETTER_REASONS`` or ``bad_market`` /
    ``not_a_trade``. Never raises on bad data.
    """
    if not isinstance(ccxt_trade, dict):
        return f"not_a_trade: expected a ccxt trade dict, got {type(ccxt_trade).__name__}"
    t = ccxt_trade
    market = market if isinstance(market, dict) else {}
    symbol = t.get("symbol") or market.get("symbol")
    if not symbol or not isinstance(symbol, str):
        return "missing_field: symbol"

    tid = t.get("id")
    if isinstance(tid, bool) or tid is None or tid == "":
        return "missing_field: id"
    if isinstance(tid, float):
        if not tid.is_integer():
            return f"wrong_type: id must be a string or integer, got {tid!r}"
        tid = int(tid)
    if not isinstance(tid, (str, int)):
        return f"wrong_type: id must be a string or integer, got {type(tid).__name__}"
    tid = str(tid)

    ts = _as_int_ms(t.get("timestamp"))
    if isinstance(ts, str):
        return ts
    if ts < MIN_TS_MS:
        return f"ts_out_of_range: timestamp={ts} is before 2010 (seconds instead of ms?)"

    price = _as_positive_float("price", t.get("price"))
    if isinstance(price, str):
        return price
    amount = _as_positive_float("amount", t.get("amount"))
    if isinstance(amount, str):
        return amount

    side = t.get("side")
    side = side.lower() if isinstance(side, str) else side
    if side not in ("buy", "sell"):
        return f"unknown_side: side must be 'buy' or 'sell', got {t.get('side')!r}"

    base_amount = to_base_amount(amount, price, market)
    if isinstance(base_amount, str):
        return base_amount

    trader = taker_address(exchange_id, t.get("info"), side)
    return Trade(exchange=exchange_id, symbol=symbol, id=tid, ts=ts, price=price, amount=base_amount,
                 side=side, cost=price * base_amount, trader=trader, recv_ts=recv_ts)


def to_base_amount(amount: float, price: float, market: dict) -> Union[float, str]:
    """ccxt amount -> base units: contracts * contractSize (linear), * contractSize / price
    (inverse: contractSize is in quote units there). Spot or contractSize 1: unchanged."""
    is_contract = bool(market.get("contract") or market.get("swap") or market.get("future"))
    if not is_contract:
        return amount
    cs = market.get("contractSize")
    try:
        cs = float(cs)
    except (TypeError, ValueError):
        return f"bad_market: contract market {market.get('symbol')!r} has no usable contractSize ({cs!r})"
    if not math.isfinite(cs) or cs <= 0:
        return f"bad_market: contract market {market.get('symbol')!r} has contractSize {cs!r}"
    if market.get("inverse"):
        return amount * cs / price
    return amount * cs


def taker_address(exchange_id: str, info: Any, side: str) -> Optional[str]:
    """The taker's address where the venue publishes one (hyperliquid: users = [buyer, seller])."""
    if exchange_id != "hyperliquid" or not isinstance(info, dict):
        return None
    users = info.get("users")
    if not isinstance(users, (list, tuple)) or len(users) != 2:
        return None
    addr = users[0] if side == "buy" else users[1]
    return addr if isinstance(addr, str) and addr else None


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


def reason_code(reason: str) -> str:
    """``"non_positive: ..."`` -> ``"non_positive"``."""
    return reason.split(":", 1)[0]


def _as_int_ms(v: Any) -> Union[int, str]:
    if v is None or v == "":
        return "missing_field: timestamp"
    if isinstance(v, bool):
        return f"wrong_type: timestamp must be integer ms, got {v!r}"
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer():
            return int(v)
        return f"wrong_type: timestamp must be integer ms, got {v!r}"
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return f"wrong_type: timestamp must be integer ms, got {v!r}"


def _as_positive_float(name: str, v: Any) -> Union[float, str]:
    if v is None or v == "":
        return f"missing_field: {name}"
    if isinstance(v, bool):
        return f"wrong_type: {name} must be a number, got {v!r}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return f"wrong_type: {name} must be a number, got {v!r}"
    if not math.isfinite(x):
        return f"non_finite: {name}={v!r}"
    if x <= 0:
        return f"non_positive: {name}={v!r} must be > 0"
    return x


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


@dataclass(frozen=True)
class RejectedTrade:
    """A ccxt trade ``normalise`` refused (the ccxt path's counterpart of a dead letter)."""

    instrument: str
    reason: str
    payload: str


@dataclass(frozen=True)
class FeedDown:
    """``exchange`` cannot be reached for ``symbols``: ``stage`` (``load_markets`` or ``stream``)
    failed with ``error`` (``"ErrorType: first line"``). Emitted once, when an outage starts
    (``attempt`` is the failed attempt that opened it), not once per retry."""

    exchange: str
    symbols: tuple[str, ...]
    stage: str
    error: str
    attempt: int


@dataclass(frozen=True)
class FeedUp:
    """The outage ``FeedDown`` announced is over: ``stage`` succeeded again after ``attempts``
    failed attempts over ``down_ms``; ``error`` is the last one seen."""

    exchange: str
    symbols: tuple[str, ...]
    stage: str
    attempts: int
    down_ms: int
    error: str


def error_line(err: BaseException, limit: int = 300) -> str:
    """``"ErrorType: first line of the message"`` -- what an event or a status line shows (ccxt
    errors can carry whole HTTP bodies on the following lines).

    >>> error_line(ConnectionError("refused\\n<html>...</html>"))
    'ConnectionError: refused'
    """
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text[:limit]


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


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th delay (n from 0) is uniform in
    ``[0, min(cap, base * factor**n)]``; ``reset()`` after a success starts again at n = 0.

    ``rng`` is a ``random.Random`` (seeded from ``seed`` unless given), so the same seed gives
    the same delays.

    >>> b = Backoff(base=1.0, cap=4.0, seed=7)
    >>> [b.ceiling(n) for n in range(5)]
    [1.0, 2.0, 4.0, 4.0, 4.0]
    """

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    seed: Optional[int] = 0
    rng: Optional[random.Random] = None
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or self.factor < 1:
            raise ValueError(f"Backoff needs 0 < base <= cap and factor >= 1 (base={self.base}, "
                             f"cap={self.cap}, factor={self.factor})")
        if self.rng is None:
            self.rng = random.Random(self.seed)

    def ceiling(self, attempt: Optional[int] = None) -> float:
        n = self.attempt if attempt is None else attempt
        # cap the exponent so huge attempt counts cannot overflow
        return min(self.cap, self.base * self.factor ** min(n, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt (seconds); advances the attempt count."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class OutageTracker:
    """Up/down state of one connection step (``load_markets``, or one stream loop): turns a run of
    failed attempts into one ``FeedDown`` (at the first failure) and one ``FeedUp`` (at the next
    success), and decides which retries deserve a status line, so a venue that stays down for
    hours is visible without flooding the log: a line whenever the backoff ceiling grows, then
    one every ``status_every_ms`` while it is capped.

    >>> t = OutageTracker("okx", ("BTC/USDT:USDT",), "stream", status_every_ms=60_000)
    >>> t.failed("NetworkError: closed", 1_000)
    FeedDown(exchange='okx', symbols=('BTC/USDT:USDT',), stage='stream', error='NetworkError: closed', attempt=1)
    >>> t.failed("NetworkError: closed", 2_000) is None, t.attempts
    (True, 2)
    >>> [t.should_log(c, now) for c, now in [(1.0, 0), (2.0, 10), (2.0, 20), (2.0, 60_011)]]
    [True, True, False, True]
    >>> t.succeeded(5_000)
    FeedUp(exchange='okx', symbols=('BTC/USDT:USDT',), stage='stream', attempts=2, down_ms=4000, error='NetworkError: closed')
    >>> t.succeeded(6_000) is None
    True
    """

    exchange: str
    symbols: tuple[str, ...]
    stage: str
    status_every_ms: int = 60_000
    attempts: int = 0  # failed attempts in the current outage (0: up)
    since_ms: Optional[int] = None  # when the current outage started
    last_error: str = ""  # kept after recovery: what went wrong last
    _logged_ceiling: float = 0.0
    _logged_ms: Optional[int] = None

    @property
    def down(self) -> bool:
        return self.attempts > 0

    def failed(self, error: str, now_ms: int) -> Optional[FeedDown]:
        """Record a failed attempt; the ``FeedDown`` to emit if it opens an outage, else None."""
        self.attempts += 1
        self.last_error = error
        if self.attempts > 1:
            return None
        self.since_ms = now_ms
        self._logged_ceiling, self._logged_ms = 0.0, None
        return FeedDown(self.exchange, self.symbols, self.stage, error, self.attempts)

    def succeeded(self, now_ms: int) -> Optional[FeedUp]:
        """Record a success; the ``FeedUp`` to emit if it ends an outage, else None."""
        if not self.down:
            return None
        up = FeedUp(self.exchange, self.symbols, self.stage, self.attempts,
                    max(0, now_ms - (self.since_ms or now_ms)), self.last_error)
        self.attempts, self.since_ms = 0, None
        return up

    def should_log(self, ceiling: float, now_ms: int) -> bool:
        """Whether the retry about to wait under backoff ``ceiling`` gets a status line."""
        if ceiling > self._logged_ceiling or self._logged_ms is None \
                or now_ms - self._logged_ms >= self.status_every_ms:
            self._logged_ceiling, self._logged_ms = max(ceiling, self._logged_ceiling), now_ms
            return True
        return False


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
