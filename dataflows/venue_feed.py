"""Venue feed: live trades from one exchange over ccxt.pro, with reconnects, gap detection and backfill.

``CcxtFeed`` runs an asyncio loop over an injected ccxt.pro-like exchange object:

1. stream: ``watch_trades_for_symbols(symbols)`` when the exchange has it, else one
   ``watch_trades(symbol)`` task per symbol;
2. each batch is normalised (``operators.venue_trades.normalise``) and de-duplicated against the
   instrument's recent ids;
3. on a network error (``load_markets`` or the stream) the feed waits (``Backoff``: exponential,
   full jitter, reset after the next success) and tries again, which makes ccxt reconnect. An
   outage is a ``FeedDown`` event once, when it starts, and a ``FeedUp`` when it ends; while it
   lasts, a WARNING status line appears whenever the backoff grows, then once a minute
   (``OutageTracker``), so a venue that stays down is visible without flooding the log;
   ``last_error`` keeps the latest failure for the caller's final word;
4. a symbol the venue does not list (checked as soon as markets are loaded) is
   ``UnknownSymbolError``: a user mistake ends the feed instead of retrying forever;
5. missed trades are fetched over REST (``FeedBackfill``, ``dataflows.venue_backfill``): exactly
   the missing ids where ids are sequential, else the stretch of a reconnect; what cannot be
   recovered is a ``DataGapEvent``;
6. perpetual-futures data (funding, open interest, liquidations; ``PerpPolling``) is read next to
   the trades for contract markets (``PerpLoops``, ``dataflows.venue_perp_feed``), each call with
   its own outage tracking, so a perp failure never stops the trades.

Output goes through two callbacks (plain functions or coroutines): ``on_trades(list[Trade])``
with the trades of one instrument in (ts, id) order, and ``on_event(event)`` for ``GapEvent``,
``DataGapEvent``, ``RejectedTrade``, ``FeedDown``, ``FeedUp`` and ``PerpUpdate`` (``seq`` unset:
the receiver places it among the trades it got so far). Both are called from the one asyncio loop,
so a receiver sees trades and perp updates in the order they were received. Sleep, clock and
backoff are injectable, so tests drive the whole loop with a scripted fake exchange and no waiting.

Making the exchange (rate limiter, credentials from the environment) and the errors a feed ends
with are in ``dataflows.venue_exchange``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence

from dataflows.venue_backfill import FeedBackfill, FeedInstrument
from dataflows.venue_exchange import (
    RETRYABLE_ERRORS,
    STOPPED,
    UnknownSymbolError,
    call_maybe_async,
    symbol_of,
    unknown_symbols,
)
from dataflows.venue_perp_feed import PERP_STAGES, PerpLoops, PerpPolling
from operators.records import Trade
from operators.venue_gaps import (
    FETCH_FROM_ID_PARAM, FETCH_LIMIT, PUBLIC_TRADE_HISTORY, SEQUENTIAL_IDS, WATCH_PARAMS,
    IdGapTracker, RecentIds, id_span,
)
from operators.venue_outages import Backoff, OutageTracker, error_line
from operators.venue_trades import RejectedTrade, instrument_key, normalise

log = logging.getLogger(__name__)


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


IdSpan = tuple[int, int]  # (first id, last id) a trade message covers


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class CcxtFeed(FeedBackfill, PerpLoops):
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
        self._inst = {s: FeedInstrument(instrument_key(self.exchange_id, s), RecentIds(recent_ids))
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
            if markets is STOPPED:
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
            if batch is STOPPED:
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
            await call_maybe_async(self.on_event, down)
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
            await call_maybe_async(self.on_event, up)

    @staticmethod
    async def _until_stopped(aw: Awaitable, stop: asyncio.Event) -> Any:
        """Await ``aw`` unless ``stop`` is set first (then cancel it and return ``STOPPED``)."""
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
        return STOPPED


    # -- one streamed batch --------------------------------------------------------------------

    async def _handle_batch(self, symbols: list[str], batch: list) -> None:
        recv_ts = self._clock()
        by_symbol: dict[str, list] = {s: [] for s in symbols}
        for ct in batch:
            sym = symbol_of(ct, symbols)
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
            await call_maybe_async(self.on_trades, out)

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

    def _remember(self, inst: FeedInstrument, trade: Trade) -> None:
        inst.recent.add(trade.id)
        if inst.last_ts is None or trade.ts >= inst.last_ts:
            inst.last_ts, inst.last_id = trade.ts, trade.id

    async def _reject(self, instrument: str, reason: str, payload: Any) -> None:
        self.stats.rejected += 1
        try:
            text = json.dumps(payload, default=str)
        except (TypeError, ValueError):
            text = repr(payload)
        await call_maybe_async(self.on_event, RejectedTrade(instrument, reason, text[:4000]))

