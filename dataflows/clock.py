"""An event-time clock for bytewax windows that never busy-spins.

bytewax's ``EventClock`` lets the watermark advance with system time after the newest item,
so quiet keys still close their windows, but it only knows when to wake through a
``to_system_utc`` guess; with historical timestamps the guess lies in the past and the worker
spins (see ``notes/bytewax-0.21.md`` §2). ``PacedEventClock`` has the same watermark rule with
one extra knob, ``pace`` (event seconds per system second), and computes the exact system
time at which a window will close:

- ``pace=None``: event time only; the watermark moves only with items (replay, backfill,
  tests). Nothing is ever scheduled; windows close on later items or at EOF.
- ``pace=1.0``: live feeds; a quiet key's window closes ``wait`` after its end, on the wall
  clock, whatever the lag between event and system time.
- ``pace=k``: a replay at k times real speed.

After a restart from a snapshot the system-time anchor is reset to "now": the watermark does
not jump over the downtime, so the backlog read after a restart is not declared late.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional, Tuple, TypeVar

from bytewax.operators.windowing import UTC_MAX, UTC_MIN, Clock, ClockLogic

V = TypeVar("V")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _State:
    watermark_base: datetime  # event time: newest item ts - wait
    system_at_base: datetime  # system time when watermark_base was set


@dataclass
class _Logic(ClockLogic[V, _State]):
    ts_getter: Callable[[V], datetime]
    wait: timedelta
    pace: Optional[float]
    now_getter: Callable[[], datetime]
    state: _State
    _now: datetime = field(init=False)

    def __post_init__(self) -> None:
        self._now = self.now_getter()

    def _watermark(self) -> datetime:
        if self.pace is None or self.state.watermark_base <= UTC_MIN:
            return self.state.watermark_base
        return self.state.watermark_base + (self._now - self.state.system_at_base) * self.pace

    def before_batch(self) -> None:
        now = self.now_getter()
        if now > self._now:
            self._now = now

    def on_item(self, value: V) -> Tuple[datetime, datetime]:
        ts = self.ts_getter(value)
        watermark = self._watermark()
        candidate = ts - self.wait
        if candidate > watermark:
            self.state.watermark_base = candidate
            self.state.system_at_base = self._now
            return ts, candidate
        return ts, watermark

    def on_notify(self) -> datetime:
        self.before_batch()
        return self._watermark()

    def on_eof(self) -> datetime:
        return UTC_MAX

    def to_system_utc(self, timestamp: datetime) -> Optional[datetime]:
        if self.pace is None or self.state.watermark_base <= UTC_MIN:
            return None
        ahead = timestamp - self.state.watermark_base
        return self.state.system_at_base + ahead / self.pace

    def snapshot(self) -> _State:
        # the watermark as of now: a restart continues from it (neither back nor over the downtime)
        self.before_batch()
        return _State(self._watermark(), self._now)


@dataclass
class PacedEventClock(Clock[V, _State]):
    """Event-time clock; ``pace`` event seconds pass per system second after the newest item."""

    ts_getter: Callable[[V], datetime]
    wait: timedelta
    pace: Optional[float] = None
    now_getter: Callable[[], datetime] = utc_now

    def build(self, resume_state: Optional[_State]) -> _Logic[V]:
        now = self.now_getter()
        if resume_state is None:
            state = _State(UTC_MIN, now)
        else:  # do not let the watermark leap over the downtime
            state = _State(resume_state.watermark_base, now)
        return _Logic(self.ts_getter, self.wait, self.pace, self.now_getter, state)
