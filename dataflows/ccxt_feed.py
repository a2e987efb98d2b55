"""Live trades from one exchange over ccxt.pro, with reconnects, gap detection and REST backfill.

``CcxtFeed`` runs an asyncio loop over an injected ccxt.pro-like exchange object:

1. stream: ``watch_trades_for_symbols(symbols)`` when the exchange has it, else one
   ``watch_trades(symbol)`` task per symbol;
2. each batch is normalised (``operators.ingest.normalise``) and de-duplicated against the
   instrument's recent ids;
3. on a network error (``load_markets`` or the stream) the feed waits (``Backoff``: exponential,
   full jitter, reset after the next success) and tries again, which makes ccxt reconnect. An
   outage is a ``FeedDown`` event once, when it starts, and a ``FeedUp`` when it ends; while it
   lasts, a WARNING status line appears whenever the backoff grows, then once a minute
   (``OutageTracker``), so a venue that stays down is visible without flooding the log;
   ``last_error`` keeps the latest failure for the caller's final word;
4. a symbol the venue does not list (checked as soon as markets are loaded) is
   ``UnknownSymbolError``: a user mistake ends the feed instead of retrying forever;
5. backfill over REST ``fetch_trades``:
   - venues with sequential ids (``SEQUENTIAL_IDS``): a hole in the ids -- inside a stream or
     across a reconnect -- is a ``Gap``; it is reported (``GapEvent``), and exactly the missing
     ids are fetched and delivered before the trade that revealed the hole;
   - other venues: after a reconnect, once the stream delivers again, the trades from the last
     one seen up to the first new one are fetched (``since`` = last seen ts, paging forward) and
     delivered before the new batch;
   - whatever cannot be recovered (REST history does not reach back, fetch keeps failing, no
     public history at all) becomes a ``DataGapEvent`` naming the instrument and time span.

Perpetual-futures data (issue 13, ``PerpPolling``), for the symbols that are contract markets:

6. funding rates are polled with ``fetch_funding_rate`` (every ``funding_every_s``, swaps only) and
   open interest with ``fetch_open_interest`` (every ``open_interest_every_s``); public
   liquidations are watched with ``watch_liquidations_for_symbols`` (else one
   ``watch_liquidations`` per symbol). Each is normalised by ``operators.perp_ingest`` into a
   ``PerpUpdate`` (a refused one is a ``RejectedTrade``, a dead letter). What the venue does not
   ``has`` is skipped, with one WARNING line at start naming it;
7. a perp call never stops the trades: each poll or watch loop has its own ``OutageTracker`` and
   ``Backoff`` (stages ``funding``, ``open_interest``, ``liquidations``), so a failure is a
   ``FeedDown`` / ``FeedUp`` pair like a trade stream's, whatever the error (ccxt's own parsing
   included); ``NotSupported`` ends that loop with one WARNING line and a ``FeedDown``.

Output goes through two callbacks (plain functions or coroutines): ``on_trades(list[Trade])``
with the trades of one instrument in (ts, id) order, and ``on_event(event)`` for ``GapEvent``,
``DataGapEvent``, ``RejectedTrade``, ``FeedDown``, ``FeedUp`` and ``PerpUpdate`` (``seq`` unset:
the receiver places it among the trades it got so far). Both are called from the one asyncio loop,
so a receiver sees trades and perp updates in the order they were received. Sleep, clock and
backoff are injectable, so tests drive the whole loop with a scripted fake exchange and no waiting.

Rate limits are ccxt's job (``enableRateLimit``). API keys come only from the environment
(``TAPEFLOW_<EXCHANGE>_API_KEY`` etc., see ``credential_env_names``) and are never logged.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

import ccxt

from operators.ingest import (
    FETCH_FROM_ID_PARAM,
    FETCH_LIMIT,
    PUBLIC_TRADE_HISTORY,
    SEQUENTIAL_IDS,
    WATCH_PARAMS,
    Backoff,
    DataGapEvent,
    Gap,
    GapEvent,
    IdGapTracker,
    OutageTracker,
    RecentIds,
    RejectedTrade,
    error_line,
    id_span,
    instrument_key,
    merge_backfill,
    normalise,
    trade_order_key,
)
from operators.perp_ingest import NORMALISERS
from operators.trades import Trade

log = logging.getLogger(__name__)

#: Errors after which reconnecting (or retrying a REST call) can help.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    ccxt.NetworkError, ConnectionError, asyncio.TimeoutError, TimeoutError,
)

#: Environment variable suffix -> ccxt credential attribute.
_CREDENTIALS: Mapping[str, str] = MappingProxyType({
    "API_KEY": "apiKey",
    "SECRET": "secret",
    "PASSWORD": "password",  # okx, kucoinfutures passphrase
    "UID": "uid",
    "WALLET_ADDRESS": "walletAddress",  # hyperliquid
    "PRIVATE_KEY": "privateKey",  # hyperliquid
})


class FeedError(RuntimeError):
    """A live feed cannot do its job and retrying will not help (a user mistake such as an
    unknown symbol, a feed that failed for good, or a ``--duration`` run that received nothing).
    The message is meant for the user as is: one line per problem, naming what to fix."""


class UnknownSymbolError(FeedError):
    """A requested symbol is not among the venue's markets."""


class UnknownExchangeError(FeedError, ValueError):
    """The exchange id is not a ccxt.pro exchange (a ValueError too: it is a bad argument)."""


def check_exchange_id(exchange_id: str) -> None:
    """Raise ``UnknownExchangeError`` naming the closest valid ids unless ``exchange_id`` is a
    ccxt.pro exchange (the live feed needs websockets; a REST-only ccxt id is named as such)."""
    import ccxt.pro as ccxtpro

    pro = list(ccxtpro.exchanges)
    if exchange_id in pro:
        return
    close = difflib.get_close_matches(exchange_id.lower(), pro, n=3, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else "e.g. binanceusdm, bybit, okx, kucoinfutures, hyperliquid"
    if exchange_id in ccxt.exchanges:
        raise UnknownExchangeError(f"ccxt has {exchange_id!r} only over REST; live feeds need a ccxt.pro "
                                   f"(websocket) exchange ({hint})")
    raise UnknownExchangeError(f"unknown exchange {exchange_id!r} (not a ccxt.pro or ccxt id); {hint}")


def unknown_symbols(exchange_id: str, symbols: Sequence[str], markets: Mapping[str, Any],
                    markets_by_id: Optional[Mapping[str, Any]] = None) -> list[str]:
    """One line per symbol the venue does not list, with close matches from its markets (a venue
    id such as ``BTCUSDT`` is matched to its unified symbol, case is ignored)."""
    upper = {str(m).upper(): str(m) for m in markets}
    problems = []
    for sym in symbols:
        if sym in markets:
            continue
        hints: list[str] = []
        for m in (markets_by_id or {}).get(sym) or []:
            if isinstance(m, dict) and m.get("symbol") in markets:
                hints.append(m["symbol"])
        if sym.upper() in upper:  # only the case differs: that is the one
            hints.append(upper[sym.upper()])
        else:
            hints += [upper[u] for u in difflib.get_close_matches(sym.upper(), upper, n=3, cutoff=0.6)]
        hints = list(dict.fromkeys(hints))[:3]
        why = f"close matches: {', '.join(hints)}" if hints else f"no close match among its {len(markets)} markets"
        problems.append(f"{exchange_id} does not list {sym!r}; {why}")
    return problems


def credential_env_names(exchange_id: str) -> dict[str, str]:
    """``{"TAPEFLOW_OKX_API_KEY": "apiKey", ...}``: the variables ``make_exchange`` reads."""
    prefix = f"TAPEFLOW_{exchange_id.upper()}_"
    return {prefix + suffix: attr for suffix, attr in _CREDENTIALS.items()}


def make_exchange(exchange_id: str, env: Optional[Mapping[str, str]] = None, options: Optional[dict] = None):
    """A ccxt.pro exchange with ccxt's rate limiter on and credentials from ``env`` (default:
    ``os.environ``). Public trade streams need no keys; none are required. The caller closes it
    (``await exchange.close()``)."""
    import ccxt.pro as ccxtpro

    check_exchange_id(exchange_id)
    cls = getattr(ccxtpro, exchange_id)
    env = os.environ if env is None else env
    config: dict[str, Any] = {"enableRateLimit": True, "newUpdates": True}
    if options:
        config["options"] = dict(options)
    for name, attr in credential_env_names(exchange_id).items():
        value = env.get(name)
        if value:
            config[attr] = value
    return cls(config)


@dataclass
class FeedStats:
    trades: int = 0  # delivered through on_trades (stream + backfill)
    backfilled: int = 0  # of which came from REST
    duplicates: int = 0  # dropped because the id was delivered already
    rejected: int = 0
    disconnects: int = 0
    gaps_detected: int = 0
    gaps_filled: int = 0
    data_gaps: int = 0
    rest_calls: int = 0
    perp_updates: int = 0  # PerpUpdates delivered through on_event
    perp_failures: int = 0  # failed perp calls (retried)


@dataclass(frozen=True)
class PerpPolling:
    """What perp data a feed reads (``Settings.ccxt_*``): funding and open-interest poll intervals
    in seconds (0: off) and whether to watch liquidations."""

    funding_every_s: float = 60.0
    open_interest_every_s: float = 300.0
    liquidations: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> "PerpPolling":
        return cls(settings.ccxt_funding_every_s, settings.ccxt_open_interest_every_s, settings.ccxt_liquidations)


#: perp stage -> (the ``has`` key(s) it needs, what it is called in the start-up line)
PERP_STAGES: Mapping[str, tuple[tuple[str, ...], str]] = MappingProxyType({
    "funding": (("fetchFundingRate",), "funding rates (fetchFundingRate)"),
    "open_interest": (("fetchOpenInterest",), "open interest (fetchOpenInterest)"),
    "liquidations": (("watchLiquidationsForSymbols", "watchLiquidations"), "liquidations (watchLiquidations)"),
})


@dataclass
class _Instrument:
    key: str
    recent: RecentIds
    last_ts: Optional[int] = None
    last_id: Optional[str] = None
    reconnected: bool = False  # the stream broke since this instrument's last trade


@dataclass
class _Page:
    trades: list  # normalised, (ts, id) order
    raw_count: int
    error: Optional[str] = None  # set when the fetch failed for good


_STOPPED = object()
IdSpan = tuple[int, int]  # (first id, last id) a trade message covers


async def _call(cb: Callable, arg: Any) -> None:
    result = cb(arg)
    if inspect.isawaitable(result):
        await result


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _symbol_of(item: Any, symbols: list[str]) -> Optional[str]:
    """The symbol a ccxt structure names (a watch of one symbol may leave it out)."""
    sym = item.get("symbol") if isinstance(item, dict) else None
    sym = sym if isinstance(sym, str) else None
    return symbols[0] if sym is None and len(symbols) == 1 else sym


def _is_contract(market: Any) -> bool:
    return isinstance(market, dict) and bool(market.get("contract") or market.get("swap") or market.get("future"))


class CcxtFeed:
    """Streams trades of ``symbols`` from ``exchange`` until ``run``'s stop event is set.

    ``exchange`` needs ``id``, ``has``, ``markets``, ``load_markets()``, ``watch_trades`` or
    ``watch_trades_for_symbols``, and ``fetch_trades`` -- a ccxt.pro exchange or a test double.
    ``backoff_factory(i)`` makes the backoff of stream loop ``i`` (``load_markets`` uses -2, the
    REST retries -1, perp loops 1000 and up). ``status_every_s``: how often a capped retry loop
    repeats its status line. ``perp``: which perp data to read (default ``PerpPolling()``; the
    exchange then also needs ``fetch_funding_rate`` / ``fetch_open_interest`` /
    ``watch_liquidations[_for_symbols]`` where its ``has`` says so).
    """

    def __init__(
        self,
        exchange: Any,
        symbols: Sequence[str],
        on_trades: Callable[[list[Trade]], Any],
        on_event: Callable[[Any], Any],
        *,
        exchange_id: Optional[str] = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], int] = _now_ms,
        backoff_factory: Callable[[int], Backoff] = lambda i: Backoff(base=0.5, cap=30.0, seed=i),
        fetch_limit: Optional[int] = None,
        fetch_retries: int = 3,
        max_backfill_pages: int = 20,
        recent_ids: int = 100_000,
        status_every_s: float = 60.0,
        perp: Optional[PerpPolling] = None,
    ):
        if not symbols:
            raise ValueError("CcxtFeed needs at least one symbol")
        self.exchange = exchange
        self.exchange_id = exchange_id or exchange.id
        self.symbols = list(dict.fromkeys(symbols))
        self.on_trades, self.on_event = on_trades, on_event
        self._sleep, self._clock = sleep, clock
        self._backoff_factory = backoff_factory
        self.fetch_limit = fetch_limit or FETCH_LIMIT.get(self.exchange_id, 1000)
        self.fetch_retries = max(1, fetch_retries)
        self.max_backfill_pages = max_backfill_pages
        self.sequential = SEQUENTIAL_IDS.get(self.exchange_id, False)
        self.has_history = PUBLIC_TRADE_HISTORY.get(self.exchange_id, True)
        self.watch_params = dict(WATCH_PARAMS.get(self.exchange_id, {}))
        self.from_id_param = FETCH_FROM_ID_PARAM.get(self.exchange_id)
        self.stats = FeedStats()
        self.gaps = IdGapTracker()
        self._inst = {s: _Instrument(instrument_key(self.exchange_id, s), RecentIds(recent_ids))
                      for s in self.symbols}
        self._rest_backoff = backoff_factory(-1)
        self.backoffs: list[Backoff] = []  # one per stream loop, once running
        self._status_every_ms = int(status_every_s * 1000)
        self.outages: list[OutageTracker] = []  # load_markets, then one per stream loop
        self.last_error: Optional[str] = None  # the latest failure, with stage and attempt
        self.last_perp_error: Optional[str] = None  # the same for the perp loops
        self.perp = perp if perp is not None else PerpPolling()
        self.perp_plan: dict[str, list[str]] = {}  # perp stage -> symbols it reads (once markets are loaded)

    # -- top level -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set. Network errors reconnect; an unknown symbol raises
        ``UnknownSymbolError`` once markets are loaded; other errors propagate."""
        if not await self._load_markets(stop):
            return
        if self.exchange.has.get("watchTradesForSymbols"):
            groups = [self.symbols]
        else:
            groups = [[s] for s in self.symbols]
        self.backoffs = [self._backoff_factory(i) for i in range(len(groups))]
        tasks = [asyncio.ensure_future(self._stream(g, b, self._tracker(g, "stream"), stop))
                 for g, b in zip(groups, self.backoffs)]
        tasks += [asyncio.ensure_future(c) for c in self._perp_loops(stop)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _tracker(self, symbols: list[str], stage: str) -> OutageTracker:
        t = OutageTracker(self.exchange_id, tuple(symbols), stage, self._status_every_ms)
        self.outages.append(t)
        return t

    async def _load_markets(self, stop: asyncio.Event) -> bool:
        backoff, outage = self._backoff_factory(-2), self._tracker(self.symbols, "load_markets")
        while not stop.is_set():
            try:
                markets = await self._until_stopped(self.exchange.load_markets(), stop)
            except RETRYABLE_ERRORS as err:
                await self._failed(outage, backoff, err, stop)
                continue
            if markets is _STOPPED:
                return False
            await self._recovered(outage)
            if not isinstance(markets, dict) or not markets:
                markets = getattr(self.exchange, "markets", None) or {}
            problems = unknown_symbols(self.exchange_id, self.symbols, markets,
                                       getattr(self.exchange, "markets_by_id", None))
            if problems:
                raise UnknownSymbolError("\n".join(problems))
            return True
        return False

    async def _stream(self, symbols: list[str], backoff: Backoff, outage: OutageTracker,
                      stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                batch = await self._until_stopped(self._watch(symbols), stop)
            except RETRYABLE_ERRORS as err:
                self.stats.disconnects += 1
                for s in symbols:
                    self._inst[s].reconnected = True
                await self._failed(outage, backoff, err, stop)
                continue
            if batch is _STOPPED:
                return
            backoff.reset()
            await self._recovered(outage)
            await self._handle_batch(symbols, batch or [])

    def _watch(self, symbols: list[str]) -> Awaitable[list]:
        if len(symbols) > 1 or self.exchange.has.get("watchTradesForSymbols"):
            return self.exchange.watch_trades_for_symbols(symbols, None, None, dict(self.watch_params))
        return self.exchange.watch_trades(symbols[0], None, None, dict(self.watch_params))

    async def _failed(self, outage: OutageTracker, backoff: Backoff, err: BaseException,
                      stop: asyncio.Event) -> None:
        """One failed attempt: ``FeedDown`` if it opens an outage, a status line if the backoff
        grew (or a minute passed), then wait before the next attempt."""
        error, now = error_line(err), self._clock()
        down = outage.failed(error, now)
        if down is not None:
            await _call(self.on_event, down)
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        if outage.stage in PERP_STAGES:  # not a trade failure: ``CcxtSource.check`` judges trades
            self.last_perp_error = f"{error} ({outage.stage}, attempt {outage.attempts})"
        else:
            self.last_error = f"{error} ({outage.stage}, attempt {outage.attempts})"
        if outage.should_log(ceiling, now):
            log.warning("%s %s: unreachable (%s), retry %d in %.3g s (%s down for %.0f s)", self.exchange_id,
                        ",".join(outage.symbols), error, outage.attempts, delay, outage.stage,
                        (now - (outage.since_ms or now)) / 1000)
        await self._until_stopped(self._sleep(delay), stop)

    async def _recovered(self, outage: OutageTracker) -> None:
        up = outage.succeeded(self._clock())
        if up is not None:
            log.warning("%s %s: %s back after %d failed attempt(s) over %.1f s", self.exchange_id,
                        ",".join(up.symbols), up.stage, up.attempts, up.down_ms / 1000)
            await _call(self.on_event, up)

    @staticmethod
    async def _until_stopped(aw: Awaitable, stop: asyncio.Event) -> Any:
        """Await ``aw`` unless ``stop`` is set first (then cancel it and return ``_STOPPED``)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return _STOPPED

    # -- perp data (funding, open interest, liquidations) ----------------------------------------

    def plan_perp(self) -> dict[str, list[str]]:
        """Perp stage -> the symbols it reads here: contract markets (funding: perpetual swaps) of
        the stages the settings enable and the venue ``has``. Logs one WARNING line naming what the
        venue lacks (nothing when it lacks nothing, or no symbol is a contract)."""
        markets = getattr(self.exchange, "markets", None) or {}
        has = self.exchange.has
        contracts = [s for s in self.symbols if _is_contract(markets.get(s))]
        wanted = {"funding": [s for s in contracts if (markets.get(s) or {}).get("swap", True)]
                  if self.perp.funding_every_s > 0 else [],
                  "open_interest": contracts if self.perp.open_interest_every_s > 0 else [],
                  "liquidations": contracts if self.perp.liquidations else []}
        plan, lacks = {}, []
        for stage, symbols in wanted.items():
            if not symbols:
                continue
            keys, name = PERP_STAGES[stage]
            if any(has.get(k) for k in keys):
                plan[stage] = symbols
            else:
                lacks.append(name)
        if lacks:
            log.warning("%s offers no %s: %s not read from it (trades are)", self.exchange_id,
                        " and no ".join(lacks), "they are" if len(lacks) > 1 else "it is")
        self.perp_plan = plan
        return plan

    def _perp_loops(self, stop: asyncio.Event) -> list[Awaitable[None]]:
        plan = self.plan_perp()
        loops: list[Awaitable[None]] = []
        n = 1000
        for stage, every in (("funding", self.perp.funding_every_s),
                             ("open_interest", self.perp.open_interest_every_s)):
            for sym in plan.get(stage, []):
                loops.append(self._poll(stage, sym, every, self._backoff_factory(n), stop))
                n += 1
        liq = plan.get("liquidations", [])
        if liq:
            groups = [liq] if self.exchange.has.get("watchLiquidationsForSymbols") else [[s] for s in liq]
            for g in groups:
                loops.append(self._watch_liquidations(g, self._backoff_factory(n), stop))
                n += 1
        return loops

    def _poll(self, stage: str, symbol: str, every_s: float, backoff: Backoff, stop: asyncio.Event) -> Awaitable[None]:
        """Poll one symbol's funding rate or open interest every ``every_s`` until stopped."""
        fetch = self.exchange.fetch_funding_rate if stage == "funding" else self.exchange.fetch_open_interest
        return self._perp_loop(stage, [symbol], lambda: fetch(symbol), lambda raw: [raw], every_s, backoff, stop)

    def _watch_liquidations(self, symbols: list[str], backoff: Backoff, stop: asyncio.Event) -> Awaitable[None]:
        if self.exchange.has.get("watchLiquidationsForSymbols"):
            call = lambda: self.exchange.watch_liquidations_for_symbols(symbols)  # noqa: E731
        else:
            call = lambda: self.exchange.watch_liquidations(symbols[0])  # noqa: E731
        return self._perp_loop("liquidations", symbols, call, lambda batch: list(batch or []), 0.0, backoff, stop)

    async def _perp_loop(self, stage: str, symbols: list[str], call: Callable[[], Awaitable], items: Callable,
                         every_s: float, backoff: Backoff, stop: asyncio.Event) -> None:
        """``call()`` until stopped (sleeping ``every_s`` after each answer), delivering ``items(answer)``;
        failures are retried with ``backoff`` and reported like a trade stream's; trades go on."""
        outage = self._tracker(symbols, stage)
        while not stop.is_set():
            try:
                got = await self._until_stopped(call(), stop)
            except ccxt.NotSupported as err:
                await self._perp_unsupported(outage, err)
                return
            except Exception as err:  # noqa: BLE001 - network, refusal or a ccxt parse error: retried
                self.stats.perp_failures += 1
                await self._failed(outage, backoff, err, stop)
                continue
            if got is _STOPPED:
                return
            backoff.reset()
            await self._recovered(outage)
            await self._deliver_perp(stage, symbols, items(got))
            if every_s:
                await self._until_stopped(self._sleep(every_s), stop)

    async def _perp_unsupported(self, outage: OutageTracker, err: BaseException) -> None:
        """The venue refuses this perp call for good: one FeedDown and one line; trades go on."""
        self.stats.perp_failures += 1
        error = error_line(err)
        down = outage.failed(error, self._clock())
        self.last_perp_error = f"{error} ({outage.stage}, attempt {outage.attempts})"
        log.warning("%s %s: %s not supported (%s); not read from this venue", self.exchange_id,
                    ",".join(outage.symbols), outage.stage, error)
        if down is not None:
            await _call(self.on_event, down)

    async def _deliver_perp(self, stage: str, symbols: list[str], raw: list) -> None:
        """Normalise ``raw`` structures of ``symbols`` into PerpUpdates (``on_event``); refused ones
        become ``RejectedTrade`` records."""
        recv_ts = self._clock()
        kind = "liquidation" if stage == "liquidations" else stage
        normalise_perp = NORMALISERS[kind]
        markets = getattr(self.exchange, "markets", None) or {}
        for item in raw:
            sym = _symbol_of(item, symbols)
            if sym not in symbols:
                await self._reject(instrument_key(self.exchange_id, str(sym)),
                                   f"not_subscribed: {kind}: symbol {sym!r} is not read here", item)
                continue
            u = normalise_perp(self.exchange_id, item, markets.get(sym), recv_ts)
            if isinstance(u, str):
                await self._reject(self._inst[sym].key, u, item)
                continue
            self.stats.perp_updates += 1
            await _call(self.on_event, u)

    # -- one streamed batch --------------------------------------------------------------------

    async def _handle_batch(self, symbols: list[str], batch: list) -> None:
        recv_ts = self._clock()
        by_symbol: dict[str, list] = {s: [] for s in symbols}
        for ct in batch:
            sym = _symbol_of(ct, symbols)
            if sym not in by_symbol:
                await self._reject(instrument_key(self.exchange_id, str(sym)),
                                   f"not_a_trade: symbol {sym!r} is not subscribed here", ct)
                continue
            by_symbol[sym].append(ct)
        for sym in symbols:
            await self._handle_instrument(sym, by_symbol[sym], recv_ts)

    async def _handle_instrument(self, symbol: str, raw: list, recv_ts: int) -> None:
        inst = self._inst[symbol]
        items = await self._normalise_all(symbol, raw, recv_ts)
        out: list[Trade] = []
        if inst.reconnected:
            inst.reconnected = False
            if not self.sequential:  # sequential ids show any hole by themselves
                first_new = next((t for t, _ in items if t.id not in inst.recent), None)
                out += await self._backfill_since(symbol, inst, first_new)
        for trade, span in items:
            if trade.id in inst.recent:
                self.stats.duplicates += 1
                continue
            if span is not None:
                gap = self.gaps.observe(inst.key, span[0], trade.ts, span[1])
                if gap is not None:
                    out += await self._gap_found(symbol, inst, gap)
            self._remember(inst, trade)
            out.append(trade)
        if out:
            self.stats.trades += len(out)
            await _call(self.on_trades, out)

    async def _normalise_all(self, symbol: str, raw: list, recv_ts: int) -> list[tuple[Trade, Optional[IdSpan]]]:
        market = (getattr(self.exchange, "markets", None) or {}).get(symbol)
        items = []
        for ct in raw:
            t = normalise(self.exchange_id, ct, market, recv_ts)
            if isinstance(t, str):
                await self._reject(self._inst[symbol].key, t, ct)
                continue
            items.append((t, id_span(self.exchange_id, ct)))
        if self.sequential:  # a batch out of id order must not look like a gap
            items.sort(key=lambda it: (it[1] is None, it[1] or (0, 0)))
        return items

    def _remember(self, inst: _Instrument, trade: Trade) -> None:
        inst.recent.add(trade.id)
        if inst.last_ts is None or trade.ts >= inst.last_ts:
            inst.last_ts, inst.last_id = trade.ts, trade.id

    async def _reject(self, instrument: str, reason: str, payload: Any) -> None:
        self.stats.rejected += 1
        try:
            text = json.dumps(payload, default=str)
        except (TypeError, ValueError):
            text = repr(payload)
        await _call(self.on_event, RejectedTrade(instrument, reason, text[:4000]))

    async def _data_gap(self, ev: DataGapEvent) -> None:
        self.stats.data_gaps += 1
        log.warning("%s: trades between %d and %d may be missing (%s): %s", ev.instrument,
                    ev.from_ts, ev.to_ts, ev.reason, ev.detail)
        await _call(self.on_event, ev)

    # -- backfill ------------------------------------------------------------------------------

    async def _fetch(self, symbol: str, since: Optional[int], from_id: Optional[int] = None) -> _Page:
        """One REST page (retried on network errors), normalised and sorted by (ts, id)."""
        error = "no attempt"
        for attempt in range(self.fetch_retries):
            self.stats.rest_calls += 1
            try:
                if self.from_id_param and from_id is not None:
                    raw = await self.exchange.fetch_trades(symbol, None, self.fetch_limit,
                                                           {self.from_id_param: from_id})
                else:
                    raw = await self.exchange.fetch_trades(symbol, since, self.fetch_limit)
            except RETRYABLE_ERRORS as err:
                error = f"{type(err).__name__}: {err}"[:300]
                if attempt + 1 < self.fetch_retries:
                    await self._sleep(self._rest_backoff.next_delay())
                continue
            except ccxt.BaseError as err:  # refused (needs auth, bad symbol...): retrying won't help
                error = f"{type(err).__name__}: {err}"[:300]
                break
            self._rest_backoff.reset()
            raw = list(raw or [])
            items = await self._normalise_all(symbol, raw, self._clock())
            trades = sorted((t for t, _ in items), key=trade_order_key)
            return _Page(trades, len(raw))
        self._rest_backoff.reset()
        return _Page([], 0, error)

    async def _backfill_since(self, symbol: str, inst: _Instrument, until: Optional[Trade]) -> list[Trade]:
        """After a reconnect: trades from the last one seen up to ``until`` (the first new
        streamed trade; None = up to now), paging forward by time."""
        start_ts = inst.last_ts
        if start_ts is None:
            return []
        end_ts = until.ts if until is not None else self._clock()
        if not self.has_history:
            await self._data_gap(DataGapEvent(
                inst.key, start_ts, end_ts, "no_public_history",
                f"{self.exchange_id} has no public REST trade history; trades during the "
                f"disconnect cannot be recovered"))
            return []
        collected: list[Trade] = []
        fetched_ids: set[str] = set()
        since = start_ts
        for page_no in range(self.max_backfill_pages):
            page = await self._fetch(symbol, since)
            if page.error is not None:
                await self._data_gap(DataGapEvent(
                    inst.key, since, end_ts, "fetch_failed",
                    f"fetch_trades failed after {self.fetch_retries} attempt(s): {page.error}"))
                break
            trades = page.trades
            if page_no == 0 and not (trades and trades[0].ts <= start_ts):
                # the hole ends at the first trade we hold again: fetched or streamed, whichever is first
                first_ts = min(trades[0].ts, end_ts) if trades else end_ts
                await self._data_gap(DataGapEvent(
                    inst.key, start_ts, first_ts, "history_not_reachable",
                    f"REST history starts at {first_ts}, after the last streamed trade "
                    f"(id {inst.last_id}, ts {start_ts})"))
            new = [t for t in trades if t.id not in fetched_ids]
            fetched_ids.update(t.id for t in new)
            collected += new
            if page.raw_count < self.fetch_limit or not new:
                break
            if until is not None and (trades[-1].ts >= until.ts or until.id in fetched_ids):
                break
            since = trades[-1].ts
        else:
            await self._data_gap(DataGapEvent(
                inst.key, since, end_ts, "page_limit",
                f"backfill stopped after {self.max_backfill_pages} pages without catching up"))
        if until is not None:
            collected = [t for t in collected if t.ts <= until.ts and t.id != until.id]
        filled = merge_backfill(inst.recent, collected)
        for t in filled:
            self._remember(inst, t)
        self.stats.backfilled += len(filled)
        if filled:
            log.info("%s: backfilled %d trades after reconnect", inst.key, len(filled))
        return filled

    async def _gap_found(self, symbol: str, inst: _Instrument, gap: Gap) -> list[Trade]:
        self.stats.gaps_detected += 1
        await _call(self.on_event, GapEvent(gap.instrument, gap.from_id, gap.to_id, gap.from_ts,
                                            gap.to_ts, gap.missing, self.gaps.gaps(gap.instrument)))
        return await self._backfill_gap(symbol, inst, gap)

    async def _backfill_gap(self, symbol: str, inst: _Instrument, gap: Gap) -> list[Trade]:
        """Fetch exactly the ids ``gap.from_id..gap.to_id``; report the ones that stay missing."""
        if not self.has_history:
            await self._data_gap(DataGapEvent(inst.key, gap.from_ts, gap.to_ts, "no_public_history",
                                              f"ids {gap.from_id}..{gap.to_id} missing; no REST history"))
            return []
        got: dict[int, Trade] = {}
        since, next_id, error = gap.from_ts, gap.from_id, None
        for _ in range(self.max_backfill_pages):
            page = await self._fetch(symbol, since, next_id)
            if page.error is not None:
                error = page.error
                break
            numbered = [(int(t.id), t) for t in page.trades if t.id.isdigit()]
            ids = [i for i, _ in numbered]
            for i, t in numbered:
                if gap.from_id <= i <= gap.to_id:
                    got.setdefault(i, t)
            if len(got) == gap.missing or page.raw_count < self.fetch_limit or not ids or max(ids) >= gap.to_id:
                break
            new_since, new_next = page.trades[-1].ts, max(ids) + 1
            if (new_since, new_next) == (since, next_id):
                break  # no progress
            since, next_id = new_since, new_next
        filled = merge_backfill(inst.recent, list(got.values()))
        for t in filled:
            inst.recent.add(t.id)  # older than the trade that revealed the gap: last_ts stays
        self.stats.backfilled += len(filled)
        if len(got) == gap.missing:
            self.stats.gaps_filled += 1
            log.info("%s: filled id gap %d..%d", inst.key, gap.from_id, gap.to_id)
        else:
            await self._data_gap(self._unfilled(inst, gap, got, error))
        return filled

    def _unfilled(self, inst: _Instrument, gap: Gap, got: dict[int, Trade], error: Optional[str]) -> DataGapEvent:
        """The span that stays missing: from the last recovered trade before the first missing
        id to the first recovered trade after the last missing id."""
        first_missing = gap.from_id
        while first_missing in got:
            first_missing += 1
        last_missing = gap.to_id
        while last_missing in got:
            last_missing -= 1
        before = [t.ts for i, t in got.items() if i < first_missing]
        after = [t.ts for i, t in got.items() if i > last_missing]
        from_ts = max(before) if before else gap.from_ts
        to_ts = min(after) if after else gap.to_ts
        lost = gap.missing - len(got)
        if error is not None:
            reason, why = "fetch_failed", f"fetch_trades failed: {error}"
        elif first_missing == gap.from_id:
            reason, why = "history_not_reachable", "REST history no longer reaches back to the gap"
        else:
            reason, why = "ids_missing", "REST history lacks some ids"
        return DataGapEvent(inst.key, from_ts, to_ts, reason,
                            f"{lost} of {gap.missing} trade ids in {gap.from_id}..{gap.to_id} not "
                            f"recovered (first {first_missing}, last {last_missing}); {why}")
