"""A sink that stores nothing and only counts what reaches it (benchmarks: the pipeline without storage)."""

from __future__ import annotations

from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from sinks.clickhouse import SinkStats
from sinks.rows import count


class _Counting(StatelessSinkPartition[Any]):
    def __init__(self, stats: SinkStats):
        self.stats = stats

    def write_batch(self, items: list) -> None:
        for _, rec in items:
            count(self.stats, rec)


class NullSink(DynamicSink[Any]):
    def __init__(self, stats: SinkStats):
        self.stats = stats

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Counting:
        return _Counting(self.stats)
