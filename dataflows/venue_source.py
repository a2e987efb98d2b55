"""Venue source: the bytewax source over live ccxt.pro feeds (``CcxtSource``), one partition per exchange.

Each partition runs a ``CcxtFeed`` (asyncio, reconnects, backfill) in a background thread; the
feed's callbacks put trades and events on a queue that ``next_batch`` drains into one
``FrameBatch`` (trades in contract columns, events and refused trades attached). Nothing blocks
the worker: an empty queue means "wake me in ``idle_ms``".

Perp data (funding, open interest, liquidations; ``PerpPolling``) travels on the same queue and
lands in ``FrameBatch.events`` as ``PerpUpdate``s with ``seq`` = the offset the partition's next
trade gets, i.e. each update comes after exactly the trades received before it. What is read comes
from ``perp`` if given, else the factory's ``perp`` attribute (scripted venues poll fast), else the
settings (``TAPEFLOW_CCXT_FUNDING_EVERY_S`` etc., from the environment).

A live source has no replayable position: its snapshot is a counter only, so after a restart the
feed starts from "now" and the backfill closes the hole where the venue allows it (the rest is a
data-gap event).

Telling the truth about the feeds:

- exchange ids are checked when the source is made, before any dataflow starts
  (``UnknownExchangeError``, a ValueError, with the closest ids);
- an unreachable venue is a ``feed_down`` event (and ``reconnect`` when it is back) and a WARNING
  status line while retrying (``CcxtFeed``); without a duration that goes on, with backoff;
- a feed that fails for good (an unknown symbol, a refused request, a bug) ends every partition
  of this process cleanly -- what was received is still written -- and ``check()``, which the
  command calls after the dataflow, raises ``FeedError`` with the reason;
- a ``duration_s`` run whose exchanges received no trades ends the same way: ``check()`` names
  each silent exchange with its last error. An exchange that never failed but stayed quiet while
  others delivered is only a warning (a quiet market is not an error).

``CcxtSource.check`` only knows the partitions of its own process: with ``--processes N`` each
process checks its own exchanges (a peer that fails makes the run fail).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import msgspec
import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflows.config import ConfigError, load_settings
from dataflows.venue_exchange import FeedError, UnknownSymbolError, check_exchange_id, make_exchange
from dataflows.venue_feed import CcxtFeed
from dataflows.venue_perp_feed import PerpPolling
from operators.events import from_ingest
from operators.perp import PerpUpdate
from operators.records import FrameBatch, Trade
from operators.venue_outages import Backoff

log = logging.getLogger(__name__)

ExchangeFactory = Callable[[str], Any]
BackoffFactory = Callable[[int], Backoff]

__all__ = ["CcxtSource", "FeedOutcome", "load_factory"]

_COLUMNS = {"exchange": pl.String, "symbol": pl.String, "id": pl.String, "ts": pl.Int64, "price": pl.Float64,
            "amount": pl.Float64, "side": pl.String, "trader": pl.String, "recv_ts": pl.Int64, "offset": pl.Int64}


def load_factory(path: Optional[str]) -> ExchangeFactory:
    """``module:callable`` -> a factory ``f(exchange_id) -> ccxt.pro-like exchange``; None -> ccxt.pro.

    The factory may carry a ``backoff`` attribute (``i -> Backoff``, see ``CcxtFeed``) and a ``perp``
    attribute (``PerpPolling``): scripted venues in tests use them for millisecond retries and polls
    without touching the production defaults."""
    if not path:
        return make_exchange
    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"exchange factory must look like 'module:callable', got {path!r}")
    return getattr(importlib.import_module(mod), attr)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def trades_frame(trades: list[Trade], first_offset: int) -> pl.DataFrame:
    return pl.DataFrame({
        "exchange": [t.exchange for t in trades], "symbol": [t.symbol for t in trades],
        "id": [str(t.id) for t in trades], "ts": [t.ts for t in trades], "price": [t.price for t in trades],
        "amount": [t.amount for t in trades], "side": [t.side for t in trades],
        "trader": [t.trader for t in trades], "recv_ts": [t.recv_ts for t in trades],
        "offset": list(range(first_offset, first_offset + len(trades))),
    }, schema=_COLUMNS)


class _FeedThread:
    """A ``CcxtFeed`` on its own asyncio loop in a daemon thread, feeding a queue; ``None`` on the
    queue marks the end of the thread (``error`` says why, if it failed)."""

    def __init__(self, exchange_id: str, symbols: list[str], factory: ExchangeFactory, out: queue.Queue,
                 backoff: Optional[BackoffFactory], perp: Optional[PerpPolling] = None):
        self.exchange_id, self.symbols, self.factory, self.out = exchange_id, symbols, factory, out
        self.backoff, self.perp = backoff, perp
        self.loop = asyncio.new_event_loop()
        self.stop: Optional[asyncio.Event] = None
        self.feed: Optional[CcxtFeed] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._main, name=f"ccxt-{exchange_id}", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as err:  # noqa: BLE001 - reported to the worker by next_batch
            self.error = err
        finally:
            self.out.put(None)

    async def _run(self) -> None:
        self.stop = asyncio.Event()
        exchange = self.factory(self.exchange_id)
        kw = {"backoff_factory": self.backoff} if self.backoff is not None else {}
        self.feed = CcxtFeed(exchange, self.symbols, lambda ts: self.out.put(("trades", ts)),
                             lambda ev: self.out.put(("event", ev)), exchange_id=self.exchange_id,
                             perp=self.perp, **kw)
        try:
            await self.feed.run(self.stop)
        finally:
            close = getattr(exchange, "close", None)
            if close is not None:
                res = close()
                if asyncio.iscoroutine(res):
                    await res

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop the feed and wait for its thread; False if it did not end in time."""
        if self.thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self._request_stop)
            except RuntimeError:  # the loop has closed: the thread is ending by itself
                pass
        self.thread.join(timeout=timeout_s)
        return not self.thread.is_alive()

    def _request_stop(self) -> None:
        if self.stop is not None:
            self.stop.set()
        else:  # still starting up (the factory): stop as soon as the feed runs
            self.loop.call_later(0.05, self._request_stop)

    def failure(self) -> Optional[str]:
        """The user-facing reason the feed thread failed, or None."""
        err = self.error
        if err is None:
            return None
        if isinstance(err, FeedError):
            return str(err)
        return f"ccxt feed for {self.exchange_id} failed: {type(err).__name__}: {str(err).strip()[:300]}"


@dataclass
class FeedOutcome:
    """What one exchange's partition saw, for ``CcxtSource.check``."""

    trades: int = 0
    fatal: Optional[str] = None  # the feed failed for good
    last_error: Optional[str] = None  # the feed's latest failure (it may have recovered since)
    fatal_type: type = FeedError  # the FeedError subclass that says why (UnknownSymbolError: a user mistake)


class _Partition(StatefulSourcePartition[FrameBatch, int]):
    def __init__(self, src: "CcxtSource", exchange_id: str, symbols: list[str], offset: int):
        self.src, self.exchange_id, self.offset = src, exchange_id, offset
        self.q: queue.Queue = queue.Queue()
        self.outcome = src.outcomes.setdefault(exchange_id, FeedOutcome())
        self.feed = _FeedThread(exchange_id, symbols, src.factory(), self.q, src.backoff_factory(),
                                src.perp_polling())
        self.deadline = time.time() + src.duration_s if src.duration_s else None
        self.awake: Optional[datetime] = None
        self.stopping = False  # the feed was asked to stop; the queue is being drained
        self.ended = False  # the feed thread is over and its queue drained

    def next_batch(self) -> list[FrameBatch]:
        if self.ended:
            raise StopIteration
        if not self.stopping and (self.src.aborted.is_set()
                                  or (self.deadline is not None and time.time() >= self.deadline)):
            self._stop_feed()
        trades: list[Trade] = []
        events: list = []
        t = now_ms()
        while len(trades) < self.src.batch_size:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                break
            if item is None:  # the feed thread ended: everything it produced is drained
                self._feed_ended()
                break
            kind, payload = item
            if kind == "trades":
                trades.extend(payload)
            elif isinstance(payload, PerpUpdate):  # after the trades received before it, before the rest
                events.append(msgspec.structs.replace(payload, seq=self.offset + len(trades)))
            else:
                events.append(from_ingest(payload, t, f"ccxt:{self.exchange_id}"))
        if not trades and not events:
            self.awake = datetime.now(timezone.utc) + timedelta(milliseconds=self.src.idle_ms)
            return []
        self.awake = None
        self.outcome.trades += len(trades)
        frame = trades_frame(trades, self.offset)
        self.offset += len(trades)
        if self.src.progress:
            self.src.progress(self.exchange_id, 0, 0, len(trades))
        return [FrameBatch(f"ccxt:{self.exchange_id}", self.exchange_id, frame, t, events)]

    def _stop_feed(self) -> None:
        """Stop the feed first and then drain the queue, so nothing it received is dropped."""
        self.stopping = True
        if not self.feed.close():
            log.warning("%s: the ccxt feed did not stop within 10 s; ending without it", self.exchange_id)
            self._feed_ended()

    def _feed_ended(self) -> None:
        self.ended = True
        feed = self.feed.feed
        self.outcome.last_error = feed.last_error if feed is not None else None
        fatal = self.feed.failure()
        if fatal is not None:
            self.outcome.fatal = fatal
            if isinstance(self.feed.error, FeedError):
                self.outcome.fatal_type = type(self.feed.error)
            else:  # a bug or an unexpected refusal: keep the traceback in the log
                log.error("%s", fatal, exc_info=self.feed.error)
            self.src.aborted.set()  # the run cannot do what was asked: end the other feeds too

    def next_awake(self) -> Optional[datetime]:
        return self.awake

    def snapshot(self) -> int:
        return self.offset

    def close(self) -> None:
        self.feed.close()


@dataclass
class CcxtSource(FixedPartitionedSource[FrameBatch, int]):
    """Live trades of ``symbols`` per exchange id, e.g. ``{"binanceusdm": ["BTC/USDT:USDT"]}``."""

    symbols: dict[str, list[str]]
    factory_path: Optional[str] = None  # module:callable making exchanges (tests, recorders)
    duration_s: Optional[float] = None  # stop after this long (demos, tests); None = forever
    batch_size: int = 20_000
    idle_ms: int = 20
    progress: Optional[Callable] = None
    backoff: Optional[BackoffFactory] = None  # i -> Backoff; None: the factory's ``backoff`` or the default
    perp: Optional[PerpPolling] = None  # perp data to read; None: the factory's ``perp`` or the settings
    _factory: Optional[ExchangeFactory] = field(default=None, repr=False)
    outcomes: dict[str, FeedOutcome] = field(default_factory=dict, repr=False)  # of this process
    aborted: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        for exchange_id in self.symbols:  # before any dataflow starts: a typo is not a retry loop
            check_exchange_id(exchange_id)
        try:
            self.factory()
        except (ImportError, AttributeError) as err:
            raise ValueError(f"exchange factory {self.factory_path!r} cannot be loaded: {err}") from None

    def factory(self) -> ExchangeFactory:
        if self._factory is None:
            self._factory = load_factory(self.factory_path)
        return self._factory

    def instruments(self) -> list[str]:
        return [f"{ex}:{s}" for ex, syms in self.symbols.items() for s in syms]

    def backoff_factory(self) -> Optional[BackoffFactory]:
        return self.backoff or getattr(self.factory(), "backoff", None)

    def perp_polling(self) -> PerpPolling:
        """What perp data the feeds read: ``perp``, else the factory's ``perp``, else the settings."""
        if self.perp is None:
            self.perp = getattr(self.factory(), "perp", None)
        if self.perp is None:
            try:
                self.perp = PerpPolling.from_settings(load_settings())
            except ConfigError as err:  # the command checked its settings already; do not fail the feeds
                log.warning("perp polling settings unreadable (%s); using the defaults", err)
                self.perp = PerpPolling()
        return self.perp

    def check(self) -> None:
        """After the dataflow: raise ``FeedError`` if a feed failed for good, or if this was a
        ``duration_s`` run and an exchange received no trades although it had failed, or no
        exchange received any (one line per exchange, with its last error)."""
        fatal = [o for o in self.outcomes.values() if o.fatal]
        if fatal:
            user_mistake = all(issubclass(o.fatal_type, UnknownSymbolError) for o in fatal)
            raise (UnknownSymbolError if user_mistake else FeedError)("\n".join(o.fatal for o in fatal))
        if not self.duration_s:
            return
        total = sum(o.trades for o in self.outcomes.values())
        problems = []
        for ex, o in sorted(self.outcomes.items()):
            if o.trades:
                continue
            head = f"no trades received from {ex} in {self.duration_s:g} s"
            if o.last_error:
                problems.append(f"{head}: last error: {o.last_error}")
            elif total == 0:
                problems.append(f"{head} (no error seen, but the venue sent none)")
            else:
                log.warning("%s (no error seen, but the venue sent none)", head)
        if problems:
            raise FeedError("\n".join(problems))

    def list_parts(self) -> list[str]:
        return sorted(self.symbols)

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _Partition:
        return _Partition(self, for_part, self.symbols[for_part], resume_state or 0)
