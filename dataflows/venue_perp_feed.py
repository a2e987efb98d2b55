"""Venue perp feed: funding, open interest and liquidations read next to a live feed's trades.

``PerpPolling`` says what is read; ``PerpLoops`` is the part of ``dataflows.venue_feed.CcxtFeed``
that reads it, for the symbols that are contract markets:

- funding rates are polled with ``fetch_funding_rate`` (every ``funding_every_s``, swaps only) and
  open interest with ``fetch_open_interest`` (every ``open_interest_every_s``); public
  liquidations are watched with ``watch_liquidations_for_symbols`` (else one
  ``watch_liquidations`` per symbol). Each is normalised by ``operators.venue_perp`` into a
  ``PerpUpdate`` (a refused one is a ``RejectedTrade``, a dead letter). What the venue does not
  ``has`` is skipped, with one WARNING line at start naming it;
- a perp call never stops the trades: each poll or watch loop has its own ``OutageTracker`` and
  ``Backoff`` (stages ``funding``, ``open_interest``, ``liquidations``), so a failure is a
  ``FeedDown`` / ``FeedUp`` pair like a trade stream's, whatever the error (ccxt's own parsing
  included); ``NotSupported`` ends that loop with one WARNING line and a ``FeedDown``.

A ``PerpUpdate`` goes out through ``on_event`` with ``seq`` unset: the receiver places it among the
trades it got so far.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Awaitable, Callable, Mapping

import ccxt

from dataflows.venue_exchange import STOPPED, call_maybe_async, symbol_of
from operators.venue_outages import Backoff, OutageTracker, error_line
from operators.venue_perp import NORMALISERS
from operators.venue_trades import instrument_key

log = logging.getLogger("dataflows.venue_feed")  # one logger for the whole feed, this part included


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


def _is_contract(market: Any) -> bool:
    return isinstance(market, dict) and bool(market.get("contract") or market.get("swap") or market.get("future"))


class PerpLoops:
    """The perp part of ``CcxtFeed`` (a mixin): it uses the feed's ``exchange``, ``exchange_id``,
    ``symbols``, ``perp``, ``stats``, ``on_event``, ``_clock``, ``_sleep``, ``_backoff_factory``,
    ``_inst`` and its ``_tracker``, ``_failed``, ``_recovered``, ``_until_stopped`` and ``_reject``."""

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
            if got is STOPPED:
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
            await call_maybe_async(self.on_event, down)

    async def _deliver_perp(self, stage: str, symbols: list[str], raw: list) -> None:
        """Normalise ``raw`` structures of ``symbols`` into PerpUpdates (``on_event``); refused ones
        become ``RejectedTrade`` records."""
        recv_ts = self._clock()
        kind = "liquidation" if stage == "liquidations" else stage
        normalise_perp = NORMALISERS[kind]
        markets = getattr(self.exchange, "markets", None) or {}
        for item in raw:
            sym = symbol_of(item, symbols)
            if sym not in symbols:
                await self._reject(instrument_key(self.exchange_id, str(sym)),
                                   f"not_subscribed: {kind}: symbol {sym!r} is not read here", item)
                continue
            u = normalise_perp(self.exchange_id, item, markets.get(sym), recv_ts)
            if isinstance(u, str):
                await self._reject(self._inst[sym].key, u, item)
                continue
            self.stats.perp_updates += 1
            await call_maybe_async(self.on_event, u)
