"""ClickHouse storage: client from a DSN, idempotent schema, batched writes, and the bytewax sink.

The DSN is ``chdb:///abs/path`` for the embedded engine (the default) or ``http(s)://user:pw@host:port``
for a server; both go through clickhouse-connect. An embedded store can be opened by one process
at a time, which is why the sink is a ``FixedPartitionedSink`` with a single partition: whatever
the number of workers and processes, exactly one of them owns the store.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import clickhouse_connect
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from sinks.health import HEALTH_COLUMNS, HealthMeter
from sinks.rows import Rows, to_rows

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "infra" / "clickhouse"


class StoreError(RuntimeError):
    pass


def redact_dsn(dsn: str) -> str:
    """The DSN with its password masked: in the user info (//user:pw@) and in query parameters
    whose name looks secret (?password=..., &access_token=...)."""
    dsn = re.sub(r"//([^:/@]+):([^@]*)@", r"//\1:***@", dsn)
    return re.sub(r"(?i)([?&][^=&#]*(?:password|passwd|secret|token|key)[^=&#]*=)[^&#]*", r"\1***", dsn)


class Store:
    """A clickhouse-connect client bound to one database, with the schema applied."""

    def __init__(self, dsn: str, database: str, apply_schema: bool = True):
        self.dsn, self.database = dsn, database
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
            raise StoreError(f"database name {database!r} must be an identifier")
        try:
            admin = clickhouse_connect.get_client(dsn=dsn)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            admin.close()
            self.client = clickhouse_connect.get_client(dsn=dsn, database=database)
        except Exception as err:  # noqa: BLE001 - turn driver errors into one clear message
            hint = ""
            if "lock" in str(err).lower() or "already initialized" in str(err):
                hint = (" The embedded store is open in another process (a running `tapeflow run`?);"
                        " wait for it, or use a ClickHouse server DSN for concurrent access.")
            raise StoreError(f"cannot open ClickHouse at {redact_dsn(dsn)}: {err}.{hint}") from err
        if apply_schema:
            self.apply_schema()

    def apply_schema(self, schema_dir: Path = SCHEMA_DIR) -> None:
        for path in sorted(schema_dir.glob("*.sql")):
            for stmt in _statements(path.read_text()):
                self.client.command(stmt)

    def insert(self, table: str, rows: Rows) -> None:
        if rows.data:
            self.client.insert(table, rows.data, column_names=rows.columns)

    def query(self, sql: str, parameters: Optional[dict] = None) -> tuple[list[str], list[tuple]]:
        res = self.client.query(sql, parameters=parameters)
        return list(res.column_names), list(res.result_rows)

    def command(self, sql: str) -> Any:
        return self.client.command(sql)

    def close(self) -> None:
        self.client.close()


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


@dataclass
class SinkStats:
    """What the sink has written in this process (for the run summary)."""

    rows: dict = field(default_factory=dict)  # table -> rows written
    bars: dict = field(default_factory=dict)  # tf -> bars written
    counters: dict = field(default_factory=dict)  # name -> value (duplicates, ...)
    late_trades: int = 0
    dead_letters: int = 0
    trades_in_bars: int = 0  # trades counted into 1m bars


class _Partition(StatefulSinkPartition[Any, None]):
    def __init__(self, open_store: Callable[[], Store], stats: SinkStats, flush_rows: int, flush_ms: int,
                 health: Optional[HealthMeter] = None):
        self.store = open_store()
        self.stats, self.flush_rows, self.flush_ms = stats, flush_rows, flush_ms
        self.health = health
        self.buffer: dict[str, Rows] = {}
        self.buffered = 0
        self.first_at: float | None = None

    def _add(self, table: str, rows: Rows) -> None:
        if table in self.buffer:
            self.buffer[table].data.extend(rows.data)
        else:
            self.buffer[table] = rows
        self.buffered += len(rows.data)

    def write_batch(self, values: list) -> None:
        for table, rows in to_rows(values, self.stats).items():
            self._add(table, rows)
        if self.health is not None:
            self.health.observe(values)
            if self.health.due():
                self._add("pipeline_health", Rows(HEALTH_COLUMNS, [self.health.row()]))
        if self.buffered and self.first_at is None:
            self.first_at = time.monotonic()
        if self.buffered >= self.flush_rows or (
            self.first_at is not None and (time.monotonic() - self.first_at) * 1000 >= self.flush_ms
        ):
            self.flush()

    def flush(self) -> None:
        for table, rows in self.buffer.items():
            self.store.insert(table, rows)
            self.stats.rows[table] = self.stats.rows.get(table, 0) + len(rows.data)
        self.buffer, self.buffered, self.first_at = {}, 0, None

    def snapshot(self) -> None:
        self.flush()  # rows of a finished epoch are stored before its snapshot is committed
        return None

    def close(self) -> None:
        if self.health is not None:
            self._add("pipeline_health", Rows(HEALTH_COLUMNS, [self.health.row()]))
        self.flush()
        self.store.close()


class ClickHouseSink(FixedPartitionedSink[Any, None]):
    """Writes records (bars, late trades, dead letters, ...) in batches; one partition."""

    def __init__(self, dsn: str, database: str, stats: SinkStats | None = None,
                 flush_rows: int = 5_000, flush_ms: int = 1_000, health_every_s: Optional[float] = None,
                 process: int = 0):
        self.dsn, self.database = dsn, database
        self.stats = stats if stats is not None else SinkStats()
        self.flush_rows, self.flush_ms = flush_rows, flush_ms
        self.health_every_s, self.process = health_every_s, process

    def list_parts(self) -> list[str]:
        return ["clickhouse"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Partition:
        health = HealthMeter(self.health_every_s, self.process) if self.health_every_s else None
        return _Partition(lambda: Store(self.dsn, self.database), self.stats, self.flush_rows, self.flush_ms,
                          health)
