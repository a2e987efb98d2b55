"""bytewax source over live ccxt.pro feeds: one partition per exchange.

Each partition runs a ``CcxtFeed`` (asyncio, reconnects, backfill) in a background thread; the
feed's callbacks put trades and events on a queue that ``next_batch`` drains into one
``FrameBatch`` (trades in contract columns, events and refused trades attached). Nothing blocks
the worker: an empty queue means "wake me in ``idle_ms``".

A live source has no replayable position: its snapshot is a counter only, so after a restart the
feed starts from "now" and the backfill closes the hole where the venue allows it (the rest is a
data-gap event).
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

import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflows.ccxt_feed import CcxtFeed, make_exchange
from operators.events import from_ingest
from operators.trades import FrameBatch, Trade

log = logging.getLogger(__name__)

ExchangeFactory = Callable[[str], Any]

_COLUMNS = {"exchange": pl.String, "symbol": pl.String, "id": pl.String, "ts": pl.Int64, "price": pl.Float64,
            "amount": pl.Float64, "side": pl.String, "trader": pl.String, "recv_ts": pl.Int64, "offset": pl.Int64}


def load_factory(path: Optional[str]) -> ExchangeFactory:
    """``module:callable`` -> a factory ``f(exchange_id) -> ccxt.pro-like exchange``; None -> ccxt.pro."""
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
    """A ``CcxtFeed`` on its own asyncio loop in a daemon thread, feeding a queue."""

    def __init__(self, exchange_id: str, symbols: list[str], factory: ExchangeFactory, out: queue.Queue):
        self.exchange_id, self.symbols, self.factory, self.out = exchange_id, symbols, factory, out
        self.loop = asyncio.new_event_loop()
        self.stop: Optional[asyncio.Event] = None
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
        feed = CcxtFeed(exchange, self.symbols, lambda ts: self.out.put(("trades", ts)),
                        lambda ev: self.out.put(("event", ev)), exchange_id=self.exchange_id)
        try:
            await feed.run(self.stop)
        finally:
            close = getattr(exchange, "close", None)
            if close is not None:
                res = close()
                if asyncio.iscoroutine(res):
                    await res

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=10)


class _Partition(StatefulSourcePartition[FrameBatch, int]):
    def __init__(self, src: "CcxtSource", exchange_id: str, symbols: list[str], offset: int):
        self.src, self.exchange_id, self.offset = src, exchange_id, offset
        self.q: queue.Queue = queue.Queue()
        self.feed = _FeedThread(exchange_id, symbols, src.factory(), self.q)
        self.deadline = time.time() + src.duration_s if src.duration_s else None
        self.awake: Optional[datetime] = None
        self.ended = False

    def next_batch(self) -> list[FrameBatch]:
        if self.ended:
            raise StopIteration
        trades: list[Trade] = []
        events: list = []
        t = now_ms()
        while len(trades) < self.src.batch_size:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                break
            if item is None:  # the feed thread ended
                if self.feed.error is not None:
                    raise RuntimeError(f"ccxt feed for {self.exchange_id} failed: {self.feed.error!r}") \
                        from self.feed.error
                self.ended = True
                break
            kind, payload = item
            if kind == "trades":
                trades.extend(payload)
            else:
                events.append(from_ingest(payload, t, f"ccxt:{self.exchange_id}"))
        if self.deadline is not None and time.time() >= self.deadline:
            self.ended = True
        if not trades and not events:
            self.awake = datetime.now(timezone.utc) + timedelta(milliseconds=self.src.idle_ms)
            return []
        self.awake = None
        frame = trades_frame(trades, self.offset)
        self.offset += len(trades)
        if self.src.progress:
            self.src.progress(self.exchange_id, 0, 0, len(trades))
        return [FrameBatch(f"ccxt:{self.exchange_id}", self.exchange_id, frame, t, events)]

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
    _factory: Optional[ExchangeFactory] = field(default=None, repr=False)

    def factory(self) -> ExchangeFactory:
        if self._factory is None:
            self._factory = load_factory(self.factory_path)
        return self._factory

    def list_parts(self) -> list[str]:
        return sorted(self.symbols)

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _Partition:
        return _Partition(self, for_part, self.symbols[for_part], resume_state or 0)


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
