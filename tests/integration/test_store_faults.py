"""A store that fails (issue 11): transient errors are retried without losing a row, permanent ones
and a store that stays down end the run at once / at the retry bound, with the store's own error in
one line and a non-zero exit; no process outlives its failure.

In-process tests drive the real pipeline into the real embedded store through the test seam
(``Store(insert_hook=...)``: whatever the hook raises is handled like an error of the store). The CLI
tests break a real store: a read-only one and a server port where nothing listens.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bytewax.errors import BytewaxRuntimeError
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, ProgrammingError

from cli.errors import describe
from dataflows.bytewax_errors import original
from dataflows.runner import free_ports
from sinks.clickhouse import ClickHouseSink, SinkStats
from sinks.embedded import embedded_holder, embedded_open
from sinks.store import StoreError, is_transient
from tests.helpers import WALL, raw_batches, run_pipeline, settings, stored, synthetic_tape

REPO = Path(__file__).resolve().parents[2]
RESET = "Error ('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer')) executing HTTP request"
TOO_MANY_PARTS = ("Code: 252. DB::Exception: Too many parts (3001 with average size of 1.00 KiB) in table "
                  "'tapeflow.bars'. Merges are processing significantly slower than inserts. (TOO_MANY_PARTS)")
TYPE_MISMATCH = "Code: 53. DB::Exception: Type mismatch in VALUES section. (TYPE_MISMATCH)"


@pytest.mark.parametrize("err, transient", [
    (OperationalError("Error HTTPConnectionPool(host='127.0.0.1', port=1): Connection refused"), True),
    (OperationalError(RESET), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (TimeoutError("timed out"), True),
    (DatabaseError(TOO_MANY_PARTS, code=252), True),
    (DatabaseError("Code: 159. Timeout exceeded (TIMEOUT_EXCEEDED)", code=159), True),
    (DatabaseError("HTTP driver received HTTP status 503, server response: upstream unavailable"), True),
    (DatabaseError(TYPE_MISMATCH, code=53), False),
    (DatabaseError("Code: 1001. DB::Exception: filesystem error: Read-only file system (STD_EXCEPTION)", code=1001),
     False),
    (DatabaseError("Code: 243. Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)", code=243), False),
    (DatabaseError("Code: 516. tapeflow: Authentication failed (AUTHENTICATION_FAILED)", code=516), False),
    (DatabaseError("Code: 164. Cannot execute query in readonly mode. (READONLY)", code=164), False),
    (DatabaseError("HTTP driver received HTTP status 401"), False),
    (ProgrammingError("Unable to open the chdb engine at '/x': already initialized"), False),
    (TypeError("an int where a string belongs"), False),
])
def test_transient_and_permanent_errors_are_told_apart(err, transient):
    assert is_transient(err) is transient


class Faults:
    """Test seam: the insert attempts numbered in ``fail`` fail like a flaky server (a reset
    connection and TOO_MANY_PARTS in turn), or every attempt fails with ``always``. Records what it
    failed."""

    def __init__(self, fail: set[int] = frozenset(), always: BaseException | None = None):
        self.fail, self.always = fail, always
        self.failed: list[str] = []
        self.attempts = 0

    def __call__(self, table: str, rows) -> None:
        self.attempts += 1
        if self.always is not None:
            self.failed.append(table)
            raise self.always
        if self.attempts in self.fail:
            self.failed.append(table)
            if len(self.failed) % 2:
                raise OperationalError(RESET)
            raise DatabaseError(TOO_MANY_PARTS, code=252, name="TOO_MANY_PARTS")


def _tape() -> list:
    """Two instruments for 2.5 h with jitter beyond the allowed lateness, a message that is not
    JSON and a duplicate: rows for every table the trading pipeline writes (bars ... fills, late
    trades, dead letters)."""
    msgs: list = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=150, rate=0.5,
                                jitter_ms=3000).drop("offset").to_dicts()
    msgs.insert(100, b"not json")
    msgs.insert(2000, msgs[1500])
    return raw_batches(msgs, size=500)


def _cfg(tmp_path):
    return settings(tmp_path, online_warmup_labels=5, arf_models=2,
                    strategy={"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": False,
                              "consensus_enabled": False})


TABLES = (("bars", "exchange, symbol, tf, start", ()),
          ("late_trades", "exchange, symbol, id", ("recv_ts",)),
          ("dead_letters", "source, partition, offset", ("recv_ts",)),
          ("features", "exchange, symbol, tf, start", ()),
          ("labels", "exchange, symbol, tf, start", ()),
          ("predictions", "exchange, symbol, tf, start, model", ()),
          ("decisions", "strategy_id, exchange, symbol, ts", WALL["decisions"]),
          ("fills", "strategy_id, position_id, ts, reason", ()),
          ("equity", "strategy_id, ts", ()),
          ("model_metrics", "exchange, symbol, model, ts", ()))


def test_injected_transient_insert_failures_are_retried_and_lose_nothing(store, other_store, tmp_path):
    items = _tape()
    clean = run_pipeline(items, store, _cfg(tmp_path / "a"))

    faults = Faults(fail={1, 2, 5, 9, 14, 20})  # twice in a row (a longer backoff), then spread over tables
    stats = SinkStats()
    # small flushes: many inserts, so the failures hit several tables; a bound far above the backoff
    sink = ClickHouseSink(other_store.dsn, other_store.database, stats, flush_rows=2_000, flush_ms=60_000,
                          retry_s=60, insert_hook=faults)
    started = time.monotonic()
    run_pipeline(items, other_store, _cfg(tmp_path / "b"), sink=sink)

    assert len(faults.failed) == 6 and len(set(faults.failed)) > 1  # every injected failure happened
    assert time.monotonic() - started < 60  # retried, not waited out to the bound
    assert stats.rows == clean.rows and stats.store_error == ""  # the sink wrote every row once
    for table, order, excl in TABLES:
        a, b = stored(store, table, order, excl), stored(other_store, table, order, excl)
        assert a.height > 0, table
        assert a.equals(b), f"{table} differs from the clean run"
    _, dups = other_store.query("SELECT count() FROM dead_letters")  # without FINAL: one row each
    assert dups[0][0] == stats.rows["dead_letters"]


def _failed_run(store, tmp_path, faults: Faults, retry_s: float) -> tuple[BaseException, float]:
    sink = ClickHouseSink(store.dsn, store.database, SinkStats(), flush_rows=2_000, flush_ms=60_000,
                          retry_s=retry_s, insert_hook=faults)
    items = raw_batches(synthetic_tape(["BTC/USDT:USDT"], minutes=60, rate=0.5).drop("offset").to_dicts(), size=500)
    started = time.monotonic()
    with pytest.raises(BytewaxRuntimeError) as info:
        run_pipeline(items, store, settings(tmp_path), sink=sink)
    return info.value, time.monotonic() - started


def test_a_permanent_insert_error_fails_the_run_at_once_with_the_stores_error(store, tmp_path):
    faults = Faults(always=DatabaseError(TYPE_MISMATCH, code=53, name="TYPE_MISMATCH"))
    err, took = _failed_run(store, tmp_path, faults, retry_s=30)
    assert faults.attempts == 1 and took < 20  # not retried (the bound is 30 s)
    assert isinstance(original(err), StoreError)
    message, code = describe(err)  # what the CLI prints
    assert code == 1 and "\n" not in message
    assert re.fullmatch(r"ClickHouse at chdb://\S+: insert into \w+ failed: " + re.escape(TYPE_MISMATCH), message)


def test_a_store_that_stays_down_fails_the_run_at_the_retry_bound(store, tmp_path):
    faults = Faults(always=OperationalError(RESET))
    err, took = _failed_run(store, tmp_path, faults, retry_s=2)
    assert 2 <= took < 15 and faults.attempts >= 3  # backoff 0.2, 0.4, 0.8 ... s until the bound
    message, code = describe(err)
    assert code == 1 and "\n" not in message
    assert re.search(r"insert into \w+ failed for 2 s \(\d+ attempts, store_retry_s=2\): ", message), message
    assert RESET in message


# --- through the CLI: real broken stores --------------------------------------------------------

def _tapeflow(*args: str, retry_s: float, wrap: list[str] | None = None, timeout: float = 180):
    """``tapeflow ARGS`` in a child process (chdb allows one store per process) with the retry bound
    set through the environment, as a supervisor would run it; returns (result, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPEFLOW_")}
    env.update(TAPEFLOW_STORE_RETRY_S=str(retry_s), RUST_BACKTRACE="0")
    cmd = [*(wrap or []), sys.executable, "-m", "cli.main", *args]
    started = time.monotonic()
    # the timeout only stops a regression (a hang) from stalling the suite: the asserts are far below it
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    return res, time.monotonic() - started


def _error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("Error:")]


RUN = ("run", "--hours", "1", "--rate", "1", "--train-split", "0", "--quiet")


def test_a_read_only_store_fails_the_run_at_once_with_the_stores_error(tmp_path):
    """The store is created first (schema and migrations recorded), then its tables' data
    directories are made read-only and `tapeflow run` writes into it: the first insert fails.

    How: tests run as root, and root ignores permission bits, so a chmod makes nothing read-only.
    A read-only bind mount does, for root too. ``unshare --user --map-root-user --mount`` gives the
    run a private mount namespace (as root, or as a user where unprivileged user namespaces are
    enabled), where each table directory is bind-mounted read-only onto itself: a real EROFS from
    the kernel, nothing to clean up, the host's mounts untouched. Only the table data is read-only,
    not the database metadata: the start (migrations already recorded, views recreated) succeeds
    and the failure happens where it used to hang, in the bytewax sink."""
    data = tmp_path / "data"
    made = subprocess.run([sys.executable, "-c", "from sinks.store import Store; "
                           f"Store('chdb://{data / 'clickhouse'}', 'tapeflow').close()"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    tables = sorted((data / "clickhouse" / "data" / "tapeflow").iterdir())
    assert {"bars", "fills", "schema_migrations"} <= {t.name for t in tables}
    mounts = "; ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"
                       for d in (shlex.quote(str(t.resolve())) for t in tables))
    # bound 30 s: a read-only disk is a permanent error, so the run must end long before it
    res, took = _tapeflow(*RUN, "--data-dir", str(data), retry_s=30,
                          wrap=["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                f'{mounts} && exec "$0" "$@"'])
    shown = f"exit {res.returncode} after {took:.1f} s\n--- stderr\n{res.stderr}\n--- stdout\n{res.stdout}"
    assert res.returncode == 1, shown
    assert took < 30, shown
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and "Read-only file system" in lines[0], shown
    assert re.match(r"Error: ClickHouse at chdb://\S+: insert into \w+ failed: Code: 1001\. ", lines[0]), shown
    assert "Traceback" not in res.stderr and "panic" not in res.stderr, shown


def test_an_unreachable_server_fails_the_run_at_the_retry_bound(tmp_path):
    """Nothing listens on the port: connection refused is transient, so the start retries it until
    the bound, then exits 1 with the driver's error. The bound is 3 s here (60 s by default) so the
    test takes seconds; 3 s still leaves room for several backoff attempts (0.2, 0.4, 0.8 ... s)."""
    port = free_ports(1)[0]
    res, took = _tapeflow(*RUN, "--data-dir", str(tmp_path), "--dsn", f"http://127.0.0.1:{port}", retry_s=3)
    shown = f"exit {res.returncode} after {took:.1f} s\n--- stderr\n{res.stderr}\n--- stdout\n{res.stdout}"
    assert res.returncode == 1, shown
    assert 3 <= took < 40, shown  # waited out the bound, then exited (start-up is the rest)
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, shown
    assert re.search(rf"ClickHouse at http://127\.0\.0\.1:{port}: open failed for 3 s \(\d+ attempts, "
                     r"store_retry_s=3\): .*Connection refused", lines[0]), shown
    assert "Traceback" not in res.stderr, shown


def test_a_store_open_in_another_process_is_named_with_its_pid(tmp_path):
    """The embedded store takes one process at a time. A second command on it says which process
    holds it, in one line, instead of chdb's "Error initializing EmbeddedServer" (the reason, a
    held lock, was only on chdb's own stderr line); once the holder ends, the same command works."""
    data = tmp_path / "data"
    hold = ("import sys; from sinks.store import Store; "
            f"s = Store('chdb://{data / 'clickhouse'}', 'tapeflow'); print('open', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    sql = ("sql", "--data-dir", str(data), "SELECT count() FROM bars")
    dsn = f"chdb://{data / 'clickhouse'}"
    assert embedded_open(dsn) is False  # not created yet
    try:
        assert holder.stdout.readline().strip() == "open"
        assert embedded_open(dsn) is True and embedded_holder(dsn) == holder.pid
        for args in (sql, (*RUN, "--data-dir", str(data))):
            res, _ = _tapeflow(*args, retry_s=30)
            shown = f"{args[0]}: exit {res.returncode}\n--- stderr\n{res.stderr}\n--- stdout\n{res.stdout}"
            assert res.returncode == 1, shown
            assert _error_lines(res.stderr) == [
                f"Error: the embedded store chdb://{data / 'clickhouse'} is open in another process (pid {holder.pid}: "
                "a running `tapeflow run`?); wait for it to end, or use a ClickHouse server DSN for concurrent access"
            ], shown
            assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, shown  # nothing of chdb's own
    finally:
        holder.stdin.close()
        holder.wait(60)
    assert embedded_open(dsn) is False and embedded_holder(dsn) is None  # its end released the lock
    assert embedded_open("http://localhost:8123") is None
    res, _ = _tapeflow(*sql, retry_s=30)
    assert res.returncode == 0, res.stderr
