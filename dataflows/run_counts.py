"""What each process of a run counted (trades in, rows written, peak memory, CPU time), and how
process 0 adds its peers' counts (files in the run directory) for the summary."""

from __future__ import annotations

import json
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sinks.clickhouse import SinkStats
from sinks.health import peak_rss_mb  # noqa: F401 - the summary's figure, here with the run's counts


@dataclass
class RunCounts:
    """What one process saw: rows its source partitions released and what its sink wrote."""

    trades_in: int = 0
    sink: SinkStats = field(default_factory=SinkStats)
    peak_rss_mb: float = 0.0  # of this process
    peer_rss_mb: dict = field(default_factory=dict)  # process index -> peak (over the run's phases)
    cpu_s: float = 0.0  # of this process, start-up included
    peer_cpu_s: dict = field(default_factory=dict)  # process index -> CPU seconds (the last phase's process)

    def add(self, other: "RunCounts", proc: int = 0) -> None:
        self.trades_in += other.trades_in
        if other.peak_rss_mb:
            self.peer_rss_mb[proc] = max(self.peer_rss_mb.get(proc, 0.0), other.peak_rss_mb)
        if other.cpu_s:
            self.peer_cpu_s[proc] = self.peer_cpu_s.get(proc, 0.0) + other.cpu_s
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
        return cls(d["trades_in"], SinkStats(**d["sink"]), d.get("peak_rss_mb", 0.0), cpu_s=d.get("cpu_s", 0.0))


def cpu_s() -> float:
    """CPU time (user + system) of this process so far, in seconds."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def collect_counts(run_dir: Path, processes: int, mine: RunCounts) -> RunCounts:
    """Add the other processes' counts (their files in ``run_dir``) to ``mine``."""
    for i in range(1, processes):
        f = run_dir / f"proc-{i}.json"
        if f.exists():
            mine.add(RunCounts.from_json(f.read_text()), proc=i)
    return mine
