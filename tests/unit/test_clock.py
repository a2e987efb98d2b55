"""Unit tests for dataflows/clock.py (PacedEventClock) with a fake system clock: no sleeping.

Event time E0 is far behind system time S0 on purpose (a replay of old trades): the clock must
work on the difference, never on the absolute gap between the two."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from bytewax.operators.windowing import UTC_MAX, UTC_MIN

from dataflows.clock import PacedEventClock

E0 = datetime(2024, 1, 1, 0, 0, 10, tzinfo=timezone.utc)  # event time of the first item
S0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)  # system time when it arrives
WAIT = timedelta(seconds=2)


def s(x: float) -> timedelta:
    return timedelta(seconds=x)


class FakeNow:
    """A list-backed now_getter: ``now()`` returns the last element; ``set``/``advance`` move it."""

    def __init__(self, start: datetime):
        self.times = [start]

    def __call__(self) -> datetime:
        return self.times[-1]

    def advance(self, seconds: float) -> None:
        self.times.append(self.times[-1] + s(seconds))

    def set(self, t: datetime) -> None:
        self.times.append(t)


def make(pace, now: FakeNow):
    clock = PacedEventClock(ts_getter=lambda v: v, wait=WAIT, pace=pace, now_getter=now)
    return clock, clock.build(None)


def item(logic, ts: datetime):
    """What bytewax does per batch: before_batch, then on_item; returns the item's watermark."""
    logic.before_batch()
    got_ts, wm = logic.on_item(ts)
    assert got_ts == ts
    return wm


# ---------------------------------------------------------------------------------------------
# pace=None: event time only


def test_no_pace_never_schedules_and_moves_only_with_items():
    now = FakeNow(S0)
    _, logic = make(None, now)
    assert logic.on_notify() == UTC_MIN
    assert logic.to_system_utc(E0) is None

    assert item(logic, E0) == E0 - WAIT
    now.advance(3_600)  # an hour of system time: nothing moves
    assert logic.on_notify() == E0 - WAIT
    assert logic.to_system_utc(E0 + s(60)) is None
    assert logic.to_system_utc(E0 - s(60)) is None

    assert item(logic, E0 + s(30)) == E0 + s(28)
    assert item(logic, E0 + s(5)) == E0 + s(28)  # an older item does not pull it back
    assert logic.on_notify() == E0 + s(28)
    assert logic.on_eof() == UTC_MAX


# ---------------------------------------------------------------------------------------------
# pace=1.0: live


def test_pace_one_advances_with_system_time_after_the_newest_item():
    now = FakeNow(S0)
    _, logic = make(1.0, now)
    assert logic.on_notify() == UTC_MIN  # nothing seen yet: no guess
    assert logic.to_system_utc(E0) is None
    assert item(logic, E0) == E0 - WAIT
    now.advance(10)
    assert logic.on_notify() == E0 + s(8)
    now.advance(0.25)
    assert logic.on_notify() == E0 + s(8.25)


def test_pace_one_to_system_utc_is_exactly_when_the_watermark_gets_there():
    now = FakeNow(S0)
    _, logic = make(1.0, now)
    item(logic, E0)
    target = E0 + s(60)  # e.g. the end of a window
    at = logic.to_system_utc(target)
    # the watermark is E0 - 2 s at S0, so it reaches E0 + 60 s 62 s later
    assert at == S0 + s(62)
    now.set(at - timedelta(microseconds=1))
    assert logic.on_notify() < target
    now.set(at)
    assert logic.on_notify() == target


def test_pace_one_an_item_behind_the_running_watermark_does_not_reset_it():
    now = FakeNow(S0)
    _, logic = make(1.0, now)
    item(logic, E0)
    now.advance(62)  # watermark E0 + 60 s
    assert item(logic, E0 + s(30)) == E0 + s(60)  # candidate 28 s is behind: watermark unchanged
    now.advance(1)
    assert logic.on_notify() == E0 + s(61)  # still running from the first item
    # a newer item sets a new base
    assert item(logic, E0 + s(100)) == E0 + s(98)
    assert logic.to_system_utc(E0 + s(120)) == S0 + s(63) + s(22)
    now.advance(22)
    assert logic.on_notify() == E0 + s(120)


def test_system_clock_going_backwards_does_not_move_the_watermark_back():
    now = FakeNow(S0)
    _, logic = make(1.0, now)
    item(logic, E0)
    now.advance(10)
    assert logic.on_notify() == E0 + s(8)
    now.set(S0 + s(4))  # NTP step back
    assert logic.on_notify() == E0 + s(8)
    now.set(S0 + s(11))
    assert logic.on_notify() == E0 + s(9)


# ---------------------------------------------------------------------------------------------
# pace=k: replay at k times real speed


@pytest.mark.parametrize("pace", [4.0, 60.0, 0.5])
def test_pace_scales_the_advance_and_the_schedule(pace):
    now = FakeNow(S0)
    _, logic = make(pace, now)
    item(logic, E0)
    now.advance(2)  # 2 system seconds = 2 * pace event seconds
    assert logic.on_notify() == E0 - WAIT + s(2 * pace)
    target = E0 + s(238)  # 240 event seconds after the first watermark
    at = logic.to_system_utc(target)
    assert at == S0 + s(240 / pace)
    now.set(at)
    assert logic.on_notify() == target


# ---------------------------------------------------------------------------------------------
# restart from a snapshot


def test_after_resume_the_watermark_does_not_leap_over_the_downtime():
    now = FakeNow(S0)
    clock, logic = make(1.0, now)
    item(logic, E0)
    snap = logic.snapshot()
    now.advance(2 * 3_600)  # two hours down
    logic2 = clock.build(snap)
    wm = logic2.on_notify()
    assert E0 - WAIT <= wm < E0 + s(1)  # not E0 + 2 h
    now.advance(5)
    assert logic2.on_notify() == wm + s(5)  # and it runs on from the restart
    # the backlog read after the restart is not late
    assert item(logic2, E0 + s(60)) == E0 + s(58)


def test_after_resume_the_watermark_does_not_go_back():
    # the key was quiet for 30 s before the snapshot: the watermark had run on to E0 + 28 s and
    # windows ending by then were closed; a restart must not reopen them (a watermark is monotonic)
    now = FakeNow(S0)
    clock, logic = make(1.0, now)
    item(logic, E0)
    now.advance(30)
    before = logic.on_notify()
    assert before == E0 + s(28)
    snap = logic.snapshot()
    now.advance(2 * 3_600)
    logic2 = clock.build(snap)
    after = logic2.on_notify()
    assert before <= after < before + s(1)
    # a trade for an already closed stretch is still behind the watermark after the restart
    assert item(logic2, E0 + s(10)) >= before


def test_resume_without_pace_keeps_the_event_watermark():
    now = FakeNow(S0)
    clock, logic = make(None, now)
    item(logic, E0 + s(50))
    snap = logic.snapshot()
    now.advance(86_400)
    logic2 = clock.build(snap)
    assert logic2.on_notify() == E0 + s(48)
    assert logic2.to_system_utc(E0 + s(60)) is None
