"""Venue backfill: how a live feed recovers missed trades over REST ``fetch_trades``.

``FeedBackfill`` is the backfill part of ``dataflows.venue_feed.CcxtFeed``:

- venues with sequential ids (``SEQUENTIAL_IDS``): a hole in the ids -- inside a stream or
  across a reconnect -- is a ``Gap``; it is reported (``GapEvent``), and exactly the missing
  ids are fetched and delivered before the trade that revealed the hole;
- other venues: after a reconnect, once the stream delivers again, the trades from the last
  one seen up to the first new one are fetched (``since`` = last seen ts, paging forward) and
  delivered before the new batch;
- whatever cannot be recovered (REST history does not reach back, fetch keeps failing, no
  public history at all) becomes a ``DataGapEvent`` naming the instrument and time span.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import ccxt

from dataflows.venue_exchange import RETRYABLE_ERRORS, call_maybe_async
from operators.records import Trade
from operators.venue_gaps import (
    DataGapEvent, Gap, GapEvent, RecentIds, merge_backfill, trade_order_key,
)

log = logging.getLogger("dataflows.venue_feed")  # one logger for the whole feed, this part included


@dataclass
class FeedInstrument:
    """What a feed remembers of one instrument: its recent ids and its newest trade."""

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


class FeedBackfill:
    """The backfill part of ``CcxtFeed`` (a mixin): it uses the feed's ``exchange``,
    ``exchange_id``, ``fetch_limit``, ``fetch_retries``, ``max_backfill_pages``, ``has_history``,
    ``from_id_param``, ``gaps``, ``stats``, ``on_event``, ``_clock``, ``_sleep``, ``_rest_backoff``
    and its ``_normalise_all`` and ``_remember``."""

    async def _data_gap(self, ev: DataGapEvent) -> None:
        self.stats.data_gaps += 1
        log.warning("%s: trades between %d and %d may be missing (%s): %s", ev.instrument,
                    ev.from_ts, ev.to_ts, ev.reason, ev.detail)
        await call_maybe_async(self.on_event, ev)

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

    async def _backfill_since(self, symbol: str, inst: FeedInstrument, until: Optional[Trade]) -> list[Trade]:
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

    async def _gap_found(self, symbol: str, inst: FeedInstrument, gap: Gap) -> list[Trade]:
        self.stats.gaps_detected += 1
        await call_maybe_async(self.on_event, GapEvent(gap.instrument, gap.from_id, gap.to_id, gap.from_ts,
                                            gap.to_ts, gap.missing, self.gaps.gaps(gap.instrument)))
        return await self._backfill_gap(symbol, inst, gap)

    async def _backfill_gap(self, symbol: str, inst: FeedInstrument, gap: Gap) -> list[Trade]:
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

    def _unfilled(self, inst: FeedInstrument, gap: Gap, got: dict[int, Trade], error: Optional[str]) -> DataGapEvent:
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
