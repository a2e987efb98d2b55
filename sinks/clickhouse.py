"""The bytewax sink into ClickHouse: records turned into rows, buffered per table and written in
batches through the store (``sinks.store``), which retries transient errors.

An embedded store can be opened by one process at a time, which is why the sink is a
``FixedPartitionedSink`` with a single partition: whatever the number of workers and processes,
exactly one of them owns the store. Inserts run on a writer thread beside the worker (``_Partition``);
while an insert is retried the sink keeps its rows and, once its buffer is full, ``write_batch``
blocks, so bytewax stops pulling input (back-pressure) and nothing is lost.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from sinks.health import HEALTH_COLUMNS, HealthMeter
from sinks.rows import Rows, to_rows
from sinks.store import InsertHook, Store, one_line

log = logging.getLogger("tapeflow.store")


@dataclass
class SinkStats:
    """What the sink has written in this process (for the run summary)."""

    rows: dict = field(default_factory=dict)  # table -> rows written
    bars: dict = field(default_factory=dict)  # tf -> bars written
    counters: dict = field(default_factory=dict)  # name -> value (duplicates, ...)
    late_trades: int = 0
    dead_letters: int = 0
    trades_in_bars: int = 0  # trades counted into 1m bars
    store_error: str = ""  # the error of a final flush at close that failed (close cannot raise)


class _Partition(StatefulSinkPartition[Any, None]):
    """Buffers rows per table and hands them to a writer thread every ``flush_rows`` rows /
    ``flush_ms``, and at every epoch's snapshot, where it waits until they are stored.

    The thread (one, so a table's inserts keep their order) keeps the worker from waiting on the
    store: an embedded insert costs 5-20 ms per table and releases the GIL while ClickHouse works,
    so the dataflow runs on meanwhile (a flush of the main job's ~10 tables held the worker for
    50-190 ms, and a decision that came due behind it waited as long). At most one hand-off is
    in flight: a flush that comes due while the previous one is still writing keeps buffering, up
    to ``4 x flush_rows`` rows, then waits for it (back-pressure, as when the store retries). A
    failed hand-off (``StoreError``) is raised by the next ``write_batch`` or ``snapshot``, which
    ends the dataflow; the partition then only releases its client."""

    def __init__(self, open_store: Callable[[], Store], stats: SinkStats, flush_rows: int, flush_ms: int,
                 health: Optional[HealthMeter] = None, committer: Any = None):
        self.store = open_store()
        self.stats, self.flush_rows, self.flush_ms = stats, flush_rows, flush_ms
        self.health = health
        self.committer = committer  # source positions, committed once an epoch is stored (dataflows.kafka_source)
        self.buffer: dict[str, Rows] = {}
        self.buffered = 0
        self.first_at: float | None = None
        self.failed: Optional[BaseException] = None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapeflow-store")
        self.inflight: Optional[Future] = None
        self.unstored = 0  # rows of the hand-off in flight not yet stored (what a failure loses)

    def _add(self, table: str, rows: Rows) -> None:
        if table in self.buffer:
            self.buffer[table].data.extend(rows.data)
        else:
            self.buffer[table] = rows
        self.buffered += len(rows.data)

    def write_batch(self, values: list) -> None:
        if self.inflight is not None and self.inflight.done():
            self._wait()  # raises the error of a failed hand-off
        if self.committer is not None:
            self.committer.observe(values)
        for table, rows in to_rows(values, self.stats).items():
            self._add(table, rows)
        if self.health is not None:
            self.health.observe(values)
            if self.health.due():
                self._add("pipeline_health", Rows(HEALTH_COLUMNS, [self.health.row()]))
        if self.buffered and self.first_at is None:
            self.first_at = time.monotonic()
        due = self.buffered >= self.flush_rows or (
            self.first_at is not None and (time.monotonic() - self.first_at) * 1000 >= self.flush_ms)
        if due and (self.inflight is None or self.inflight.done() or self.buffered >= 4 * self.flush_rows):
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (after the previous hand-off is stored)."""
        self._wait()
        if self.buffer:
            batch, self.buffer, self.buffered, self.first_at = self.buffer, {}, 0, None
            self.unstored = sum(len(rows.data) for rows in batch.values())
            self.inflight = self.writer.submit(self._write, batch)

    def _write(self, batch: dict[str, Rows]) -> None:
        """On the writer thread: every table of one hand-off, in order."""
        for table, rows in batch.items():
            self.store.insert(table, rows)
            self.unstored -= len(rows.data)
            self.stats.rows[table] = self.stats.rows.get(table, 0) + len(rows.data)

    def _wait(self) -> None:
        """Until the hand-off in flight is stored; raises its error (and remembers it)."""
        if self.inflight is None:
            return
        try:
            self.inflight.result()
        except BaseException as err:
            self.failed = err
            raise
        self.inflight = None

    def snapshot(self) -> None:
        self.flush()
        self._wait()  # rows of a finished epoch are stored before its snapshot is committed
        if self.committer is not None:
            self.committer.commit()  # ... and before the source positions that made them
        return None

    def close(self) -> None:
        """Final flush (last health row, rows not yet flushed), then release the client. Never raises.

        bytewax 0.21 calls ``close`` only from the partition's Rust ``Drop``, which also runs while
        the worker unwinds after an error raised anywhere in the dataflow, this sink's own included.
        An exception here is then a panic during a panic: Rust aborts the process, the original
        error is lost, and (until ``sinks.store._default_fatal_signals``) chdb held the aborted process asleep
        for 5 minutes. So after a failed flush nothing is retried, and a failure here is logged and
        recorded in ``SinkStats.store_error`` instead of raised."""
        try:
            if self.failed is None:
                if self.health is not None:
                    self._add("pipeline_health", Rows(HEALTH_COLUMNS, [self.health.row()]))
                self.flush()  # positions are committed at snapshots only: here an epoch may be unfinished
                self._wait()
        except Exception as err:  # noqa: BLE001 - see the docstring: raising here aborts the process
            self.stats.store_error = one_line(err)
            log.error("ClickHouse sink: the final flush failed, %d rows not stored: %s", self.buffered + self.unstored,
                      one_line(err))
        finally:
            try:
                self.writer.shutdown(wait=True)
                self.store.close()
                if self.committer is not None:
                    self.committer.close()
            except Exception:  # noqa: BLE001 - nothing left to lose
                pass


class ClickHouseSink(FixedPartitionedSink[Any, None]):
    """Writes records (bars, late trades, dead letters, ...) in batches; one partition.

    ``retry_s``: retry bound of the store (None: ``default_retry_s()``); ``insert_hook``: test seam;
    ``committer``: commits source positions once their epoch is stored (``dataflows.kafka_source.OffsetCommitter``)."""

    def __init__(self, dsn: str, database: str, stats: SinkStats | None = None,
                 flush_rows: int = 5_000, flush_ms: int = 1_000, health_every_s: Optional[float] = None,
                 process: int = 0, retry_s: Optional[float] = None, insert_hook: Optional[InsertHook] = None,
                 committer: Any = None):
        self.committer = committer
        self.dsn, self.database = dsn, database
        self.stats = stats if stats is not None else SinkStats()
        self.flush_rows, self.flush_ms = flush_rows, flush_ms
        self.health_every_s, self.process = health_every_s, process
        self.retry_s, self.insert_hook = retry_s, insert_hook

    def list_parts(self) -> list[str]:
        return ["clickhouse"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Partition:
        health = HealthMeter(self.health_every_s, self.process) if self.health_every_s else None
        return _Partition(lambda: Store(self.dsn, self.database, retry_s=self.retry_s, insert_hook=self.insert_hook),
                          self.stats, self.flush_rows, self.flush_ms, health, self.committer)
