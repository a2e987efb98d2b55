"""dataflows/venue_feed.py (with its backfill and perp parts, venue_exchange and venue_source) against
a scripted fake exchange: reconnects, gaps, backfill, backoff.

The fake's watch methods return scripted batches (or raise the scripted error); its fetch_trades
serves the full "true tape" the way the venues do (forward from ``since``/``fromId``, or only the
most recent trades); its load_markets can be scripted to fail. When every script is used up it
sets the stop event, so each run ends deterministically, without sleeping and without a network.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from collections import Counter, deque

import ccxt
import pytest

from dataflows.venue_exchange import (
    FeedError, UnknownExchangeError, UnknownSymbolError, check_exchange_id, credential_env_names,
    make_exchange, unknown_symbols,
)
from dataflows.venue_feed import CcxtFeed
from dataflows.venue_perp_feed import PerpPolling
from dataflows.venue_source import CcxtSource, FeedOutcome
from operators.perp import PerpUpdate
from operators.records import Event
from operators.venue_gaps import DataGapEvent, GapEvent
from operators.venue_outages import Backoff, FeedDown, FeedUp
from operators.venue_trades import RejectedTrade

T0 = 1_718_870_400_000
NOW = T0 + 3_600_000
BTC, ETH = "BTC/USDT:USDT", "ETH/USDT:USDT"


def market(symbol, contract_size=1.0):
    base, rest = symbol.split("/")
    quote = rest.split(":")[0]
    return {"id": base + quote, "symbol": symbol, "base": base, "quote": quote, "settle": quote,
            "type": "swap", "spot": False, "swap": True, "future": False, "contract": True,
            "linear": True, "inverse": False, "contractSize": contract_size}


def ccxt_trade(symbol, tid, ts, amount=1.0, side="buy", price=100.0, info=None):
    """A ccxt unified trade as watch_trades/fetch_trades return it."""
    return {"info": info or {}, "id": str(tid), "order": None, "timestamp": ts, "datetime": None,
            "symbol": symbol, "type": None, "takerOrMaker": None, "side": side, "price": price,
            "amount": amount, "cost": price * amount, "fee": {"cost": None, "currency": None}, "fees": []}


def tape(symbol, n, *, first=1, t0=T0, step=100, uuids=False):
    """n trades, ids first.. (or UUIDs), one every ``step`` ms, alternating sides."""
    return [ccxt_trade(symbol, uuid.UUID(int=i) if uuids else i, t0 + (i - first) * step,
                       amount=1.0 + (i % 7) / 10, side="buy" if i % 2 else "sell")
            for i in range(first, first + n)]


class MaxRng:
    """A 'random' source whose full-jitter draw is always the ceiling: delays become visible."""

    def uniform(self, a, b):
        return b


class FakeExchange:
    """Scripted venue. Perp data (all optional; a venue without it does not ``has`` the method):
    ``funding`` / ``open_interest``: {symbol: [response, ...]} served one per ``fetch_funding_rate``
    / ``fetch_open_interest`` call; ``liquidations``: {"*": [batch, ...]} for
    ``watch_liquidations_for_symbols`` or {symbol: [...]} for ``watch_liquidations``. A step may
    be an exception (raised; ``ccxt.NotSupported`` also ends its script: the feed does not ask
    again), a callable (``step(fake)`` at call time) or a float (a real pause in seconds before the
    next step). When every script is used up the fake sets ``stop``."""

    def __init__(self, exchange_id, tapes, scripts, *, multi=True, recent_only=None, history_from_ts=None,
                 fetch_failures=0, load_failures=0, load_error=None, funding=None, open_interest=None,
                 liquidations=None):
        self.id = exchange_id
        self.has = {"watchTradesForSymbols": multi, "watchTrades": True, "fetchTrades": True}
        self.markets = {s: market(s) for s in tapes}
        self.tapes = tapes
        self.scripts = {k: deque(v) for k, v in scripts.items()}  # key "*" = watch_trades_for_symbols
        for kind, steps in (("funding", funding), ("open_interest", open_interest), ("liquidations", liquidations)):
            for k, v in (steps or {}).items():
                self.scripts[(kind, k)] = deque(v)
        if funding is not None:
            self.has["fetchFundingRate"] = True
        if open_interest is not None:
            self.has["fetchOpenInterest"] = True
        if liquidations is not None:
            self.has["watchLiquidations"] = True
            self.has["watchLiquidationsForSymbols"] = "*" in liquidations
        self.venue_ts = None  # the newest trade ts the stream delivered: the venue's "now"
        self.recent_only = recent_only  # REST sees only the newest N trades (bybit/okx/kucoin style)
        self.history_from_ts = history_from_ts  # REST history starts here
        self.fetch_failures = fetch_failures  # first N fetches raise NetworkError (-1: all)
        self.load_failures = load_failures  # first N load_markets raise load_error (-1: all)
        self.load_error = load_error or ccxt.ExchangeNotAvailable(
            f"{exchange_id} GET https://example.invalid/exchangeInfo\n<html>502 Bad Gateway</html>")
        self.calls = []
        self.stop: asyncio.Event | None = None
        self._done = set()

    async def load_markets(self):
        self.calls.append(("load_markets",))
        await asyncio.sleep(0)
        if self.load_failures:
            self.load_failures -= 1
            raise copy.copy(self.load_error)
        return self.markets

    async def watch_trades_for_symbols(self, symbols, since=None, limit=None, params={}):
        self.calls.append(("watch_trades_for_symbols", tuple(symbols), dict(params)))
        return await self._step("*")

    async def watch_trades(self, symbol, since=None, limit=None, params={}):
        self.calls.append(("watch_trades", symbol, dict(params)))
        return await self._step(symbol)

    async def fetch_funding_rate(self, symbol, params={}):
        self.calls.append(("fetch_funding_rate", symbol))
        return await self._step(("funding", symbol))

    async def fetch_open_interest(self, symbol, params={}):
        self.calls.append(("fetch_open_interest", symbol))
        return await self._step(("open_interest", symbol))

    async def watch_liquidations_for_symbols(self, symbols, since=None, limit=None, params={}):
        self.calls.append(("watch_liquidations_for_symbols", tuple(symbols)))
        return await self._step(("liquidations", "*"))

    async def watch_liquidations(self, symbol, since=None, limit=None, params={}):
        self.calls.append(("watch_liquidations", symbol))
        return await self._step(("liquidations", symbol))

    async def _step(self, key):
        await asyncio.sleep(0)
        script = self.scripts[key]
        while script and isinstance(script[0], float):
            await asyncio.sleep(script.popleft())
        if not script:
            self._done.add(key)
            if self._done == set(self.scripts):
                self.stop.set()
            await asyncio.Event().wait()  # a quiet stream, until the feed is stopped
        step = script.popleft()
        if isinstance(step, ccxt.NotSupported) and not script:
            self._done.add(key)
            if self._done == set(self.scripts):
                self.stop.set()
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            step = step(self)
        if isinstance(key, str) and isinstance(step, list):  # trades: the venue's clock moves on
            ts = [t["timestamp"] for t in step if isinstance(t, dict) and isinstance(t.get("timestamp"), int)]
            self.venue_ts = max([*ts, self.venue_ts or 0]) if ts else self.venue_ts
        return copy.deepcopy(step)

    async def fetch_trades(self, symbol, since=None, limit=None, params={}):
        self.calls.append(("fetch_trades", symbol, since, limit, dict(params)))
        await asyncio.sleep(0)
        if self.fetch_failures:
            self.fetch_failures -= 1
            raise ccxt.NetworkError("fetch_trades: connection reset")
        rows = self.tapes[symbol]
        if self.history_from_ts is not None:
            rows = [r for r in rows if r["timestamp"] >= self.history_from_ts]
        if self.recent_only is not None:
            rows = rows[-self.recent_only:]
            rows = [r for r in rows if since is None or r["timestamp"] >= since]
            return copy.deepcopy(rows[-limit:])
        if "fromId" in params:
            rows = [r for r in rows if int(r["id"]) >= params["fromId"]]
        elif since is not None:
            rows = [r for r in rows if r["timestamp"] >= since]
        return copy.deepcopy(rows[:limit])

    def fetches(self):
        return [c for c in self.calls if c[0] == "fetch_trades"]


def run_feed(fake, symbols, *, max_sleeps=None, clock=lambda: NOW, **kw):
    """Run the feed until the fake's scripts are used up (or it has waited ``max_sleeps`` times).
    Returns (feed, batches, events, sleeps)."""
    batches, events, sleeps = [], [], []
    stop = None

    async def sleep(delay):
        sleeps.append(delay)
        if max_sleeps is not None and len(sleeps) >= max_sleeps:
            stop.set()
        await asyncio.sleep(0)

    async def main():
        nonlocal stop
        stop = asyncio.Event()
        fake.stop = stop
        kw.setdefault("backoff_factory", lambda i: Backoff(base=0.5, cap=8.0, seed=i))
        feed = CcxtFeed(fake, symbols, lambda ts: batches.append(list(ts)), events.append,
                        sleep=sleep, clock=clock, **kw)
        await asyncio.wait_for(feed.run(stop), timeout=5)
        return feed

    feed = asyncio.run(main())
    return feed, batches, events, sleeps


def delivered(batches, symbol=None):
    return [t for b in batches for t in b if symbol is None or t.symbol == symbol]


def assert_exactly_once(trades, tape_rows):
    ids = [t.id for t in trades]
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    assert not dupes, f"duplicates: {dupes}"
    want = [r["id"] for r in tape_rows]
    assert set(ids) == set(want), f"missing {sorted(set(want) - set(ids))}, extra {sorted(set(ids) - set(want))}"


def of_type(events, cls):
    return [e for e in events if isinstance(e, cls)]


# -- (a) a disconnect that drops trades ----------------------------------------------------------

def test_disconnect_dropping_trades_is_backfilled_exactly_once():
    btc = tape(BTC, 40, uuids=True)  # bybit ids are UUIDs: nothing to detect, backfill by time
    eth = tape(ETH, 20, step=200, t0=T0 + 50, uuids=True)
    script = [
        btc[0:10], eth[0:5],
        ccxt.NetworkError("socket closed"),  # btc 10..24 and eth 5.. never arrive on the stream
        btc[25:30],
        btc[29:35] + eth[15:20],  # re-delivery of btc 29 and eth trades the backfill already had
        btc[35:40],
    ]
    fake = FakeExchange("bybit", {BTC: btc, ETH: eth}, {"*": script})
    feed, batches, events, sleeps = run_feed(fake, [BTC, ETH])

    assert_exactly_once(delivered(batches, BTC), btc)
    assert_exactly_once(delivered(batches, ETH), eth)
    for sym in (BTC, ETH):  # backfilled trades come before the live ones: time order holds
        ts = [t.ts for t in delivered(batches, sym)]
        assert ts == sorted(ts)
    assert of_type(events, DataGapEvent) == []
    assert [type(e) for e in events] == [FeedDown, FeedUp]  # one outage: down, then back
    assert (events[0].stage, events[0].error, events[0].attempt) == ("stream", "NetworkError: socket closed", 1)
    assert (events[1].stage, events[1].attempts) == ("stream", 1)
    assert feed.stats.disconnects == 1 and len(sleeps) == 1
    assert feed.stats.backfilled == 15 + 15  # btc 10..24, eth 5..19
    assert feed.stats.trades == 60 and feed.stats.duplicates > 0
    # the backfill asked for history from the last trade seen before the disconnect
    fetch_since = {c[1]: c[2] for c in fake.fetches()}
    assert fetch_since == {BTC: btc[9]["timestamp"], ETH: eth[4]["timestamp"]}
    assert all(t.exchange == "bybit" and t.recv_ts == NOW for t in delivered(batches))


def test_disconnect_on_a_sequential_venue_is_filled_by_id():
    btc = tape(BTC, 30)
    script = [btc[0:10], ccxt.RequestTimeout("ping-pong timeout"), btc[20:30]]
    fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": script})
    feed, batches, events, _ = run_feed(fake, [BTC])

    assert [t.id for t in delivered(batches)] == [str(i) for i in range(1, 31)]  # once, in order
    gap = of_type(events, GapEvent)
    assert len(gap) == 1 and (gap[0].from_id, gap[0].to_id, gap[0].missing) == (11, 20, 10)
    assert of_type(events, DataGapEvent) == []
    # aggTrade stream (same id space as REST aggTrades), REST paged by id
    assert all(c[2] == {"name": "aggTrade"} for c in fake.calls if c[0] == "watch_trades_for_symbols")
    assert [c[4] for c in fake.fetches()] == [{"fromId": 11}]


# -- (b) an id gap inside a stream ---------------------------------------------------------------

def test_id_gap_inside_stream_is_detected_counted_and_filled():
    btc = tape(BTC, 25)
    by_id = {int(r["id"]): r for r in btc}
    script = [
        [by_id[i] for i in range(1, 11)],
        [by_id[i] for i in range(14, 21)],  # 11..13 missing, no disconnect
        [by_id[i] for i in (21, 22, 24, 25)],  # 23 missing
    ]
    fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": script})
    feed, batches, events, _ = run_feed(fake, [BTC])

    assert [t.id for t in delivered(batches)] == [str(i) for i in range(1, 26)]
    gaps = of_type(events, GapEvent)
    assert [(g.from_id, g.to_id, g.missing, g.nth) for g in gaps] == [(11, 13, 3, 1), (23, 23, 1, 2)]
    assert gaps[0].instrument == f"binanceusdm:{BTC}"
    assert (gaps[0].from_ts, gaps[0].to_ts) == (by_id[10]["timestamp"], by_id[14]["timestamp"])
    assert feed.stats.gaps_detected == 2 and feed.stats.gaps_filled == 2
    assert feed.gaps.gaps(f"binanceusdm:{BTC}") == 2
    assert of_type(events, DataGapEvent) == [] and of_type(events, FeedDown) == []
    assert feed.stats.backfilled == 4


def test_okx_aggregated_messages_and_single_fill_backfill_do_not_double_count():
    fills = tape(BTC, 12)  # REST: one row per fill, ids 1..12

    def agg(first, last):  # the trades channel: one message per taker order/price, id = last fill
        rows = fills[first - 1:last]
        return ccxt_trade(BTC, last, rows[-1]["timestamp"], amount=sum(r["amount"] for r in rows),
                          side=rows[-1]["side"], info={"tradeId": str(last), "count": str(last - first + 1)})

    script = [[agg(1, 1), agg(2, 4)], [agg(8, 9)], [agg(10, 12)]]  # fills 5..7 never streamed
    fake = FakeExchange("okx", {BTC: fills}, {"*": script})
    feed, batches, events, _ = run_feed(fake, [BTC])

    got = delivered(batches)
    assert [t.id for t in got] == ["1", "4", "5", "6", "7", "9", "12"]
    assert sum(t.amount for t in got) == pytest.approx(sum(r["amount"] for r in fills))
    assert [(g.from_id, g.to_id) for g in of_type(events, GapEvent)] == [(5, 7)]
    assert feed.stats.gaps_filled == 1 and of_type(events, DataGapEvent) == []


# -- (c) gaps that cannot be filled --------------------------------------------------------------

def test_unreachable_history_after_disconnect_is_a_data_gap():
    btc = tape(BTC, 100, uuids=True)
    script = [btc[0:10], ccxt.NetworkError("socket closed"), btc[90:100]]
    # like bybit: REST serves only the most recent trades, here the newest 50
    fake = FakeExchange("bybit", {BTC: btc}, {"*": script}, recent_only=50)
    feed, batches, events, _ = run_feed(fake, [BTC])

    lost = of_type(events, DataGapEvent)
    assert len(lost) == 1
    ev = lost[0]
    assert ev.instrument == f"bybit:{BTC}" and ev.reason == "history_not_reachable"
    assert (ev.from_ts, ev.to_ts) == (btc[9]["timestamp"], btc[50]["timestamp"])
    assert_exactly_once(delivered(batches), btc[0:10] + btc[50:100])  # what could be had, once
    assert feed.stats.data_gaps == 1


def test_unreachable_ids_on_a_sequential_venue_are_a_data_gap():
    btc = tape(BTC, 40)
    script = [btc[0:10], btc[30:40]]  # ids 11..30 missing
    fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": script}, history_from_ts=btc[20]["timestamp"])
    feed, batches, events, _ = run_feed(fake, [BTC])

    assert [t.id for t in delivered(batches)] == [str(i) for i in list(range(1, 11)) + list(range(21, 41))]
    (ev,) = of_type(events, DataGapEvent)
    assert ev.instrument == f"binanceusdm:{BTC}" and ev.reason == "history_not_reachable"
    # the span that stays missing: from the last trade before the hole to the first recovered one
    assert (ev.from_ts, ev.to_ts) == (btc[9]["timestamp"], btc[20]["timestamp"])
    assert "10 of 20" in ev.detail and "11..30" in ev.detail
    assert feed.stats.gaps_detected == 1 and feed.stats.gaps_filled == 0


def test_backfill_that_keeps_failing_is_a_data_gap_after_retries():
    btc = tape(BTC, 30, uuids=True)
    script = [btc[0:10], ccxt.NetworkError("socket closed"), btc[20:30]]
    fake = FakeExchange("bybit", {BTC: btc}, {"*": script}, fetch_failures=-1)
    feed, batches, events, sleeps = run_feed(fake, [BTC], fetch_retries=3)

    assert len(fake.fetches()) == 3
    (ev,) = of_type(events, DataGapEvent)
    assert ev.reason == "fetch_failed" and ev.instrument == f"bybit:{BTC}"
    assert (ev.from_ts, ev.to_ts) == (btc[9]["timestamp"], btc[20]["timestamp"])
    assert "NetworkError" in ev.detail
    assert len(sleeps) == 1 + 2  # one reconnect wait, two waits between the three REST tries
    assert_exactly_once(delivered(batches), btc[0:10] + btc[20:30])


def test_venue_without_public_history_reports_the_outage():
    coin = "BTC/USDC:USDC"
    hl = tape(coin, 20, first=902375812644100)
    for r in hl:
        r["info"] = {"users": ["0xbuyer", "0xseller"]}
    script = {coin: [hl[0:5], ccxt.NetworkError("closed"), hl[10:20]]}
    fake = FakeExchange("hyperliquid", {coin: hl}, script, multi=False)
    feed, batches, events, _ = run_feed(fake, [coin])

    (ev,) = of_type(events, DataGapEvent)
    assert ev.reason == "no_public_history" and ev.instrument == f"hyperliquid:{coin}"
    assert (ev.from_ts, ev.to_ts) == (hl[4]["timestamp"], hl[10]["timestamp"])
    assert fake.fetches() == []
    got = delivered(batches)
    assert [t.trader for t in got] == ["0xbuyer" if t.side == "buy" else "0xseller" for t in got]
    assert of_type(events, GapEvent) == []  # tids are not sequential: no id-gap alarms


# -- (d) backoff ---------------------------------------------------------------------------------

def test_backoff_delays_grow_are_capped_and_reset_after_success():
    btc = tape(BTC, 9)
    err = ccxt.NetworkError
    script = [btc[0:3], err("a"), err("b"), err("c"), err("d"), err("e"), btc[3:6], err("f"), err("g"), btc[6:9]]
    fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": script})
    feed, batches, events, sleeps = run_feed(
        fake, [BTC], backoff_factory=lambda i: Backoff(base=1.0, cap=4.0, rng=MaxRng()))

    assert sleeps == [1.0, 2.0, 4.0, 4.0, 4.0, 1.0, 2.0]
    # two outages: one FeedDown each (not one per retry), each closed by a FeedUp
    assert [type(e) for e in events] == [FeedDown, FeedUp, FeedDown, FeedUp]
    assert [(e.error, e.attempt) for e in of_type(events, FeedDown)] == [("NetworkError: a", 1), ("NetworkError: f", 1)]
    assert [(e.attempts, e.error) for e in of_type(events, FeedUp)] == [(5, "NetworkError: e"), (2, "NetworkError: g")]
    assert events[0].symbols == (BTC,)
    assert feed.stats.disconnects == 7
    assert [t.id for t in delivered(batches)] == [str(i) for i in range(1, 10)]
    assert fake.fetches() == []  # ids stayed contiguous: nothing to backfill


def test_default_backoff_is_jittered_within_bounds_and_deterministic():
    def run():
        btc = tape(BTC, 2)
        script = [btc[0:1]] + [ccxt.NetworkError("x")] * 8 + [btc[1:2]]
        fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": script})
        return run_feed(fake, [BTC], backoff_factory=lambda i: Backoff(base=0.5, cap=4.0, seed=11))[3]

    first, second = run(), run()
    assert first == second  # seeded
    assert all(0 <= d <= min(4.0, 0.5 * 2 ** n) for n, d in enumerate(first))
    assert len(set(first)) == len(first)


# -- (e) which watch method ----------------------------------------------------------------------

def test_watch_trades_for_symbols_is_used_when_available():
    btc, eth = tape(BTC, 4), tape(ETH, 4)
    fake = FakeExchange("binanceusdm", {BTC: btc, ETH: eth}, {"*": [btc[0:2] + eth[0:2], btc[2:4], eth[2:4]]})
    _, batches, _, _ = run_feed(fake, [BTC, ETH])

    methods = {c[0] for c in fake.calls}
    assert "watch_trades_for_symbols" in methods and "watch_trades" not in methods
    assert {c[1] for c in fake.calls if c[0] == "watch_trades_for_symbols"} == {(BTC, ETH)}
    assert len(delivered(batches, BTC)) == 4 and len(delivered(batches, ETH)) == 4
    assert all(len({t.symbol for t in b}) == 1 for b in batches)  # one instrument per callback


def test_per_symbol_watch_trades_when_the_exchange_lacks_the_multi_method():
    btc, eth = tape(BTC, 6, uuids=True), tape(ETH, 6, uuids=True)
    scripts = {BTC: [btc[0:3], btc[3:6]], ETH: [eth[0:2], ccxt.NetworkError("eth socket"), eth[2:6]]}
    fake = FakeExchange("bybit", {BTC: btc, ETH: eth}, scripts, multi=False)
    feed, batches, events, _ = run_feed(fake, [BTC, ETH])

    assert "watch_trades_for_symbols" not in {c[0] for c in fake.calls}
    assert {c[1] for c in fake.calls if c[0] == "watch_trades"} == {BTC, ETH}
    assert_exactly_once(delivered(batches, BTC), btc)
    assert_exactly_once(delivered(batches, ETH), eth)
    # only the ETH loop reconnected
    assert [e.symbols for e in of_type(events, FeedDown)] == [(ETH,)]
    assert len(feed.backoffs) == 2


# -- (f) outages, unknown venues and symbols ----------------------------------------------------

def feed_log(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "dataflows.venue_feed" and r.levelno == logging.WARNING]


def test_unreachable_venue_is_one_feed_down_and_a_status_line_when_the_backoff_grows(caplog):
    fake = FakeExchange("binanceusdm", {BTC: tape(BTC, 3)}, {"*": []}, load_failures=-1)
    ticks = iter(range(10_000))
    caplog.set_level(logging.WARNING, logger="dataflows.venue_feed")
    feed, batches, events, sleeps = run_feed(
        fake, [BTC], max_sleeps=12, clock=lambda: NOW + 20_000 * next(ticks),  # 20 s per attempt
        backoff_factory=lambda i: Backoff(base=1.0, cap=4.0, rng=MaxRng()), status_every_s=60)

    assert len(sleeps) == 12 and batches == []
    (down,) = events  # once per outage, not per retry; never back up
    assert down == FeedDown("binanceusdm", (BTC,), "load_markets",
                            "ExchangeNotAvailable: binanceusdm GET https://example.invalid/exchangeInfo", 1)
    assert not any(c[0].startswith("watch") for c in fake.calls)
    assert feed.last_error == ("ExchangeNotAvailable: binanceusdm GET https://example.invalid/exchangeInfo "
                               "(load_markets, attempt 12)")
    lines = [m for m in feed_log(caplog) if "unreachable" in m]
    # ceilings 1, 2, 4 s: a line each time it grows; capped: one a minute (attempts 6, 9, 12 at 20 s each)
    assert [int(m.split("retry ")[1].split()[0]) for m in lines] == [1, 2, 3, 6, 9, 12]
    assert lines[2].startswith("binanceusdm BTC/USDT:USDT: unreachable (ExchangeNotAvailable: binanceusdm GET")
    assert "retry 3 in 4 s" in lines[2] and "<html>" not in lines[2]


def test_venue_failing_twice_then_recovering_is_one_feed_down_and_trades_flow(caplog):
    btc = tape(BTC, 20)
    fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": [btc[0:10], btc[10:20]]},
                        load_failures=2, load_error=ConnectionError("connection refused"))
    caplog.set_level(logging.WARNING, logger="dataflows.venue_feed")
    feed, batches, events, sleeps = run_feed(fake, [BTC])

    assert [type(e) for e in events] == [FeedDown, FeedUp]
    assert (events[0].stage, events[0].error) == ("load_markets", "ConnectionError: connection refused")
    assert (events[1].stage, events[1].attempts) == ("load_markets", 2)
    assert len(sleeps) == 2
    assert [t.id for t in delivered(batches)] == [str(i) for i in range(1, 21)]
    assert any("back after 2 failed attempt(s)" in m for m in feed_log(caplog))


def test_unknown_symbol_is_an_error_as_soon_as_markets_are_loaded():
    fake = FakeExchange("binanceusdm", {BTC: tape(BTC, 3), ETH: tape(ETH, 3)}, {"*": [tape(BTC, 3)]})
    with pytest.raises(UnknownSymbolError) as exc:
        run_feed(fake, ["BTC/USDT", ETH])
    assert str(exc.value) == "binanceusdm does not list 'BTC/USDT'; close matches: BTC/USDT:USDT"
    assert isinstance(exc.value, FeedError)
    assert [c[0] for c in fake.calls] == ["load_markets"]  # no stream, no retry


def test_unknown_symbols_suggests_venue_ids_case_and_says_when_nothing_is_close():
    markets = {BTC: market(BTC), ETH: market(ETH)}
    by_id = {"BTCUSDT": [market(BTC)]}
    assert unknown_symbols("x", [BTC, "BTCUSDT", "eth/usdt:usdt", "DOGE/JPY"], markets, by_id) == [
        "x does not list 'BTCUSDT'; close matches: BTC/USDT:USDT",
        "x does not list 'eth/usdt:usdt'; close matches: ETH/USDT:USDT",
        "x does not list 'DOGE/JPY'; no close match among its 2 markets",
    ]


def test_unknown_exchange_id_names_the_closest_ids_before_anything_runs():
    check_exchange_id("binanceusdm")
    with pytest.raises(UnknownExchangeError, match="unknown exchange 'binanceusdn'.*closest: binanceusdm"):
        check_exchange_id("binanceusdn")
    with pytest.raises(UnknownExchangeError, match="'bitflyer' only over REST"):
        check_exchange_id("bitflyer")  # ccxt has it, ccxt.pro (websockets) does not
    with pytest.raises(ValueError, match="binanceusdm"):  # the CLI turns this ValueError into a usage error
        CcxtSource({"binanceusdn": [BTC]}, factory_path="tests.integration.fake_venues:make")


def _source_with(outcomes, duration_s):
    src = CcxtSource({ex: [BTC] for ex in outcomes}, factory_path="tests.integration.fake_venues:make",
                     duration_s=duration_s)
    src.outcomes.update(outcomes)
    return src


def test_check_fails_a_duration_run_that_received_nothing_and_says_why():
    down = FeedOutcome(0, None, "ExchangeNotAvailable: x (load_markets, attempt 9)")
    with pytest.raises(FeedError) as exc:
        _source_with({"binanceusdm": down, "bybit": FeedOutcome(12)}, 20).check()
    assert str(exc.value) == ("no trades received from binanceusdm in 20 s: last error: "
                              "ExchangeNotAvailable: x (load_markets, attempt 9)")
    with pytest.raises(FeedError, match=r"^no trades received from okx in 2.5 s \(no error seen, but the venue sent none\)$"):
        _source_with({"okx": FeedOutcome()}, 2.5).check()
    _source_with({"okx": FeedOutcome(), "bybit": FeedOutcome(3)}, 20).check()  # quiet next to a working feed
    _source_with({"okx": FeedOutcome(0, None, "NetworkError: x")}, None).check()  # no duration: the 24/7 service
    with pytest.raises(FeedError, match="^okx does not list"):  # a fatal error fails any run
        _source_with({"okx": FeedOutcome(5, "okx does not list 'X'"), "bybit": FeedOutcome(3)}, None).check()


def _drain(parts, timeout_s=10):
    """Poll source partitions the way a bytewax worker does until each ends; their batches."""
    out, live, deadline = [], list(parts), time.time() + timeout_s
    while live:
        assert time.time() < deadline, "partitions did not end"
        for p in list(live):
            try:
                out += p.next_batch()
            except StopIteration:
                p.close()
                live.remove(p)
        time.sleep(0.005)
    return out


def test_source_turns_an_outage_into_a_feed_down_row_and_a_failed_duration_run():
    src = CcxtSource({"binanceusdm": [BTC]}, factory_path="tests.integration.fake_venues:unreachable",
                     duration_s=0.4)
    batches = _drain([src.build_part("ccxt", "binanceusdm", None)])
    events = [e for b in batches for e in b.events]
    assert [e.kind for e in events] == ["feed_down"]
    assert isinstance(events[0], Event) and (events[0].exchange, events[0].symbol) == ("binanceusdm", BTC)
    assert events[0].reason.startswith("ExchangeNotAvailable: binanceusdm GET ")
    assert sum(b.frame.height for b in batches) == 0
    with pytest.raises(FeedError, match=r"^no trades received from binanceusdm in 0.4 s: last error: "
                                        r"ExchangeNotAvailable: .* \(load_markets, attempt \d+\)$"):
        src.check()
    assert not [t for t in threading.enumerate() if t.name.startswith("ccxt-")]  # feed threads stopped


def test_a_fatal_feed_ends_every_partition_of_an_endless_run():
    src = CcxtSource({"binanceusdm": ["BTC/USDT"], "bybit": [ETH]},  # binanceusdm lists BTC/USDT:USDT only
                     factory_path="tests.integration.fake_venues:make")
    parts = [src.build_part("ccxt", ex, None) for ex in src.list_parts()]
    _drain(parts)  # no duration: only the fatal error can end it
    with pytest.raises(UnknownSymbolError) as exc:  # the type survives: the CLI can call it a usage error
        src.check()
    assert str(exc.value) == "binanceusdm does not list 'BTC/USDT'; close matches: BTC/USDT:USDT"
    assert src.outcomes["bybit"].fatal is None


# -- bad data, bugs, construction ---------------------------------------------------------------

def test_malformed_trades_become_events_and_the_stream_goes_on():
    btc = tape(BTC, 4)
    bad = dict(btc[1], price="n/a")
    stranger = ccxt_trade("DOGE/USDT:USDT", 99, T0)
    script = [[btc[0], bad, stranger, "garbage"], [btc[1], btc[2], btc[3]]]
    fake = FakeExchange("binanceusdm", {BTC: btc}, {"*": script})
    feed, batches, events, _ = run_feed(fake, [BTC])

    rejected = of_type(events, RejectedTrade)
    assert Counter(r.reason.split(":")[0] for r in rejected) == {"wrong_type": 1, "not_a_trade": 2}
    (wrong,) = [r for r in rejected if r.reason.startswith("wrong_type")]
    assert wrong.instrument == f"binanceusdm:{BTC}" and "n/a" in wrong.payload
    assert any(r.instrument == "binanceusdm:DOGE/USDT:USDT" for r in rejected)
    assert [t.id for t in delivered(batches)] == ["1", "2", "3", "4"]
    assert feed.stats.rejected == 3


def test_non_network_errors_propagate():
    fake = FakeExchange("bybit", {BTC: tape(BTC, 1)}, {"*": [ccxt.AuthenticationError("bad key")]})
    with pytest.raises(ccxt.AuthenticationError):
        run_feed(fake, [BTC])


def test_make_exchange_reads_credentials_from_env_only():
    env = {"TAPEFLOW_OKX_API_KEY": "k-123", "TAPEFLOW_OKX_SECRET": "s-456", "TAPEFLOW_OKX_PASSWORD": "p-789",
           "TAPEFLOW_BYBIT_API_KEY": "not-for-okx"}
    ex = make_exchange("okx", env)
    assert type(ex).__module__.startswith("ccxt.pro")
    assert (ex.apiKey, ex.secret, ex.password) == ("k-123", "s-456", "p-789")
    assert ex.enableRateLimit is True
    public = make_exchange("bybit", {})
    assert not public.apiKey and public.enableRateLimit is True
    assert "TAPEFLOW_HYPERLIQUID_PRIVATE_KEY" in credential_env_names("hyperliquid")
    with pytest.raises(ValueError, match="unknown exchange 'not_an_exchange'"):
        make_exchange("not_an_exchange", {})


# -- perp data: funding, open interest, liquidations (issue 13) ----------------------------------

def ccxt_funding(symbol, ts, rate, mark=100.5, index=100.0):
    """A ccxt funding-rate structure (fetch_funding_rate)."""
    return {"info": {}, "symbol": symbol, "markPrice": mark, "indexPrice": index, "timestamp": ts, "datetime": None,
            "fundingRate": rate, "fundingTimestamp": T0 + 8 * 3_600_000, "fundingDatetime": None,
            "nextFundingTimestamp": None}


def ccxt_oi(symbol, ts, amount, value=None):
    return {"info": {}, "symbol": symbol, "openInterestAmount": amount, "openInterestValue": value,
            "baseVolume": None, "quoteVolume": None, "timestamp": ts, "datetime": None}


def ccxt_liq(symbol, ts, side, price, contracts):
    """A ccxt liquidation structure (watch_liquidations)."""
    return {"info": {}, "symbol": symbol, "contracts": contracts, "contractSize": 1.0, "price": price, "side": side,
            "baseValue": None, "quoteValue": None, "timestamp": ts, "datetime": None}


def perps(events, kind=None):
    return [e for e in events if isinstance(e, PerpUpdate) and (kind is None or e.kind == kind)]


def test_funding_open_interest_and_liquidations_come_out_as_perp_updates():
    btc, eth = tape(BTC, 20), tape(ETH, 10)
    fake = FakeExchange(
        "binanceusdm", {BTC: btc, ETH: eth}, {"*": [btc[0:10] + eth[0:5], btc[10:20] + eth[5:10]]},
        funding={BTC: [ccxt_funding(BTC, T0 + 500, 0.0001), ccxt_funding(BTC, T0 + 1500, -0.0002, mark=101.0)],
                 ETH: [ccxt_funding(ETH, T0 + 700, 0.0003, mark=None, index=None)]},
        open_interest={BTC: [ccxt_oi(BTC, T0 + 800, 5_000.0, 500_000.0)], ETH: [ccxt_oi(ETH, T0 + 900, 12.5)]},
        liquidations={"*": [[ccxt_liq(BTC, T0 + 1200, "sell", 99.0, 2.0), ccxt_liq(ETH, T0 + 1300, "buy", 101.0, 0.5)],
                            [ccxt_liq(BTC, T0 + 1900, "buy", 102.0, 1.0)]]})
    fake.markets[ETH] = market(ETH, contract_size=0.1)  # contracts of 0.1 ETH
    feed, batches, events, sleeps = run_feed(
        fake, [BTC, ETH], perp=PerpPolling(funding_every_s=60, open_interest_every_s=300))

    assert_exactly_once(delivered(batches, BTC), btc)  # the trades as ever
    assert_exactly_once(delivered(batches, ETH), eth)
    fund = {(u.symbol, u.ts): u for u in perps(events, "funding")}
    assert fund[(BTC, T0 + 500)] == PerpUpdate(
        kind="funding", exchange="binanceusdm", symbol=BTC, ts=T0 + 500, rate=0.0001,
        funding_time=T0 + 8 * 3_600_000, mark_price=100.5, index_price=100.0, source="ccxt:binanceusdm")
    assert (fund[(BTC, T0 + 1500)].rate, fund[(BTC, T0 + 1500)].mark_price) == (-0.0002, 101.0)
    assert (fund[(ETH, T0 + 700)].rate, fund[(ETH, T0 + 700)].mark_price) == (0.0003, None)
    oi = {u.symbol: u for u in perps(events, "open_interest")}
    assert (oi[BTC].ts, oi[BTC].open_interest, oi[BTC].oi_value) == (T0 + 800, 5_000.0, 500_000.0)
    assert oi[ETH].open_interest == pytest.approx(1.25)  # 12.5 contracts of 0.1 ETH
    liq = sorted(perps(events, "liquidation"), key=lambda u: u.ts)
    assert [(u.symbol, u.side, u.price, u.amount) for u in liq] == [
        (BTC, "sell", 99.0, 2.0), (ETH, "buy", 101.0, pytest.approx(0.05)), (BTC, "buy", 102.0, 1.0)]
    assert all(u.seq is None and u.exchange == "binanceusdm" for u in perps(events))
    assert feed.stats.perp_updates == 8 and feed.stats.perp_failures == 0
    # polled once per symbol and interval: the funding loops wait 60 s, open interest 300 s
    assert sleeps.count(60) >= 2 and sleeps.count(300) >= 2
    assert {c[1] for c in fake.calls if c[0] == "fetch_funding_rate"} == {BTC, ETH}
    assert [c[1] for c in fake.calls if c[0] == "watch_liquidations_for_symbols"][0] == (BTC, ETH)
    assert feed.perp_plan == {"funding": [BTC, ETH], "open_interest": [BTC, ETH], "liquidations": [BTC, ETH]}
    assert not [e for e in events if not isinstance(e, PerpUpdate)]  # nothing failed, nothing refused


def test_unusable_perp_data_is_refused_not_dropped_and_per_symbol_liquidation_watches():
    btc = tape(BTC, 6, uuids=True)
    fake = FakeExchange(
        "bybit", {BTC: btc}, {"*": [btc[0:3], btc[3:6]]},
        funding={BTC: [ccxt_funding(BTC, T0, None), ccxt_funding(BTC, T0 + 1, 0.0001)]},
        liquidations={BTC: [[ccxt_liq(BTC, T0 + 5, "Buy", 100.0, 3.0), ccxt_liq(BTC, T0 + 6, "up", 100.0, 1.0),
                             ccxt_liq("DOGE/USDT:USDT", T0 + 7, "sell", 0.1, 10.0), "junk"]]})
    feed, batches, events, _ = run_feed(fake, [BTC], perp=PerpPolling(open_interest_every_s=0))

    assert_exactly_once(delivered(batches), btc)
    assert [c for c in fake.calls if c[0] == "watch_liquidations"] == [("watch_liquidations", BTC)] * 2
    assert not [c for c in fake.calls if c[0] == "fetch_open_interest"]  # switched off
    (liq,) = perps(events, "liquidation")
    assert (liq.side, liq.amount) == ("sell", 3.0)  # bybit's "Buy" is a long liquidated: a sell order
    assert [u.rate for u in perps(events, "funding")] == [0.0001]
    rejected = of_type(events, RejectedTrade)
    assert sorted(r.reason.split(":")[0] for r in rejected) == ["missing_field", "not_subscribed", "unknown_side",
                                                               "wrong_type"]
    by_code = {r.reason.split(":")[0]: r for r in rejected}
    assert by_code["missing_field"].reason == "missing_field: funding: fundingRate"
    missing = by_code["missing_field"]
    assert missing.instrument == f"bybit:{BTC}" and '"fundingRate": null' in missing.payload
    assert by_code["not_subscribed"].instrument == "bybit:DOGE/USDT:USDT"
    assert feed.stats.rejected == 4


def test_a_venue_without_perp_data_streams_trades_and_says_once_what_it_lacks(caplog):
    btc, spot = tape(BTC, 10), tape("BTC/USDT", 4, first=100)
    fake = FakeExchange("kucoinfutures", {BTC: btc}, {"*": [btc[0:5], btc[5:10]]})
    caplog.set_level(logging.WARNING, logger="dataflows.venue_feed")
    feed, batches, events, sleeps = run_feed(fake, [BTC])

    assert [t.id for t in delivered(batches)] == [str(i) for i in range(1, 11)]
    assert events == [] and sleeps == [] and feed.perp_plan == {}
    assert [c[0] for c in fake.calls if "watch" not in c[0]] == ["load_markets"]
    assert feed_log(caplog) == ["kucoinfutures offers no funding rates (fetchFundingRate) and no open interest "
                                "(fetchOpenInterest) and no liquidations (watchLiquidations): they are not read from "
                                "it (trades are)"]
    # a spot market has no perp data: nothing to lack, nothing said
    caplog.clear()
    spot_fake = FakeExchange("binance", {"BTC/USDT": spot}, {"*": [spot]}, funding={"BTC/USDT": [{}]})
    spot_fake.markets["BTC/USDT"] = {**market(BTC), "symbol": "BTC/USDT", "type": "spot", "spot": True,
                                     "swap": False, "contract": False}
    spot_fake.scripts.pop(("funding", "BTC/USDT"))  # never asked
    feed, batches, events, _ = run_feed(spot_fake, ["BTC/USDT"])
    assert len(delivered(batches)) == 4 and feed.perp_plan == {} and feed_log(caplog) == []
    assert not [c for c in spot_fake.calls if c[0] == "fetch_funding_rate"]


def test_failing_perp_calls_are_outages_of_their_own_and_never_stop_the_trades(caplog):
    btc = tape(BTC, 30)
    err = ccxt.NetworkError
    fake = FakeExchange(
        "binanceusdm", {BTC: btc}, {"*": [btc[0:10], btc[10:20], btc[20:30]]},
        funding={BTC: [err("funding timeout"), err("funding timeout"), ccxt_funding(BTC, T0 + 100, 0.0001)]},
        open_interest={BTC: [ccxt.NotSupported("binanceusdm fetchOpenInterest() is not supported yet")]},
        liquidations={"*": [ccxt.ExchangeError("liquidation stream refused"), KeyError("o"),
                            [ccxt_liq(BTC, T0 + 200, "sell", 100.0, 1.0)]]})
    caplog.set_level(logging.WARNING, logger="dataflows.venue_feed")
    feed, batches, events, sleeps = run_feed(
        fake, [BTC], perp=PerpPolling(funding_every_s=60, open_interest_every_s=300),
        backoff_factory=lambda i: Backoff(base=1.0, cap=4.0, rng=MaxRng()))

    assert [t.id for t in delivered(batches)] == [str(i) for i in range(1, 31)]
    outages = [(type(e).__name__, e.stage) for e in events if isinstance(e, (FeedDown, FeedUp))]
    assert sorted(outages) == sorted([("FeedDown", "funding"), ("FeedUp", "funding"), ("FeedDown", "open_interest"),
                                      ("FeedDown", "liquidations"), ("FeedUp", "liquidations")])
    ups = {e.stage: e for e in of_type(events, FeedUp)}
    assert (ups["funding"].attempts, ups["funding"].error) == (2, "NetworkError: funding timeout")
    assert (ups["liquidations"].attempts, ups["liquidations"].error) == (2, "KeyError: 'o'")  # a ccxt parse error too
    (oi_down,) = [e for e in of_type(events, FeedDown) if e.stage == "open_interest"]
    assert oi_down.error.startswith("NotSupported: binanceusdm fetchOpenInterest()")
    assert len([c for c in fake.calls if c[0] == "fetch_open_interest"]) == 1  # not asked again
    assert sorted(u.kind for u in perps(events)) == ["funding", "liquidation"]
    assert feed.stats.perp_failures == 5 and feed.stats.disconnects == 0
    # the trades never failed: a duration run is judged on them alone (CcxtSource.check)
    assert feed.last_error is None and feed.last_perp_error is not None
    assert sorted(d for d in sleeps if d not in (60, 300)) == [1.0, 1.0, 2.0, 2.0]  # each loop its own backoff
    assert any("open_interest not supported" in m for m in feed_log(caplog))
    assert any("unreachable (NetworkError: funding timeout)" in m for m in feed_log(caplog))


def test_source_places_each_perp_update_after_the_trades_received_before_it():
    from operators.records import Trade

    src = CcxtSource({"binanceusdm": [BTC]}, factory_path="tests.integration.fake_venues:unreachable",
                     perp=PerpPolling())
    part = src.build_part("ccxt", "binanceusdm", 7)  # resumed: the next trade gets offset 7
    assert part.feed.close()  # a quiet feed: this test writes the queue itself
    while not part.q.empty():
        part.q.get_nowait()

    def trade(i):
        return Trade("binanceusdm", BTC, str(i), T0 + i, 100.0, 1.0, "buy", 100.0, None, NOW)

    def update(kind, ts, **kw):
        return PerpUpdate(kind=kind, exchange="binanceusdm", symbol=BTC, ts=ts, **kw)

    a, b = update("funding", T0 + 2, rate=1e-4), update("open_interest", T0 + 3, open_interest=5.0)
    c = update("liquidation", T0 + 4, side="sell", price=100.0, amount=1.0)
    for item in [("trades", [trade(1), trade(2), trade(3)]), ("event", a), ("event", b), ("trades", [trade(4)]),
                 ("event", c)]:
        part.q.put(item)
    (batch,) = part.next_batch()
    assert batch.frame["offset"].to_list() == [7, 8, 9, 10]
    assert [(u.kind, u.seq) for u in batch.events] == [("funding", 10), ("open_interest", 10), ("liquidation", 11)]
    part.q.put(("event", a))  # nothing but perp data: a batch without trades, placed after all of them
    (batch,) = part.next_batch()
    assert batch.frame.height == 0 and [(u.kind, u.seq) for u in batch.events] == [("funding", 11)]
    part.close()


def test_source_delivers_a_scripted_venues_perp_data_in_its_batches():
    from tests.integration.fake_venues import PERP_FUNDING, PERP_LIQ, PERP_OI, PERP_TAPE

    src = CcxtSource({"binanceusdm": [BTC]}, factory_path="tests.integration.fake_venues:perp", duration_s=1.5)
    assert src.perp_polling() == PerpPolling(funding_every_s=0.04, open_interest_every_s=0.12)  # the factory's
    batches = _drain([src.build_part("ccxt", "binanceusdm", None)])
    assert sum(b.frame.height for b in batches) == len(PERP_TAPE)
    ups, seqs = [], []
    for b in batches:
        first = b.frame["offset"][0] if b.frame.height else None
        for e in b.events:
            if isinstance(e, PerpUpdate):
                ups.append(e)
                seqs.append(e.seq)
                # after the trades received before it: within its batch's offsets (or right after them)
                assert first is None or first <= e.seq <= first + b.frame.height
    assert seqs == sorted(seqs) and 0 <= seqs[0] and seqs[-1] <= len(PERP_TAPE)
    assert [u.rate for u in ups if u.kind == "funding"] == PERP_FUNDING
    assert [u.open_interest for u in ups if u.kind == "open_interest"] == PERP_OI
    assert [(u.side, u.amount) for u in ups if u.kind == "liquidation"] == PERP_LIQ
    dead = [e for b in batches for e in b.events if not isinstance(e, (PerpUpdate, Event))]
    assert [(d.reason, d.detail) for d in dead] == [("missing_field", "missing_field: funding: fundingRate")]
    src.check()
