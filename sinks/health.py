"""Pipeline health, measured where every output passes: the sink. Every ``every_s`` of wall time
the sink adds a ``pipeline_health`` row: trades counted into 1m bars per second, bars, late
trades, dead letters, duplicates, watermark lag (wall clock minus the newest bar end), decision
latency percentiles (window close -> decision, from the decisions' latency_ms) and RSS.

It also carries progress (infra/clickhouse/008_liveness.sql): the watermark (newest 1m bar end
written so far), trades since start and the process start time. Rates alone cannot tell a stalled
pipeline from a quiet one; a watermark that stops moving can (``tapeflow health``, Grafana alerts).
A row is added when the sink writes and ``every_s`` has passed: a pipeline that emits nothing
writes no rows, which is itself the "pipeline silent" signal."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from operators.bars import Bar
from operators.decision import Decision
from operators.records import NamedCount, DeadLetter, LateTrades


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB: Linux's ``VmHWM``, the high-water mark of
    this program's own memory. Not ``ru_maxrss``: Linux carries that over ``exec``, so a process
    started from a bigger one (a peer from process 0, a run from a bench script holding its tape)
    reported its parent's peak when that was higher (a run started from a 5 GB script: 5,099 MB).
    Elsewhere: ``ru_maxrss``."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        m = None
    return int(m.group(1)) / 1024 if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

HEALTH_COLUMNS = ["ts", "process", "worker", "trades_in", "trades_per_s", "bars", "late_trades", "dead_letters",
                  "duplicates", "watermark_lag_ms", "decision_p50_ms", "decision_p95_ms", "decision_p99_ms",
                  "decisions", "rss_mb", "watermark", "trades_total", "started"]


@dataclass
class HealthMeter:
    every_s: float = 10.0
    process: int = 0
    worker: int = 0
    started: float = field(default_factory=time.time)
    last: float = field(default_factory=time.time)
    trades: int = 0
    bars: int = 0
    late: int = 0
    dead: int = 0
    dups: int = 0
    newest_end: Optional[int] = None  # the watermark: newest 1m bar end seen since start (never reset)
    trades_total: int = 0
    latencies: list = field(default_factory=list)

    def observe(self, records: list[Any]) -> None:
        for rec in records:
            if isinstance(rec, tuple) and len(rec) == 2 and isinstance(rec[0], str):
                rec = rec[1]
            if isinstance(rec, Bar):
                self.bars += 1
                if rec.tf == "1m":
                    self.trades += rec.trades
                    self.trades_total += rec.trades
                    self.newest_end = rec.end if self.newest_end is None else max(self.newest_end, rec.end)
            elif isinstance(rec, Decision):
                self.latencies.append(rec.latency_ms)
            elif isinstance(rec, LateTrades):
                self.late += rec.trades.height
            elif isinstance(rec, DeadLetter):
                self.dead += 1
            elif isinstance(rec, NamedCount) and rec.name == "duplicates":
                self.dups += rec.value

    def due(self, now: Optional[float] = None) -> bool:
        return (now if now is not None else time.time()) - self.last >= self.every_s

    def row(self, now: Optional[float] = None) -> list:
        """The row for the interval since the last one; resets the interval counters."""
        now = now if now is not None else time.time()
        span = max(now - self.last, 1e-9)
        lat = np.array(self.latencies, dtype=float)
        p50, p95, p99 = (np.percentile(lat, [50, 95, 99]).tolist() if len(lat) else (None, None, None))
        lag = now * 1000 - self.newest_end if self.newest_end is not None else None
        rss = peak_rss_mb()
        row = [int(now * 1000), self.process, self.worker, self.trades, self.trades / span, self.bars, self.late,
               self.dead, self.dups, lag, p50, p95, p99, len(lat), rss, self.newest_end, self.trades_total,
               int(self.started * 1000)]
        self.last = now
        self.trades = self.bars = self.late = self.dead = self.dups = 0
        self.latencies = []
        return row
