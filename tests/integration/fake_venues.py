"""Scripted venues for end-to-end ingest tests, used as `--exchange-factory tests.integration.fake_venues:NAME`.

`make`:
- binanceusdm BTC: sequential ids 1..300; the stream drops 101..150 around a disconnect, which the
  feed finds by id and backfills over REST.
- bybit ETH: UUID ids; the stream drops a long stretch and REST only keeps the newest 20 trades, so
  the hole cannot be filled: a data-gap event.
- both list only their one market, so any other symbol is unknown to them.

`unreachable`: every venue fails load_markets the way ccxt does without a network
(ExchangeNotAvailable), forever.

`flaky`: binanceusdm fails load_markets twice, then streams the whole BTC tape.

`unreachable` and `flaky` carry millisecond backoffs (the ``backoff`` attribute the source reads
from its factory), so a test waits milliseconds between retries without changing the defaults.
"""

import asyncio

import ccxt

from operators.ingest import Backoff
from tests.unit.test_ccxt_feed import ETH, BTC, T0, FakeExchange, tape

BTC_TAPE = tape(BTC, 300, t0=T0, step=1000)
ETH_TAPE = tape(ETH, 300, t0=T0 + 500, step=1000, uuids=True)


def _fast_backoff(i: int) -> Backoff:
    return Backoff(base=0.02, cap=0.1, seed=i)


def _ready(fake: FakeExchange) -> FakeExchange:
    fake.stop = asyncio.Event()  # the fake signals "script used up" here; the source stops on --duration
    return fake


def make(exchange_id: str):
    if exchange_id == "binanceusdm":
        script = [BTC_TAPE[0:60], BTC_TAPE[60:100], ccxt.NetworkError("socket closed"), BTC_TAPE[150:300]]
        fake = FakeExchange("binanceusdm", {BTC: BTC_TAPE}, {"*": script})
    elif exchange_id == "bybit":
        script = [ETH_TAPE[0:50], ccxt.NetworkError("socket closed"), ETH_TAPE[200:300]]
        fake = FakeExchange("bybit", {ETH: ETH_TAPE}, {"*": script}, recent_only=20)
    else:
        raise ValueError(f"no fake venue {exchange_id}")
    return _ready(fake)


def unreachable(exchange_id: str):
    return _ready(FakeExchange(exchange_id, {BTC: BTC_TAPE}, {"*": []}, load_failures=-1))


unreachable.backoff = _fast_backoff


def flaky(exchange_id: str):
    script = [BTC_TAPE[0:100], BTC_TAPE[100:200], BTC_TAPE[200:300]]
    return _ready(FakeExchange(exchange_id, {BTC: BTC_TAPE}, {"*": script}, load_failures=2))


flaky.backoff = _fast_backoff
