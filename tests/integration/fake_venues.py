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

`perp`: binanceusdm BTC with perp data (issue 13): 15 minutes of trades (``PERP_TAPE``, one every
2 s) streamed a minute at a time; funding polled every 40 ms (``PERP_FUNDING`` rates, each stamped
with the venue's clock, i.e. its newest trade (+ the poll's number in ms), the third one without its
rate: refused), open
interest every 120 ms (``PERP_OI``), and two batches of liquidations; any other exchange id is a
bybit ETH venue with trades only. Its ``perp`` attribute is the fast ``PerpPolling``.
"""

import asyncio

import ccxt

from dataflows.venue_perp_feed import PerpPolling
from operators.venue_outages import Backoff
from tests.unit.test_venue_feed import (
    ETH,
    BTC,
    T0,
    FakeExchange,
    ccxt_funding,
    ccxt_liq,
    ccxt_oi,
    tape,
)

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


PERP_TAPE = tape(BTC, 450, t0=T0, step=2000)  # 15 minutes: three 5m bars
PERP_FUNDING = [round(1e-4 + i * 1e-5, 8) for i in range(12)]
PERP_BAD_FUNDING = 2  # the third poll answers without a rate: a dead letter
PERP_OI = [1_000.0 + 10 * i for i in range(5)]
PERP_LIQ = [("sell", 2.0), ("buy", 0.5), ("sell", 1.5)]


def _now(fake: FakeExchange) -> int:
    return fake.venue_ts if fake.venue_ts is not None else T0


def perp(exchange_id: str):
    if exchange_id != "binanceusdm":
        eth = tape(ETH, 450, t0=T0 + 500, step=2000, uuids=True)
        return _ready(FakeExchange(exchange_id, {ETH: eth}, {"*": [eth[i:i + 30] for i in range(0, 450, 30)]}))
    stream = [x for i in range(0, 450, 30) for x in (0.05, PERP_TAPE[i:i + 30])]  # a minute every 50 ms
    # (+ i ms: two polls between the same trades still show two times, as a venue's clock would)
    funding = [(lambda f, i=i, r=r: ccxt_funding(BTC, _now(f) + i, r, mark=PERP_TAPE[0]["price"] * (1 + r)))
               for i, r in enumerate(PERP_FUNDING)]
    funding.insert(PERP_BAD_FUNDING, lambda f: ccxt_funding(BTC, _now(f), None))
    oi = [(lambda f, i=i, a=a: ccxt_oi(BTC, _now(f) + i, a)) for i, a in enumerate(PERP_OI)]
    liq = [0.2, lambda f: [ccxt_liq(BTC, _now(f) + k, side, 100.0, amount)
                           for k, (side, amount) in enumerate(PERP_LIQ[:2])],
           0.3, lambda f: [ccxt_liq(BTC, _now(f), PERP_LIQ[2][0], 100.0, PERP_LIQ[2][1])]]
    return _ready(FakeExchange("binanceusdm", {BTC: PERP_TAPE}, {"*": stream}, funding={BTC: funding},
                               open_interest={BTC: oi}, liquidations={"*": liq}))


perp.backoff = _fast_backoff
perp.perp = PerpPolling(funding_every_s=0.04, open_interest_every_s=0.12)
