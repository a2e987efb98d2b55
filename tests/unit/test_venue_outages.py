"""operators/venue_outages.py: reconnect backoff, outage tracking, error lines, and outages as events."""

from __future__ import annotations

import pickle
import random

import pytest

from operators.events import from_ingest
from operators.venue_outages import Backoff, FeedDown, FeedUp, OutageTracker, error_line


# -- backoff -------------------------------------------------------------------------------------

def test_backoff_ceilings_grow_then_cap():
    b = Backoff(base=0.5, cap=8.0, seed=1)
    assert [b.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert b.ceiling(10_000) == 8.0  # no overflow


def test_backoff_full_jitter_is_bounded_and_deterministic():
    a, b = Backoff(base=1.0, cap=16.0, seed=42), Backoff(base=1.0, cap=16.0, seed=42)
    da = [a.next_delay() for _ in range(12)]
    db = [b.next_delay() for _ in range(12)]
    assert da == db  # same seed, same delays
    for n, d in enumerate(da):
        assert 0.0 <= d <= min(16.0, 2.0 ** n)
    assert da != [Backoff(base=1.0, cap=16.0, seed=43).next_delay() for _ in range(12)]
    assert len(set(da)) == len(da)  # jittered, not constant
    # full jitter: late delays use the whole [0, cap] range
    many = Backoff(base=1.0, cap=16.0, seed=3)
    late = [many.next_delay() for _ in range(400)][10:]
    assert min(late) < 4.0 and max(late) > 12.0


def test_backoff_reset_starts_over():
    b = Backoff(base=1.0, cap=10.0, seed=0)
    for _ in range(5):
        b.next_delay()
    assert b.attempt == 5 and b.ceiling() == 10.0
    b.reset()
    assert b.attempt == 0 and b.ceiling() == 1.0
    assert b.next_delay() <= 1.0


def test_backoff_pickles_with_its_random_state():
    b = Backoff(base=1.0, cap=10.0, seed=9)
    b.next_delay()
    c = pickle.loads(pickle.dumps(b))
    assert [c.next_delay() for _ in range(5)] == [b.next_delay() for _ in range(5)]


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=5, cap=1)
    assert isinstance(Backoff(rng=random.Random(1)).rng, random.Random)


# -- outages --------------------------------------------------------------------------------------

def test_outage_is_one_feed_down_and_one_feed_up_however_many_retries():
    t = OutageTracker("bybit", ("BTC/USDT:USDT",), "stream")
    assert t.succeeded(500) is None and not t.down  # up and staying up: nothing to say
    downs = [t.failed(f"NetworkError: try {i}", 1_000 + i) for i in range(1, 6)]
    assert downs[0] == FeedDown("bybit", ("BTC/USDT:USDT",), "stream", "NetworkError: try 1", 1)
    assert downs[1:] == [None] * 4 and t.down and t.attempts == 5
    assert t.succeeded(4_001) == FeedUp("bybit", ("BTC/USDT:USDT",), "stream", 5, 3_000, "NetworkError: try 5")
    assert not t.down and t.last_error == "NetworkError: try 5"
    assert t.failed("NetworkError: again", 9_000).attempt == 1  # a new outage opens again


def test_status_lines_follow_the_backoff_growth_then_one_per_interval():
    t = OutageTracker("okx", ("X",), "load_markets", status_every_ms=60_000)
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8]
    times = [i * 25_000 for i in range(len(ceilings))]  # 25 s between retries
    logged = [i for i, (c, now) in enumerate(zip(ceilings, times)) if t.should_log(c, now)]
    # growth: 0..4; capped at 100 s: next line at >= 160 s (i=7), then >= 235 s (i=10, past the end)
    assert logged == [0, 1, 2, 3, 4, 7]
    t.succeeded(300_000)
    t.failed("x", 300_001)
    assert t.should_log(0.5, 300_002)  # a new outage starts its status lines afresh


def test_error_line_is_type_and_first_line_bounded():
    assert error_line(TimeoutError()) == "TimeoutError"
    assert error_line(ConnectionError("  refused\nbody\nmore")) == "ConnectionError: refused"
    assert len(error_line(OSError("x" * 1000))) == 300


def test_feed_down_and_up_become_events():
    down = from_ingest(FeedDown("okx", ("A", "B"), "stream", "NetworkError: closed", 1), 5_000, "ccxt:okx")
    assert (down.kind, down.exchange, down.symbol, down.reason, down.ts) == (
        "feed_down", "okx", "A,B", "NetworkError: closed", 5_000)
    assert '"stage": "stream"' in down.detail and '"attempt": 1' in down.detail
    up = from_ingest(FeedUp("okx", ("A",), "load_markets", 3, 2_500, "NetworkError: closed"), 9_000, "ccxt:okx")
    assert (up.kind, up.from_ts, up.to_ts, up.reason) == ("reconnect", 6_500, 9_000, "back after 3 failed attempt(s)")
    assert '"last_error": "NetworkError: closed"' in up.detail
