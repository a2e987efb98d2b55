"""A recovery directory kept sound: one run at a time, and no snapshot of an epoch no run finished.

**One run at a time** (``hold``). Two runs on one directory would write their snapshots over each
other's, and a run's start removes snapshots (below). The run's first process takes an exclusive
``flock`` on ``tapeflow.lock`` in the directory; the peers of a local cluster inherit it
(``held_fds``), so it is held until every process of the run has ended (a kill releases it). A
second run waits up to ``LOCK_WAIT_S`` for the processes of one just stopped or killed to end,
then is refused with ``RecoveryInUse``.

**No snapshot of an unfinished epoch** (``drop_unfinished_snapshots``). bytewax 0.21 writes an
epoch's state snapshots, then the epoch's frontier (``fronts``). A run killed between the two
leaves snapshots of an epoch it did not finish. The next run resumes from that epoch and writes
its snapshots again, but only for the keys it touches in it, and its epochs are cut by wall time,
so that epoch holds other items than before. Every other key keeps its stale snapshot. That run
does not read it (a run loads the newest snapshot *before* its resume epoch), but the run after it
does, once it resumes from a later epoch: state from beyond the source positions it resumes with.
Seen as a roll-up state holding the 1m bars up to minute 46 while the Kafka positions it resumed
from were at minute 27: the minutes between were counted twice in the 1h bar, and the open 5m and
15m bars were cut short (``tests/integration/test_recovery_dir.py`` reproduces it with bytewax
alone).

Before a run opens the directory, ``drop_unfinished_snapshots`` computes the resume epoch exactly
as bytewax does (``resume_from`` in bytewax's ``src/recovery.rs``: the newest execution; per
worker the larger of its written frontier and that execution's resume epoch; the smallest of
those) and deletes every snapshot at or after it. Nothing a run can load is lost: those are the
snapshots of epochs no worker finished, which the run executes again. It needs every partition, so
it runs in the process that holds the directory, before it starts its peers; a cluster over
several machines (``--addresses``), whose partitions are spread over them, goes without it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

log = logging.getLogger(__name__)

LOCK_FILE = "tapeflow.lock"
LOCK_WAIT_S = 20.0  # the processes of a run just stopped end within this (runner.STOP_GRACE_S + margin)
_held: list[int] = []  # the lock files this process holds


class RecoveryInUse(RuntimeError):
    """Another run holds the recovery directory."""


class RecoveryUnreadable(RuntimeError):
    """A partition file of the recovery directory is not a bytewax recovery database."""


def hold(recovery_dir: Path, wait_s: float = LOCK_WAIT_S, on_wait: Optional[Callable[[], None]] = None) -> None:
    """Take ``recovery_dir`` for this run until its processes end (see the module docstring);
    ``on_wait`` is called once if it has to wait."""
    recovery_dir = Path(recovery_dir)
    recovery_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(recovery_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held.append(fd)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RecoveryInUse(
                    f"recovery directory {recovery_dir} is in use by another tapeflow run (its processes were still "
                    f"running after {wait_s:g} s); stop that run first, or use another --recovery-dir") from None
        if on_wait is not None:
            on_wait()
            on_wait = None
        time.sleep(0.1)


def held_fds() -> tuple[int, ...]:
    """The lock files this process holds: the peers it starts inherit them (``subprocess`` ``pass_fds``)."""
    return tuple(_held)


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
    module docstring). None when there is nothing to resume, or when a partition is missing: bytewax
    then refuses the directory with its own message. ``RecoveryUnreadable`` for a partition file
    that is not a recovery database (bytewax would stop on it with a Rust panic)."""
    paths = sorted(Path(recovery_dir).glob("part-*.sqlite3"))
    if not paths:
        return None
    conns = [sqlite3.connect(p, timeout=30) for p in paths]
    try:
        counts, indexes, exs, fronts = set(), set(), [], []
        for path, c in zip(paths, conns):
            try:
                counts |= {r[0] for r in c.execute("SELECT DISTINCT part_count FROM parts")}
                indexes |= {r[0] for r in c.execute("SELECT part_index FROM parts")}
                exs += c.execute("SELECT ex_num, worker_count, resume_epoch FROM exs").fetchall()
                fronts += c.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts").fetchall()
            except sqlite3.DatabaseError as err:
                raise RecoveryUnreadable(f"recovery directory {recovery_dir}: {path.name} is not a bytewax recovery "
                                         f"database ({err}); use another --recovery-dir, or delete this one to start "
                                         "over") from None
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
