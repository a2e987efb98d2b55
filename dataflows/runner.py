"""Running a dataflow: one process in-process, or a cluster of processes on this machine.

``run_pipeline`` is what ``tapeflow run`` calls. With ``processes > 1`` the calling process is
process 0 and starts the others as ``tapeflow run ... --proc-id i --addresses ...``: every
process builds the same flow and takes its share of the source partitions. The ClickHouse sink
has one partition, so one process owns the store; each process writes its counters to the run
directory, and process 0 adds them up for the summary.

Stopping: Ctrl-C (SIGINT) and SIGTERM (what ``docker compose stop`` sends) both stop a run the
same way. bytewax checks Python signals in its worker loop, so a Python handler that raises
``KeyboardInterrupt`` (``Stopped`` for SIGTERM) ends ``cli_main`` with that
exception in the error chain; the handler also passes SIGTERM on to the peer processes of a local
cluster, which run in their own session (a terminal's Ctrl-C reaches only process 0) and get
SIGTERM from the kernel should process 0 die without doing so (``PR_SET_PDEATHSIG``).

Python runs a signal handler only when the main thread runs Python code; while a cluster is still
connecting (timely waits in Rust for every process) it does not, and a peer that died before
connecting would leave process 0 waiting forever. A watchdog thread therefore also sees every
signal (``signal.set_wakeup_fd``) and every peer exit: it forwards the stop at once, and if the
dataflow is still running ``STOP_GRACE_S`` later it ends the process with a one-line message.
"""

from __future__ import annotations

import ctypes
import gc
import ctypes.util
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from dataflows import bytewax_errors
from dataflows.recovery_dir import held_fds
from dataflows.run_counts import RunCounts


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


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived: the run stops like after Ctrl-C, but this is a requested stop (exit 0)."""


class RecoveryMismatch(ValueError):
    """The recovery directory holds the state of another source."""


_stop_signal: Optional[int] = None
_raised = False  # the Python handler has raised its KeyboardInterrupt / Stopped
_children: list[subprocess.Popen] = []
_told_to_stop: set[int] = set()
_peer_index: dict[int, int] = {}  # pid -> process index in its cluster
_executing = False  # a dataflow is running in this process (execute)
_watchdog: Optional[threading.Thread] = None
_announce = True
STOP_GRACE_S = 15.0
SHUTDOWN_LIMIT_S = 120.0


def _forward_stop(children: Optional[list[subprocess.Popen]] = None) -> None:
    """SIGTERM, once, to every running peer (a second one would interrupt its own stopping)."""
    for c in _children if children is None else children:
        if c.poll() is None and c.pid not in _told_to_stop:
            _told_to_stop.add(c.pid)
            try:
                c.send_signal(signal.SIGTERM)
            except OSError:
                pass


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Raise once: a repeated signal would interrupt the stop that is under way (the watchdog
    still ends a stop that does not finish)."""
    global _stop_signal, _raised
    _stop_signal = _stop_signal or signum
    _forward_stop()
    if _raised:
        return
    _raised = True
    raise Stopped() if _stop_signal == signal.SIGTERM else KeyboardInterrupt()


def install_stop_handlers(announce: bool = True) -> None:
    """SIGINT and SIGTERM stop the run, and the watchdog makes sure they do (see the module
    docstring); main thread only. ``announce``: say so when a stop takes more than a few seconds
    (not in the peers of a local cluster: process 0 speaks for them)."""
    global _watchdog, _announce
    _announce = announce
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    if _watchdog is None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        _watchdog = threading.Thread(target=_watch, args=(r,), name="stop-watchdog", daemon=True)
        _watchdog.start()


def _watch(wakeup_fd: int) -> None:
    """See the module docstring. Signals arrive as their numbers on ``wakeup_fd``; a peer exiting
    with an error is seen by polling. Either starts a grace period: ``STOP_GRACE_S`` for the main
    thread to take the stop (the Python handler ran, or the dataflow returned), then, while the
    dataflow winds down (a cluster's workers finish the step they are in: seconds, more when
    processes exchange a backlog), up to ``SHUTDOWN_LIMIT_S``. Past either, the process ends."""
    global _stop_signal
    started: Optional[float] = None
    what = ""
    announced = False
    while True:
        ready, _, _ = select.select([wakeup_fd], [], [], 0.5)
        signums = [n for n in (os.read(wakeup_fd, 64) if ready else b"") if n in (signal.SIGINT, signal.SIGTERM)]
        if signums:
            if started is not None and _executing and signal.SIGINT in signums:
                _exit_now("interrupted again: quitting now, without a summary", 130)
            _stop_signal = _stop_signal or signums[0]
            _forward_stop()
        failed = [(_peer_index.get(c.pid, "?"), c.returncode) for c in _children if c.poll() not in (None, 0)]
        if started is None and (_stop_signal is not None or (failed and _executing)):
            started = time.time()
            if _stop_signal is not None:
                what = "stopped (SIGTERM)" if _stop_signal == signal.SIGTERM else "interrupted (Ctrl-C)"
            else:
                what = (f"pipeline process {failed[0][0]} ended with exit code {failed[0][1]} before the run finished "
                        "(any message of its own is above); the cluster cannot go on without it")
                _forward_stop()
        if not _executing:  # no dataflow running (or it returned): the main thread handles the stop
            started = None
            continue
        if started is None:
            continue
        waited = time.time() - started
        if waited > 3 and _raised and _announce and not announced:
            announced = True
            # fd 2, not sys.stderr: the live progress bar holds that one (from another thread)
            os.write(2, b"\nstopping: the pipeline finishes the step it is in (Ctrl-C again to quit now)\n")
        code = 130 if _stop_signal == signal.SIGINT else 0 if _stop_signal == signal.SIGTERM else 1
        if not _raised and waited > STOP_GRACE_S:
            _exit_now(what if _stop_signal is None else f"{what}: the pipeline did not take the stop within "
                      f"{STOP_GRACE_S:g} s (a cluster process not connected yet?); exited without a summary", code)
        if waited > SHUTDOWN_LIMIT_S:
            _exit_now(f"{what}: the pipeline did not stop within {SHUTDOWN_LIMIT_S:g} s; exited without a summary",
                      code)


def _exit_now(message: str, code: int) -> None:
    """The last resort of the watchdog: kill the peers, say why, end this process."""
    for c in _children:
        if c.poll() is None:
            c.kill()
    try:
        os.write(2, f"\n{message}\n".encode())  # fd 2: sys.stderr may be held by the live progress bar
        time.sleep(0.3)  # let the stderr filter pass on what it holds
    finally:
        os._exit(code)


def stop_requested() -> Optional[int]:
    """The signal that asked this process to stop (SIGINT or SIGTERM), if any. Once a stop is
    under way, an error from the dataflow (a peer that went away first) is part of the stop."""
    return _stop_signal


# -- recovery directories remember their source ----------------------------------------------------

SOURCE_FILE = "tapeflow-source.json"
# The layout of the state in bytewax snapshots: pickles name each class by its module, so a snapshot
# written before a class moved cannot be read after. Bump it whenever a snapshotted class moves or
# changes shape; a recovery directory of another layout is refused with a clear message.
# 1: up to the restructure of issue 15; 2: since (records, admission, rollups, optimizer/, ...).
STATE_LAYOUT = 2
_MIB = 1 << 20


def file_fingerprint(path: Path) -> dict:
    """Resolved path, size and sha256 of the first and last MiB: cheap on a large tape, and a
    different or rewritten file shows (an appended one shows by its size and tail)."""
    path = Path(path).resolve()
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            h.update(f.read(_MIB))
    return {"path": str(path), "size": size, "sha256_head_tail": h.hexdigest()}


def source_fingerprint(kind: str, **options: Any) -> dict:
    """What identifies a run's input, from its options: replay: ``files`` (+ exchange/symbol
    overrides); kafka: ``brokers``, ``topic``; synthetic: ``symbols``, ``start_ms``, ``hours``,
    ``seed``, ``rate`` (the whole run, not a phase's end: the main job's two phases share one
    recovery directory); ccxt: ``feeds``."""
    out: dict[str, Any] = {"kind": kind}
    for k, v in sorted(options.items()):
        out[k] = [file_fingerprint(p) for p in v] if k == "files" else v
    return out


def describe_source(fp: dict) -> str:
    kind = fp.get("kind")
    if kind == "replay":
        return "replay of " + ", ".join(f["path"] for f in fp.get("files", []))
    rest = ", ".join(f"{k}={v}" for k, v in fp.items() if k != "kind" and v is not None)
    return f"{kind} ({rest})"


def claim_recovery_dir(recovery_dir: Path, fingerprint: dict) -> None:
    """Record which source ``recovery_dir`` belongs to on first use; refuse another source after
    that (``RecoveryMismatch``): resuming a snapshot on other input would mix two runs' state."""
    recovery_dir = Path(recovery_dir)
    f = recovery_dir / SOURCE_FILE
    if f.exists():
        try:
            mine = json.loads(f.read_text())
        except (OSError, ValueError):
            raise RecoveryMismatch(f"recovery directory {recovery_dir}: {f.name} is unreadable; "
                                   "delete the directory to start over") from None
        layout = mine.pop("state_layout", 1)
        if layout != STATE_LAYOUT:
            raise RecoveryMismatch(
                f"recovery directory {recovery_dir} holds state saved by another version of tapeflow (state "
                f"layout {layout}, this version reads {STATE_LAYOUT}); use another --recovery-dir, or delete it "
                "to start over")
        if mine != fingerprint:
            differs = ""
            if mine.get("kind") == fingerprint.get("kind"):
                keys = sorted(k for k in set(mine) | set(fingerprint) if mine.get(k) != fingerprint.get(k))
                differs = f" (they differ in {', '.join(keys)})"
            raise RecoveryMismatch(
                f"recovery directory {recovery_dir} holds the state of {describe_source(mine)}, not of this run's "
                f"{describe_source(fingerprint)}{differs}; use another --recovery-dir (or delete it to start over)")
        return
    recovery_dir.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**fingerprint, "state_layout": STATE_LAYOUT}, indent=2))
    tmp.replace(f)  # atomic: processes of one cluster may claim at once (same content)


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
    """Run ``flow`` here through ``bytewax.run.cli_main`` (one worker, or this process's workers of a
    cluster; the peers of a local cluster are started by ``spawn_peers``). An error
    that reaches the caller as a bare panic carries the original exception as its cause when
    bytewax made one (``dataflows.bytewax_errors.with_lost_cause``)."""
    global _executing
    epoch = timedelta(seconds=epoch_interval_s)
    bytewax_errors.remember_bytewax_errors()
    bytewax_errors.forget_bytewax_errors()
    _executing = True
    # what exists now (modules, models, configs) lives for the whole run: out of the collector's way,
    # a full collection walks only what the run makes (it paused a decision by ~65 ms before)
    gc.collect()
    gc.freeze()
    try:
        if not addresses and workers == 1:  # bytewax's production entry point (what `python -m bytewax.run` calls)
            cli_main(flow, epoch_interval=epoch, recovery_config=recovery)
        else:  # this process's share of a cluster (process_id given: no spawning of its own)
            cli_main(flow, workers_per_process=workers, process_id=proc_id, addresses=addresses or None,
                     epoch_interval=epoch, recovery_config=recovery)
    except BaseException as err:
        raise bytewax_errors.with_lost_cause(err)
    finally:
        _executing = False
        gc.unfreeze()


def _die_with_parent() -> None:
    """In a peer, between fork and exec: SIGTERM when process 0 dies, however it dies (Linux)."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


_libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
_prctl = ctypes.CDLL(_libc, use_errno=True).prctl if _libc else None


def spawn_peers(argv: list[str], processes: int, run_dir: Path) -> tuple[list[str], list[subprocess.Popen]]:
    """Start processes 1..N-1 of a cluster; returns the address list and the children.

    Peers run in their own session (a terminal's Ctrl-C goes to process 0 only, which passes the
    stop on as SIGTERM: one way to stop, whatever the signal), die with process 0, and share its
    hold on the recovery directory (``dataflows.recovery_dir.hold``)."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(processes)]
    children = []
    for i in range(1, processes):
        cmd = [sys.executable, "-m", "cli.main", *argv, "--proc-id", str(i),
               "--addresses", ";".join(addresses), "--run-dir", str(run_dir)]
        children.append(subprocess.Popen(cmd, env=os.environ.copy(), stderr=sys.stderr, start_new_session=True,
                                          preexec_fn=_die_with_parent, pass_fds=held_fds()))
        _peer_index[children[-1].pid] = i
    _children.extend(children)
    if _stop_signal is not None:  # a stop arrived while they were starting
        _forward_stop()
    return addresses, children


RELEASE_FILE = "released"


def release_peers(phase_dir: Path, children: list[subprocess.Popen]) -> None:
    """Let the local peers of a phase go on (``await_release``): process 0 calls it once it is about
    to run the phase's dataflow itself, so no peer meets an error that process 0 met first."""
    if children:
        (phase_dir / RELEASE_FILE).touch()


def await_release(phase_dir: Path, poll_s: float = 0.01) -> None:
    """In a local peer, before anything process 0 has not checked already: wait until process 0
    releases the phase. A process 0 that ends first takes the peer with it (SIGTERM on its death,
    ``_die_with_parent``; the peer has no stop handler yet), and a peer whose parent changed (it was
    gone before the peer could ask to follow it) ends itself."""
    parent = os.getppid()
    while not (phase_dir / RELEASE_FILE).exists():
        if os.getppid() != parent:
            raise SystemExit(1)
        time.sleep(poll_s)


def wait_peers(children: list[subprocess.Popen], timeout_s: float = 600) -> list[int]:
    """Exit codes of the peers, killing any still running after ``timeout_s``."""
    deadline = time.time() + timeout_s
    codes = []
    for c in children:
        try:
            codes.append(c.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
            codes.append(-9)
    return codes


def stop_peers(children: list[subprocess.Popen], timeout_s: float = 20) -> list[int]:
    """Ask running peers to stop (SIGTERM; they stop like process 0 does) and wait for them; a
    peer that has not stopped within ``timeout_s`` is killed. No process outlives this."""
    _forward_stop(children)
    return wait_peers(children, timeout_s)


def counting_progress(counts: RunCounts, show: Optional[Callable[[str, int, int], None]]):
    """A source progress callback that also counts released rows."""

    def cb(part: str, done: int, total: int, rows: int = 0) -> None:
        counts.trades_in += rows
        if show is not None:
            show(part, done, total)

    return cb
