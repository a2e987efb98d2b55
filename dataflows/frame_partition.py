"""The source partitions' shared base: ``FramePartition`` releases frames as ``FrameBatch``es,
paced by ``Pacer``.

Every source is a ``FixedPartitionedSource`` (recovery-safe) that hands over batches: ``FrameBatch``
of columns. A partition's snapshot is its position, so a restarted flow continues exactly where the
last completed epoch left it.

Pacing: ``speed=None`` (or 0) emits as fast as the pipeline takes it; ``speed=k`` releases
trades when their event time is due at k times real time, sleeping through ``next_awake``
instead of blocking the worker.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np
import polars as pl
from bytewax.inputs import StatefulSourcePartition

from operators.records import FrameBatch

Progress = Callable[[str, int, int, int], None]  # (partition, done, total, rows released now)


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (a batch's arrival time)."""
    return time.time_ns() // 1_000_000


class Pacer:
    """Maps event time to wall time at ``speed`` x real time, anchored at the first trade."""

    def __init__(self, speed: Optional[float], anchor_event_ms: Optional[int] = None):
        self.speed = speed or None
        self.anchor_event_ms = anchor_event_ms  # None: the first trade's
        self.anchor: Optional[tuple[float, int]] = None  # (wall seconds, event ms)

    def due_event_ms(self, first_event_ms: int) -> Optional[int]:
        if self.speed is None:
            return None
        if self.anchor is None:
            self.anchor = (time.time(), first_event_ms if self.anchor_event_ms is None else self.anchor_event_ms)
        wall0, ev0 = self.anchor
        return ev0 + int((time.time() - wall0) * 1000 * self.speed)

    def wall_for(self, event_ms: int) -> Optional[datetime]:
        if self.speed is None or self.anchor is None:
            return None
        wall0, ev0 = self.anchor
        return datetime.fromtimestamp(wall0 + (event_ms - ev0) / 1000 / self.speed, tz=timezone.utc)


_NO_ROWS = pl.DataFrame(schema={"exchange": pl.String, "symbol": pl.String, "id": pl.String, "ts": pl.Int64,
                                "price": pl.Float64, "amount": pl.Float64, "side": pl.String, "offset": pl.Int64})


def _event_ts(frame: pl.DataFrame) -> np.ndarray:
    return frame["ts"].cast(pl.Int64, strict=False).fill_null(-1).to_numpy()


class FramePartition(StatefulSourcePartition):
    """Releases the frames ``_load`` returns (columns ts and offset among them) as FrameBatches,
    paced when a speed is set: rows are released in file order up to the first row not yet due."""

    def __init__(self, source_name: str, part: str, speed: Optional[float]):
        self.source_name, self.part = source_name, part
        self.pacer = Pacer(speed)
        self.pending: Optional[pl.DataFrame] = None

    def _load(self) -> Optional[pl.DataFrame]:
        raise NotImplementedError

    def _released(self, frame: pl.DataFrame) -> None:
        raise NotImplementedError

    def next_batch(self) -> list[FrameBatch]:
        if self.pending is None:
            self.pending = self._load()
            if self.pending is None:
                rest = self._take_events(final=True)  # e.g. perp data after the last trade
                if rest:
                    return [FrameBatch(self.source_name, self.part, _NO_ROWS, now_ms(), rest)]
                raise StopIteration
        frame, ts = self.pending, _event_ts(self.pending)
        n = frame.height
        if n and self.pacer.speed is not None:
            due = self.pacer.due_event_ms(int(ts[0]))
            not_due = ts > due
            n = int(np.argmax(not_due)) if not_due.any() else frame.height
        ready, rest = frame.slice(0, n), frame.slice(n)
        self.pending = rest if rest.height else None
        if ready.height == 0:
            return []
        self._released(ready)
        return [FrameBatch(self.source_name, self.part, ready, now_ms(), self._take_events())]

    def _take_events(self, final: bool = False) -> list:
        """Events to attach to the next released batch (none by default); ``final``: the input has
        ended, give everything still held."""
        return []

    def next_awake(self) -> Optional[datetime]:
        if self.pending is not None:
            return self.pacer.wall_for(int(_event_ts(self.pending.head(1))[0]))  # only the next row
        return None

