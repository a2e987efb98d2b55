"""Running a dataflow: one process in-process, or a cluster of processes on this machine.

``run_pipeline`` is what ``tapeflow run`` calls. With ``processes > 1`` the calling process is
process 0 and starts the others as ``tapeflow run ... --proc-id i --addresses ...``: every
process builds the same flow and takes its share of the source partitions. The ClickHouse sink
has one partition, so one process owns the store; each process writes its counters to the run
directory, and process 0 adds them up for the summary.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main, run_main

from sinks.clickhouse import SinkStats


@dataclass
class RunCounts:
    """What one process saw: rows its source partitions released and what its sink wrote."""

    trades_in: int = 0
    sink: SinkStats = field(default_factory=SinkStats)
    peak_rss_mb: float = 0.0  # of this process
    peer_rss_mb: dict = field(default_factory=dict)  # process index -> peak (over the run's phases)

    def add(self, other: "RunCounts", proc: int = 0) -> None:
        self.trades_in += other.trades_in
        if other.peak_rss_mb:
            self.peer_rss_mb[proc] = max(self.peer_rss_mb.get(proc, 0.0), other.peak_rss_mb)
        s, o = self.sink, other.sink
        for mine, theirs in ((s.rows, o.rows), (s.bars, o.bars), (s.counters, o.counters)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        s.late_trades += o.late_trades
        s.dead_letters += o.dead_letters
        s.trades_in_bars += o.trades_in_bars

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunCounts":
        d = json.loads(text)
        return cls(d["trades_in"], SinkStats(**d["sink"]), d.get("peak_rss_mb", 0.0))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def recovery_config(recovery_dir: Optional[Path], partitions: int) -> Optional[RecoveryConfig]:
    if recovery_dir is None:
        return None
    recovery_dir = Path(recovery_dir)
    recovery_dir.mkdir(parents=True, exist_ok=True)
    if not any(recovery_dir.glob("part-*.sqlite3")):
        init_db_dir(recovery_dir, max(1, partitions))
    return RecoveryConfig(str(recovery_dir))


def execute(flow: Dataflow, *, epoch_interval_s: float, recovery: Optional[RecoveryConfig],
            addresses: Optional[list[str]] = None, proc_id: int = 0, workers: int = 1) -> None:
    epoch = timedelta(seconds=epoch_interval_s)
    if not addresses and workers == 1:
        run_main(flow, epoch_interval=epoch, recovery_config=recovery)
    else:
        cluster_main(flow, addresses or [], proc_id, epoch_interval=epoch, recovery_config=recovery,
                     worker_count_per_proc=workers)


def spawn_peers(argv: list[str], processes: int, run_dir: Path) -> tuple[list[str], list[subprocess.Popen]]:
    """Start processes 1..N-1 of a cluster; returns the address list and the children."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(processes)]
    children = []
    for i in range(1, processes):
        cmd = [sys.executable, "-m", "dataflows.cli", *argv, "--proc-id", str(i),
               "--addresses", ";".join(addresses), "--run-dir", str(run_dir)]
        children.append(subprocess.Popen(cmd, env=os.environ.copy()))
    return addresses, children


def wait_peers(children: list[subprocess.Popen], timeout_s: float = 600) -> list[int]:
    deadline = time.time() + timeout_s
    codes = []
    for c in children:
        try:
            codes.append(c.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            c.kill()
            codes.append(-9)
    return codes


def collect_counts(run_dir: Path, processes: int, mine: RunCounts) -> RunCounts:
    """Add the other processes' counts (their files in ``run_dir``) to ``mine``."""
    for i in range(1, processes):
        f = run_dir / f"proc-{i}.json"
        if f.exists():
            mine.add(RunCounts.from_json(f.read_text()), proc=i)
    return mine


def counting_progress(counts: RunCounts, show: Optional[Callable[[str, int, int], None]]):
    """A source progress callback that also counts released rows."""

    def cb(part: str, done: int, total: int, rows: int = 0) -> None:
        counts.trades_in += rows
        if show is not None:
            show(part, done, total)

    return cb
