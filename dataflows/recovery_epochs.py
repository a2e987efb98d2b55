"""Snapshots of epochs a stopped run did not finish, removed before its recovery directory is resumed.

bytewax 0.21 writes an epoch's state snapshots, then the epoch's frontier (``fronts``). A run killed
between the two leaves snapshots of an epoch it did not finish. The next run resumes from that
epoch and writes its snapshots again, but only for the keys it touches in it, and its epochs are
cut by wall time, so that epoch holds other items than before. Every other key keeps its stale
snapshot. That run does not read it (a run loads the newest snapshot *before* its resume epoch),
but the run after it does, once it resumes from a later epoch: state from beyond the source
positions it resumes with. Seen as a roll-up state holding the 1m bars up to minute 46 while the
Kafka positions it resumed from were at minute 27: the minutes between were counted twice in the
1h bar, and the open 5m and 15m bars were cut short (``tests/integration/test_recovery_epochs.py``
reproduces it with bytewax alone).

``drop_unfinished_snapshots`` computes the resume epoch exactly as bytewax does
(``resume_from`` in bytewax's ``src/recovery.rs``: the newest execution; per worker the larger of
its written frontier and that execution's resume epoch; the smallest of those) and deletes every
snapshot at or after it, before the run opens the directory. Nothing a run can load is lost:
the snapshots deleted are exactly those of epochs no worker finished, which the run re-executes.

It needs every partition of the directory, so it runs in the process that owns the directory
(one process, or process 0 of a cluster on this machine, before it starts the others).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dropped:
    """What ``drop_unfinished_snapshots`` removed: ``snapshots`` rows of epochs >= ``epoch``."""

    epoch: int
    snapshots: int


def resume_epoch(exs: Iterable[tuple[int, int, int]], fronts: Iterable[tuple[int, int, int]]) -> Optional[int]:
    """The epoch bytewax resumes from, given every partition's ``exs`` rows (ex_num, worker_count,
    resume_epoch) and ``fronts`` rows (ex_num, worker_index, worker_frontier); None before the
    first execution wrote its row.

    >>> resume_epoch([(0, 2, 1), (1, 2, 5)], [(1, 0, 9), (1, 1, 7), (0, 0, 5)])
    7
    >>> resume_epoch([(1, 2, 5)], [(1, 0, 9)])  # worker 1 wrote no frontier: its execution's resume epoch
    5
    """
    exs = list(exs)
    if not exs:
        return None
    ex_num, workers, resume = max(exs)
    progress = {w: resume for w in range(workers)}
    for ex, worker, frontier in fronts:
        if ex == ex_num:
            progress[worker] = max(progress.get(worker, resume), frontier)
    return min(progress.values())


def drop_unfinished_snapshots(recovery_dir: Path) -> Optional[Dropped]:
    """Delete the snapshots of every epoch at or after the one the next run resumes from (see the
    module docstring). None when there is nothing to resume, or when a partition is missing or
    unreadable: bytewax then refuses the directory with its own message."""
    paths = sorted(Path(recovery_dir).glob("part-*.sqlite3"))
    if not paths:
        return None
    conns = [sqlite3.connect(p, timeout=30) for p in paths]
    try:
        try:
            counts = {r[0] for c in conns for r in c.execute("SELECT DISTINCT part_count FROM parts")}
            indexes = {r[0] for c in conns for r in c.execute("SELECT part_index FROM parts")}
            exs = [r for c in conns for r in c.execute("SELECT ex_num, worker_count, resume_epoch FROM exs")]
            fronts = [r for c in conns for r in c.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts")]
        except sqlite3.DatabaseError:
            return None
        if len(counts) != 1 or indexes != set(range(next(iter(counts)))):
            return None
        epoch = resume_epoch(exs, fronts)
        if epoch is None:
            return None
        dropped = 0
        for c in conns:
            with c:  # one transaction per partition
                dropped += c.execute("DELETE FROM snaps WHERE snap_epoch >= ?", (epoch,)).rowcount
    finally:
        for c in conns:
            c.close()
    if dropped:
        log.info("recovery directory %s: dropped %d snapshot(s) of epochs >= %d, which the stopped run did not "
                 "finish (this run executes them again)", recovery_dir, dropped, epoch)
    return Dropped(epoch, dropped)
