"""A sink that stores nothing and only counts what reaches it (benchmarks: the pipeline without storage)."""

from __future__ import annotations

from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from operators.bars import Bar
from operators.trades import Counter, DeadLetter, LateTrades
from sinks.clickhouse import SinkStats


class _Counting(StatelessSinkPartition[Any]):
    def __init__(self, stats: SinkStats):
        self.stats = stats

    def write_batch(self, items: list) -> None:
        s = self.stats
        for _, rec in items:
            if isinstance(rec, Bar):
                s.bars[rec.tf] = s.bars.get(rec.tf, 0) + 1
                if rec.tf == "1m":
                    s.trades_in_bars += rec.trades
            elif isinstance(rec, LateTrades):
                s.late_trades += rec.trades.height
            elif isinstance(rec, DeadLetter):
                s.dead_letters += 1
            elif isinstance(rec, Counter):
                s.counters[rec.name] = s.counters.get(rec.name, 0) + rec.value


class NullSink(DynamicSink[Any]):
    def __init__(self, stats: SinkStats):
        self.stats = stats

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Counting:
        return _Counting(self.stats)
