"""Venue outages: reconnect backoff and the up/down state of a live feed's connections.

``Backoff`` spaces the retries of a failed connection step (exponential, full jitter);
``OutageTracker`` turns a run of failures into one ``FeedDown`` and one ``FeedUp`` and decides
which retries get a status line; ``error_line`` is how an error is shown in both. Pure: no I/O, no
ccxt import, no bytewax.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from operators.records import MINUTE_MS

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
    status_every_ms: int = MINUTE_MS
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

