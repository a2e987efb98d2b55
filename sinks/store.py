"""The ClickHouse store: a client from a DSN, operations that retry transient errors, and the
versioned schema (migrations and views).

The DSN is ``chdb:///abs/path`` for the embedded engine (the default) or ``http(s)://user:pw@host:port``
for a server; both go through clickhouse-connect. An embedded store can be opened by one process
at a time (the sink, ``sinks.clickhouse``, therefore has a single partition).

Failures (issue 11): every store operation is retried with backoff while its error is *transient*
(connection refused/reset, timeouts, an overloaded server, ``TOO_MANY_PARTS``...; ``is_transient``)
for at most ``retry_s`` seconds (setting ``store_retry_s``, env ``TAPEFLOW_STORE_RETRY_S``, default
60 s). A *permanent* error (schema or type errors, a read-only or full disk, authentication) is not
retried. Either way the caller then gets a ``StoreError`` whose message is one line: the store (DSN,
password masked), the operation and the store's own error.

Schema (``infra/clickhouse/NNN_name.sql``, see ``schema_files``): a numbered file of tables and
ALTERs is a *migration*, applied once per store in version order and recorded in
``schema_migrations`` with its checksum; a file of ``CREATE OR REPLACE VIEW`` only is re-applied at
every start, after the migrations. A store made before migrations existed has no
``schema_migrations``: every migration is applied to it (they are idempotent by rule: ``IF NOT
EXISTS`` everywhere), which is what upgrades it in place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import tenacity

from models.lean_imports import import_chdb
from sinks.embedded import embedded_holder
from sinks.rows import Rows

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "infra" / "clickhouse"
RETRY_ENV = "TAPEFLOW_STORE_RETRY_S"
DEFAULT_RETRY_S = 60.0
MIGRATIONS_TABLE = "schema_migrations"

log = logging.getLogger("tapeflow.store")


class StoreError(RuntimeError):
    """The store cannot be used. The message is one line: the store, what failed and the store's
    own error (``cli.errors`` prints it as it is and exits 1)."""


# ClickHouse error codes that say "try again later", not "this will never work": timeouts, network,
# overload and replication hiccups. Anything else the server says (bad SQL, types, auth, READONLY,
# disk errors like "Read-only file system" or NOT_ENOUGH_SPACE) is permanent.
TRANSIENT_CODES = frozenset({
    95,   # CANNOT_READ_FROM_SOCKET
    96,   # CANNOT_WRITE_TO_SOCKET
    159,  # TIMEOUT_EXCEEDED
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY (a replica that lost its Keeper session; not a read-only disk)
    252,  # TOO_MANY_PARTS
    279,  # ALL_CONNECTION_TRIES_FAILED
    285,  # TOO_FEW_LIVE_REPLICAS
    289,  # REPLICA_IS_NOT_IN_QUORUM
    319,  # UNKNOWN_STATUS_OF_INSERT
    369,  # ALL_REPLICAS_ARE_STALE
    373,  # SESSION_IS_LOCKED
    439,  # CANNOT_SCHEDULE_TASK
    473,  # DEADLOCK_AVOIDED
    574,  # DISTRIBUTED_TOO_MANY_PENDING_BYTES
    745,  # SERVER_OVERLOADED
    999,  # KEEPER_EXCEPTION
})
_HTTP_5XX = re.compile(r"HTTP status 5\d\d")
# 0.2, 0.4, 0.8 ... s, at most 5 s, each plus up to 0.2 s of jitter (processes that lost the same
# server do not come back in step)
_BACKOFF = tenacity.wait_exponential(multiplier=0.2, max=5.0) + tenacity.wait_random(0, 0.2)


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` can help: a ClickHouse error with a code in ``TRANSIENT_CODES``; a
    transport error without a server code (refused, reset, timed out: clickhouse-connect's
    ``OperationalError``, or a bare ``ConnectionError``/``TimeoutError``); an HTTP 5xx from something in front of the server
    (a proxy's 502/503/504 carries no ClickHouse code). Everything else, our own bugs included, is
    permanent: retrying would only delay the error."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseDriverError  # imported on use: ~30 MB
    from clickhouse_connect.driver.exceptions import OperationalError

    if isinstance(err, ClickHouseDriverError):
        if err.code is not None:
            return err.code in TRANSIENT_CODES
        return isinstance(err, OperationalError) or bool(_HTTP_5XX.search(str(err)))
    return isinstance(err, (ConnectionError, TimeoutError))


def default_retry_s() -> float:
    """The retry bound when the caller passes none: ``TAPEFLOW_STORE_RETRY_S`` (the setting
    ``store_retry_s``, validated by ``dataflows.config``) or 60 s."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise StoreError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r} is not a number of seconds") from None


def redact_dsn(dsn: str) -> str:
    """The DSN with its password masked: in the user info (//user:pw@) and in query parameters
    whose name looks secret (?password=..., &access_token=...)."""
    dsn = re.sub(r"//([^:/@]+):([^@]*)@", r"//\1:***@", dsn)
    return re.sub(r"(?i)([?&][^=&#]*(?:password|passwd|secret|token|key)[^=&#]*=)[^&#]*", r"\1***", dsn)


def one_line(err: BaseException) -> str:
    """An error's text on one line (server errors span lines; a supervisor's log wants one)."""
    return " ".join(str(err).split()) or type(err).__name__


# An insert hook (the test seam): called as hook(table, rows) before every insert attempt; whatever
# it raises is handled like an error of the store (retried if ``is_transient``).
InsertHook = Callable[[str, Rows], None]


class Store:
    """A clickhouse-connect client bound to one database, with the schema applied.

    ``retry_s``: how long transient errors are retried (None: ``default_retry_s()``; 0: never).
    ``insert_hook``: test seam for fault injection (see ``InsertHook``)."""

    def __init__(self, dsn: str, database: str, apply_schema: bool = True, retry_s: Optional[float] = None,
                 insert_hook: Optional[InsertHook] = None):
        self.dsn, self.database = dsn, database
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
            raise StoreError(f"database name {database!r} must be an identifier")
        self.retry_s = default_retry_s() if retry_s is None else retry_s
        self.insert_hook = insert_hook
        holder = embedded_holder(dsn)
        if holder is not None:
            raise StoreError(f"the embedded store {redact_dsn(dsn)} is open in another process ("
                             f"{f'pid {holder}: ' if holder else ''}a running `tapeflow run`?); wait for it to end, "
                             "or use a ClickHouse server DSN for concurrent access")
        try:
            self.client = self._retry("open", self._connect, wrap=False)
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - turn driver errors into one clear message
            hint = ""
            if "lock" in str(err).lower() or "already initialized" in str(err):
                hint = (" The embedded store is open in another process (a running `tapeflow run`?);"
                        " wait for it, or use a ClickHouse server DSN for concurrent access.")
            raise StoreError(f"cannot open ClickHouse at {redact_dsn(dsn)}: {one_line(err)}.{hint}") from err
        if dsn.startswith("chdb:"):
            _default_fatal_signals()
        if apply_schema:
            self.apply_schema()

    def _connect(self):
        import clickhouse_connect  # imported on use: a run without a store does without it

        _without_pandas()
        if self.dsn.startswith("chdb:"):
            import_chdb()  # before clickhouse-connect imports it: without pyarrow
        client = clickhouse_connect.get_client(dsn=self.dsn)
        try:  # one connection: the database is made, then named as the client's default
            client.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        except BaseException:
            client.close()
            raise
        client.database = self.database
        return client

    def _retry(self, what: str, fn: Callable, *args: Any, wrap: bool = True) -> Any:
        """``fn(*args)``, retried while its error is transient (exponential backoff from 0.2 s up
        to 5 s, jittered) until ``retry_s`` has passed, with a last try at the bound. Gives up with
        ``StoreError`` then (the time is the bound plus that try's own duration);
        a permanent error is raised at once, as a ``StoreError`` if ``wrap``, else as it is (a bad
        query is the caller's mistake, not the store's)."""
        started = time.monotonic()

        def warn(state: tenacity.RetryCallState) -> None:
            if state.attempt_number == 1:
                log.warning("ClickHouse at %s: %s failed, retrying for up to %.0f s: %s", redact_dsn(self.dsn),
                            what, self.retry_s, one_line(state.outcome.exception()))

        def wait(state: tenacity.RetryCallState) -> float:  # the last wait ends at the bound: one try there
            return max(0.0, min(_BACKOFF(state), self.retry_s - (time.monotonic() - started)))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient), stop=tenacity.stop_after_delay(self.retry_s),
            wait=wait, before_sleep=warn, reraise=True)
        try:
            return retrying(fn, *args)
        except Exception as err:
            if is_transient(err):
                took = time.monotonic() - started
                raise StoreError(f"ClickHouse at {redact_dsn(self.dsn)}: {what} failed for {took:.0f} s "
                                 f"({retrying.statistics.get('attempt_number', 1)} attempts, store_retry_s="
                                 f"{self.retry_s:g}): {one_line(err)}") from err
            if wrap:
                raise StoreError(f"ClickHouse at {redact_dsn(self.dsn)}: {what} failed: {one_line(err)}") from err
            raise

    # --- schema -------------------------------------------------------------------------------
    def apply_schema(self, schema_dir: Path = SCHEMA_DIR) -> list[str]:
        """Bring the store to this version's schema: record-keeping table, then every migration the
        store has not recorded (in version order, each recorded once all its statements ran), then
        every view file. Returns the names of the migrations applied now.

        An applied migration whose file changed since is refused: its change would never reach this
        store (CREATE ... IF NOT EXISTS does nothing to an existing table); schema changes go into a
        new numbered file. Checksums ignore whitespace and comment lines."""
        files = schema_files(schema_dir)
        self._run_ddl(MIGRATIONS_TABLE, f"""
            CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
            (version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC'))
            ENGINE = ReplacingMergeTree(applied_at) ORDER BY version""")
        res = self._retry("read schema_migrations", self.client.query,
                          f"SELECT version, name, checksum FROM {MIGRATIONS_TABLE} FINAL")
        recorded = {int(v): (name, checksum) for v, name, checksum in res.result_rows}
        known = {f.version for f in files if not f.views}
        unknown = sorted(v for v in recorded if v not in known)
        if unknown:
            log.warning("store %s.%s has schema migrations this tapeflow does not know (%s): it was written by a "
                        "newer version", redact_dsn(self.dsn), self.database,
                        ", ".join(recorded[v][0] for v in unknown))
        applied = []
        for f in files:
            if f.views:
                continue
            if f.version in recorded:
                name, checksum = recorded[f.version]
                if checksum != f.checksum:
                    raise StoreError(
                        f"schema file {f.name} differs from migration {name} applied to {self.database} at "
                        f"{redact_dsn(self.dsn)} (checksum {checksum[:12]} recorded, {f.checksum[:12]} now): an applied "
                        "migration must not change; restore it and put the change in a new numbered file")
                continue
            for stmt in f.statements:
                self._run_ddl(f.name, stmt)
            self._retry(f"record migration {f.name}", self.client.insert, MIGRATIONS_TABLE,
                        [[f.version, f.name, f.checksum, datetime.now(timezone.utc)]],
                        ["version", "name", "checksum", "applied_at"])
            applied.append(f.name)
        if applied:
            log.info("store %s: applied schema migrations %s", self.database, ", ".join(applied))
        for f in files:
            if f.views:
                for stmt in f.statements:
                    self._run_ddl(f.name, stmt)
        return applied

    def _run_ddl(self, where: str, stmt: str) -> None:
        self._retry(f"schema {where} ({' '.join(stmt.split()[:6])} ...)", self.client.command, stmt)

    # --- reads and writes ------------------------------------------------------------------------
    def insert(self, table: str, rows: Rows) -> None:
        """Insert rows, retrying transient errors (a retry may store a row twice: every table is a
        ReplacingMergeTree keyed on the row's identity and read with FINAL, so it counts once)."""
        if rows.data:
            self._retry(f"insert into {table}", self._insert_once, table, rows)

    def _insert_once(self, table: str, rows: Rows) -> None:
        if self.insert_hook is not None:
            self.insert_hook(table, rows)
        self.client.insert(table, rows.data, column_names=rows.columns)

    def query(self, sql: str, parameters: Optional[dict] = None) -> tuple[list[str], list[tuple]]:
        res = self._retry("query", self.client.query, sql, parameters, wrap=False)
        return list(res.column_names), list(res.result_rows)

    def query_dicts(self, sql: str, parameters: Optional[dict] = None) -> list[dict]:
        """A query's rows as dicts keyed by column name."""
        cols, rows = self.query(sql, parameters)
        return [dict(zip(cols, r)) for r in rows]

    def command(self, sql: str) -> Any:
        return self._retry("command", self.client.command, sql, wrap=False)

    def close(self) -> None:
        self.client.close()


def _without_pandas() -> None:
    """clickhouse-connect imports pandas (if installed) at the first insert, to ask whether the rows
    are a DataFrame: ~0.4 s and ~60 MB resident in every process that writes. Rows here are always
    lists and reads are always tuples, so unless pandas is in the process already (training imports
    it), tell clickhouse-connect it has none (its lazily resolved ``options.pd``)."""
    import sys

    from clickhouse_connect.driver import options

    if "pandas" not in sys.modules and "pd" not in vars(options):
        options.pd = options.pd_time_test = None


def _default_fatal_signals() -> None:
    """Give SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGSYS back their default action (the
    process dies at once, exit 128+n).

    chdb starts an embedded ClickHouse, which installs ClickHouse's fatal-signal handlers: they hand
    the signal to a logging thread and then wait up to ~300 s for it before dying. In a tapeflow
    process that turned every abort (bytewax aborts on a panic inside a panic) into a process that
    slept for five minutes with ~50 threads: a supervisor saw neither an exit nor output. chdb
    installs them whenever its engine starts (the first open after every store was closed), so this
    runs after every embedded open. Through libc, because ``signal.signal`` works only on the main
    thread and the sink opens its store on a bytewax worker thread."""
    libc = ctypes.CDLL(None)
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal.restype = ctypes.c_void_p
    for sig in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGSYS):
        libc.signal(int(sig), None)  # None = NULL = SIG_DFL


# --- schema files ------------------------------------------------------------------------------
_FILE_NAME = re.compile(r"(\d+)_[A-Za-z0-9_-]+\.sql")
_VIEW = re.compile(r"CREATE\s+OR\s+REPLACE\s+VIEW\b", re.IGNORECASE)


@dataclass(frozen=True)
class SchemaFile:
    """One ``NNN_name.sql``: its statements and whether it is a views file (re-applied at every
    start) or a migration (applied once per store)."""

    version: int
    name: str
    statements: tuple[str, ...]
    views: bool

    @property
    def checksum(self) -> str:
        """sha256 of the statements with whitespace collapsed: re-indenting or editing a comment
        line does not change it; anything inside a statement does (an inline ``--`` comment too)."""
        text = ";\n".join(" ".join(s.split()) for s in self.statements)
        return hashlib.sha256(text.encode()).hexdigest()


def schema_files(schema_dir: Path = SCHEMA_DIR) -> list[SchemaFile]:
    """The schema files in version order, checked: names are ``NNN_name.sql`` with a version used
    once; a file holds either only ``CREATE OR REPLACE VIEW`` statements (a views file) or none
    (a migration: every statement idempotent, ``CREATE TABLE IF NOT EXISTS``, ``ALTER TABLE ... ADD
    COLUMN IF NOT EXISTS``, since one interrupted before it was recorded runs again)."""
    files, seen = [], {}
    for path in sorted(schema_dir.glob("*.sql")):
        m = _FILE_NAME.fullmatch(path.name)
        if not m:
            raise StoreError(f"schema file {path} is not named NNN_name.sql (NNN: its migration version)")
        version = int(m.group(1))
        if version in seen:
            raise StoreError(f"schema files {seen[version]} and {path.name} share version {m.group(1)}: "
                             "renumber one (the next free number)")
        seen[version] = path.name
        stmts = tuple(_statements(path.read_text()))
        views = [bool(_VIEW.match(s)) for s in stmts]
        if any(views) and not all(views):
            raise StoreError(f"schema file {path.name} mixes views with other statements: views are recreated at "
                             "every start, migrations run once; put them in separate files")
        files.append(SchemaFile(version, path.name, stmts, bool(stmts) and all(views)))
    return sorted(files, key=lambda f: f.version)


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
