"""Errors a person can act on (issue 10) and clean stops (issue 11), through the CLI as a user runs it.

Every user mistake below must give a non-zero exit (2 for a mistake in what was asked, 1 for a
failure), at most three lines of message naming what is wrong, and none of the Rust panic /
Python traceback text it used to bury that sentence in. They are all caught before a dataflow
starts, so each case takes only the CLI's start-up time. Ctrl-C and SIGTERM are sent to real runs
once their progress shows trades flowing.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import errors
from cli.stderr_noise import NativeNoise
from dataflows.bytewax_errors import is_wrapper
from dataflows import runner
from dataflows.config import ConfigError, load_settings, unknown_env_vars

NOISE = ("Traceback", "panicked", "PyRuntimeError", "BytewaxRuntimeError", "PanicException", "Box<dyn Any>",
         "RUST_BACKTRACE", "%3|")


def _env(**extra: str) -> dict:
    """The caller's environment without TAPEFLOW_* settings (RUST_BACKTRACE stays as it is: with it
    set, a panic would print a whole backtrace), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPEFLOW_")}
    return {**env, **extra}


def tapeflow(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env())


def message_lines(stderr: str) -> list[str]:
    """What the user reads, without the progress bar."""
    return [x for x in stderr.splitlines() if x.strip() and "━" not in x and not x.startswith("pipeline ")]


def assert_short_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    shown = f"exit {res.returncode}\n--- stderr\n{res.stderr}\n--- stdout\n{res.stdout}"
    assert res.returncode == code, shown
    assert 1 <= len(message_lines(res.stderr)) <= 3, shown
    for needle in needles:
        assert needle in res.stderr, f"{needle!r} missing\n{shown}"
    for bad in NOISE:
        assert bad not in res.stderr + res.stdout, f"{bad!r} shown\n{shown}"


@pytest.fixture(scope="module")
def tapes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tapes")
    (d / "ok.csv").write_text("timestamp,id,side,price,amount\n1704067200000,1,buy,100,1\n1704067201000,2,sell,101,2\n")
    (d / "other.csv").write_text("timestamp,id,side,price,amount\n1704067300000,7,buy,100,1\n")
    (d / "cols.csv").write_text("a,b,c\n1,2,3\n")
    (d / "empty.csv").write_text("")
    (d / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (d / "tape.txt").write_text("timestamp,id,side,price,amount\n")
    return d


# --- user mistakes: one or two lines, exit 2 (or 1 for a failure), no traceback -----------------------------

REPLAY = ("run", "--source", "replay", "--quiet")


@pytest.mark.parametrize("file,extra,needles", [
    ("ok.csv", (), ["ok.csv", "--exchange"]),                           # no exchange column, no --exchange
    ("cols.csv", ("--exchange", "x", "--symbol", "y"), ["cols.csv", "missing"]),
    ("empty.csv", ("--exchange", "x", "--symbol", "y"), ["empty.csv", "empty"]),
    ("binary.csv", ("--exchange", "x", "--symbol", "y"), ["binary.csv", "binary"]),
    ("tape.txt", ("--exchange", "x", "--symbol", "y"), ["tape.txt", ".csv"]),
])
def test_replay_file_mistakes(tmp_path, tapes, file, extra, needles):
    res = tapeflow(*REPLAY, "--data-dir", str(tmp_path), "--file", str(tapes / file), *extra)
    assert_short_error(res, 2, *needles)


@pytest.mark.parametrize("args,needles", [
    (("--speed", "-5"), ["--speed", "-5"]),
    (("--hours", "0"), ["--hours"]),
    (("--proc-id", "1"), ["--proc-id", "--addresses"]),
    (("--summary-json", "{tmp}/a-file/s.json"), ["--summary-json", "a-file"]),
    (("--dsn", "tcp://db:9000"), ["--dsn", "chdb:///"]),
    (("--source", "kafka", "--instruments", "BTC/USDT"), ["--instruments", "exchange:SYM1,SYM2"]),
])
def test_option_mistakes(tmp_path, args, needles):
    (tmp_path / "a-file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    assert_short_error(tapeflow("run", "--data-dir", str(tmp_path), *args), 2, *needles)


def test_a_trailing_semicolon_in_addresses_is_not_a_process_to_wait_for(tmp_path):
    # the check counted 1 address, the cluster was started with 2 (one empty) and waited for it forever
    (port,) = runner.free_ports(1)
    res = tapeflow("run", "--data-dir", str(tmp_path), "--hours", "0.2", "--rate", "1", "--train-split", "0",
                   "--quiet", "--proc-id", "0", "--addresses", f"127.0.0.1:{port};", timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"trades in\s+│\s+[1-9]", res.stdout)


@pytest.mark.parametrize("name,value,needles", [
    ("TAPEFLOW_STRATEGY", '{"conf_min": "high"}', ["TAPEFLOW_STRATEGY", "conf_min", "'high'"]),
    ("TAPEFLOW_STRATEGY", '{"conf_mn": 0.6}', ["TAPEFLOW_STRATEGY", "did you mean conf_min"]),
    ("TAPEFLOW_TIMEFRAMES", "1m,5m", ["TAPEFLOW_TIMEFRAMES", """TAPEFLOW_TIMEFRAMES='["1m", "5m"]'"""]),
    ("TAPEFLOW_STRATEGY", "conf_min=0.6", ["TAPEFLOW_STRATEGY", "JSON object", """'{"conf_min": 0.6}'"""]),
    ("TAPEFLOW_LATENESS_MS", "-5", ["TAPEFLOW_LATENESS_MS", "lateness_ms", "-5"]),
    ("TAPEFLOW_PROFILE_BINS", '{"BTC/USDT:USDT": -1}', ["TAPEFLOW_PROFILE_BINS", "greater than 0"]),
    ("TAPEFLOW_KAFKA_MAX_SKEW_MS", "0", ["TAPEFLOW_KAFKA_MAX_SKEW_MS", "greater than 0"]),
    ("TAPEFLOW_KAFKA_MAX_HOLD_S", "-1", ["TAPEFLOW_KAFKA_MAX_HOLD_S", "greater than 0"]),
])
def test_setting_mistakes(tmp_path, name, value, needles):
    res = tapeflow("run", "--data-dir", str(tmp_path), env=_env(**{name: value}))
    assert_short_error(res, 2, *needles)
    assert not (tmp_path / "clickhouse").exists()  # refused before anything was created


def test_unreachable_broker_is_one_line_without_librdkafka_noise(tmp_path):
    res = tapeflow("run", "--source", "kafka", "--brokers", "127.0.0.1:1", "--data-dir", str(tmp_path))
    assert_short_error(res, 1, "127.0.0.1:1", "did not answer")


@pytest.mark.parametrize("command", [("sql", "SELECT 1"), ("report", "--day", "2024-01-01"),
                                     ("optimizer", "status"), ("train",)])
def test_reading_commands_refuse_a_store_that_does_not_exist(tmp_path, command):
    missing = tmp_path / "dtaa"
    res = tapeflow(*command, "--data-dir", str(missing))
    assert_short_error(res, 2, "no tapeflow store", str(missing / "clickhouse"), "--data-dir")
    assert not missing.exists()  # nothing was created


def test_misspelt_environment_variable_warns_with_the_closest_name(tmp_path):
    env = _env(TAPEFLOW_LATENES_MS="5000", TAPEFLOW_OKX_API_KEY="k3y-value", TAPEFLOW_LLM_MODEL="m",
               TAPEFLOW_BATCH_SIZE="100")
    res = tapeflow("sql", "--data-dir", str(tmp_path / "none"), "SELECT 1", env=env)
    assert_short_error(res, 2, "no tapeflow store")
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert warnings == ["warning: TAPEFLOW_LATENES_MS is not a tapeflow setting and is ignored "
                        "(did you mean TAPEFLOW_LATENESS_MS?)"]


def test_a_recovery_directory_refuses_another_source(tmp_path, tapes):
    rec = tmp_path / "rec"
    common = (*REPLAY, "--data-dir", str(tmp_path), "--recovery-dir", str(rec), "--exchange", "x", "--symbol", "y")
    first = tapeflow(*common, "--file", str(tapes / "ok.csv"))
    assert first.returncode == 0, first.stderr
    assert (rec / "tapeflow-source.json").exists()
    res = tapeflow(*common, "--file", str(tapes / "other.csv"))
    assert_short_error(res, 2, str(rec), "ok.csv", "other.csv", "--recovery-dir")
    res = tapeflow("run", "--data-dir", str(tmp_path), "--recovery-dir", str(rec), "--hours", "1", "--quiet")
    assert_short_error(res, 2, str(rec), "synthetic")
    again = tapeflow(*common, "--file", str(tapes / "ok.csv"))  # the same source resumes
    assert again.returncode == 0, again.stderr
    # state saved by a version whose classes lived elsewhere cannot be unpickled: refused by name
    claim = rec / "tapeflow-source.json"
    older = json.loads(claim.read_text())
    assert older.pop("state_layout") == runner.STATE_LAYOUT
    claim.write_text(json.dumps(older))  # as versions before the layout was recorded wrote it
    res = tapeflow(*common, "--file", str(tapes / "ok.csv"))
    assert_short_error(res, 2, str(rec), "another version of tapeflow", "--recovery-dir")


def test_debug_shows_the_traceback(tmp_path, tapes):
    res = tapeflow("--debug", *REPLAY, "--data-dir", str(tmp_path), "--file", str(tapes / "empty.csv"),
                   "--exchange", "x", "--symbol", "y")
    assert res.returncode == 2 and "Traceback" in res.stderr and "ReplayFormatError" in res.stderr


INJECT = """
import sys
import dataflows.runner as runner

def failing_progress(counts, show):  # the sources call it inside the dataflow, for every batch
    def cb(*args, **kwargs):
        raise ValueError("injected fault")
    return cb

runner.counting_progress = failing_progress
from cli.main import main
main(sys.argv[1:], prog_name="tapeflow")
"""


@pytest.mark.parametrize("processes", ["1", "2"])
def test_an_error_inside_the_dataflow_is_reported_as_itself(tmp_path, processes):
    """An exception raised inside a running dataflow comes back from bytewax wrapped (one process) or
    as a bare "Send thread panic" (a cluster: bytewax drops it); either way the user reads the
    original exception and where it happened, and no process is left behind."""
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    proc = subprocess.Popen([sys.executable, str(script), "run", "--data-dir", str(tmp_path), "--hours", "1",
                             "--rate", "1", "--train-split", "0", "--processes", processes],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=Path(__file__).resolve().parents[1])
    out, err = proc.communicate(timeout=120)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_short_error(res, 1, "ValueError: injected fault (in pipeline step tapeflow.trades_in", "--debug")
    assert not _processes_with(f"--data-dir {tmp_path} "), "a pipeline process was left behind"


def _gone(text: str, within_s: float = 10) -> bool:
    """Whether no live process has ``text`` in its command line, waiting up to ``within_s``."""
    deadline = time.time() + within_s
    while _processes_with(text) and time.time() < deadline:
        time.sleep(0.1)
    return not _processes_with(text)


@pytest.mark.parametrize("mistake", ["store holds another run", "broker unreachable"])
def test_a_mistake_process_0_meets_after_starting_its_peers_is_said_once(tmp_path, mistake):
    """Process 0 starts its peers before it claims the store and builds its source (their start-up
    overlaps its own, cli/run_cluster.py); a peer waits for process 0's release before doing
    anything that could fail. So a mistake process 0 meets there is said once, by process 0, and
    the peers go with it."""
    if mistake == "store holds another run":
        first = tapeflow("run", "--data-dir", str(tmp_path), "--hours", "0.5", "--rate", "1", "--train-split", "0")
        assert first.returncode == 0, first.stderr
        args, code, needle = ["--seed", "8", "--hours", "0.5", "--rate", "1", "--train-split", "0"], 2, "--replace"
    else:
        args, code, needle = ["--source", "kafka", "--brokers", "127.0.0.1:1"], 1, "did not answer"
    res = tapeflow("run", "--data-dir", str(tmp_path), "--processes", "2", *args)
    assert_short_error(res, code, needle)
    assert res.stderr.count(needle) == 1, res.stderr
    assert _gone(f"--data-dir {tmp_path} --processes 2"), "a peer outlived process 0"


# --- the errors helper ----------------------------------------------------------------------------------


def _run_flow(mapper):
    """Run a one-step bytewax dataflow whose step calls ``mapper``; returns what it raised."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    flow = Dataflow("f")
    op.output("out", op.map("step", op.input("in", flow, TestingSource([1])), mapper), TestingSink([]))
    with pytest.raises(BaseException) as caught:
        run_main(flow)
    return caught.value


def _raise(exc):
    def mapper(_):
        raise exc
    return mapper


def test_describe_unwraps_bytewax_to_the_original_exception():
    from operators.tape_files import ReplayFormatError

    err = _run_flow(_raise(ReplayFormatError("/x/tape.csv: no exchange column; pass --exchange")))
    assert is_wrapper(err)  # what bytewax raises is its wrapper ...
    assert errors.describe(err) == ("/x/tape.csv: no exchange column; pass --exchange", 2)  # ... not what we report

    msg, code = errors.describe(_run_flow(lambda x: x / 0))
    assert code == 1 and msg.startswith("ZeroDivisionError: division by zero (in pipeline step f.step")
    assert "--debug" in msg


def test_describe_interrupts_and_stops():
    from dataflows.runner import Stopped

    assert errors.describe(_run_flow(_raise(KeyboardInterrupt()))) == ("interrupted (Ctrl-C)", 130)
    assert errors.describe(_run_flow(_raise(Stopped()))) == ("stopped (SIGTERM)", 0)
    try:  # a library that wraps the interrupt it was given is still an interrupt
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt as inner:
            raise RuntimeError("query cancelled") from inner
    except RuntimeError as err:
        assert errors.describe(err)[1] == 130


def test_describe_failures_and_panic_only_errors():
    from dataflows.kafka_topic import KafkaUnavailable

    assert errors.describe(KafkaUnavailable("Kafka brokers b:1 did not answer")) == (
        "Kafka brokers b:1 did not answer", 1)
    assert errors.describe(ConfigError("invalid tapeflow settings: x"))[1] == 2
    assert errors.describe(FileNotFoundError("replay file not found: a.csv"))[1] == 2
    panic = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})
    msg, code = errors.describe(panic("Send thread panic: Any { .. }"))
    assert code == 1 and msg.startswith("a pipeline worker failed: Send thread panic")
    long = errors.describe(ValueError("x" * 5000 + "\nsecond line"))[0]
    assert "second line" not in long and len(long) < 700


def test_native_noise_drops_panic_reports_and_librdkafka_lines_only():
    lines = ["pipeline 10%", "thread '<unnamed>' panicked at src/inputs.rs:446:37:", "Box<dyn Any>",
             "stack backtrace:", "   0: std::panicking::begin_panic",
             "             at /rustc/library/std/src/panicking.rs:626:12", "   1: bytewax::inputs::x",
             "note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.", "",
             "Error: tape.csv: no exchange column; pass --exchange",
             "%3|1796245126.639|FAIL|rdkafka#producer-1| [thrd:127.0.0.1:1/bootstrap]: refused",
             "  indented text of a table", "thread 'x' is a word here"]
    noise = NativeNoise()
    kept = [x for x in lines if noise.keep(x)]
    assert kept == ["pipeline 10%", "Error: tape.csv: no exchange column; pass --exchange",
                    "  indented text of a table", "thread 'x' is a word here"]


def test_unknown_environment_variables(monkeypatch):
    env = {"TAPEFLOW_LATENES_MS": "1", "TAPEFLOW_DATADIR": "x", "TAPEFLOW_OKX_APIKEY": "k", "TAPEFLOW_FOO": "1",
           "TAPEFLOW_LLM_MODLE": "m",
           # read by something: settings, the config file, the LLM summary, exchange credentials
           "TAPEFLOW_LATENESS_MS": "1", "TAPEFLOW_CONFIG": "c.toml", "TAPEFLOW_LLM_BASE_URL": "u",
           "TAPEFLOW_LLM_API_KEY": "k", "TAPEFLOW_LLM_TIMEOUT_S": "3", "TAPEFLOW_BINANCEUSDM_SECRET": "s",
           "TAPEFLOW_HYPERLIQUID_PRIVATE_KEY": "p", "TAPEFLOW_OKX_PASSWORD": "p", "OTHER": "1"}
    assert dict(unknown_env_vars(env)) == {
        "TAPEFLOW_LATENES_MS": "TAPEFLOW_LATENESS_MS", "TAPEFLOW_DATADIR": "TAPEFLOW_DATA_DIR",
        "TAPEFLOW_OKX_APIKEY": "TAPEFLOW_OKX_API_KEY", "TAPEFLOW_FOO": None, "TAPEFLOW_LLM_MODLE": "TAPEFLOW_LLM_MODEL"}


def test_settings_messages_are_one_line(monkeypatch):
    for k in [k for k in os.environ if k.startswith("TAPEFLOW_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TAPEFLOW_PRO_ADDRESSES", "0xa, 0xb")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == ("invalid tapeflow settings: TAPEFLOW_PRO_ADDRESSES must be a JSON list, got '0xa, 0xb'; "
                              """e.g. TAPEFLOW_PRO_ADDRESSES='["0xa", "0xb"]'""")
    monkeypatch.delenv("TAPEFLOW_PRO_ADDRESSES")
    with pytest.raises(ConfigError, match=r"^invalid tapeflow settings: clickhouse_dsn \(--dsn\): unknown DSN scheme"):
        load_settings(clickhouse_dsn="clickhouse://u:pw@h:9000")
    with pytest.raises(ConfigError) as err:
        load_settings(clickhouse_dsn="foo://u:hunter22@h")
    assert "hunter22" not in str(err.value)


# --- Ctrl-C and SIGTERM ---------------------------------------------------------------------------------


def _start(*args: str) -> subprocess.Popen:
    # TTY_COMPATIBLE / TTY_INTERACTIVE: rich draws the live progress bar into the pipe
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(TTY_COMPATIBLE="1", TTY_INTERACTIVE="1"))


def _wait_for_trades(proc: subprocess.Popen, at_least: int, timeout: float = 120) -> bytes:
    """Read stderr until the progress bar counts ``at_least`` trades; returns what was read."""
    seen, deadline = b"", time.time() + timeout
    sel = selectors.DefaultSelector()  # epoll: select() fails on descriptors numbered 1024 and up
    sel.register(proc.stderr, selectors.EVENT_READ)
    while time.time() < deadline and proc.poll() is None:
        if sel.select(0.5):
            seen += os.read(proc.stderr.fileno(), 65536)
            counts = re.findall(rb"([\d,]+) trades", seen)
            if counts and int(counts[-1].replace(b",", b"")) >= at_least:
                return seen
    raise AssertionError(f"no progress within {timeout} s:\n{seen.decode(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen, sig: int, seen: bytes) -> tuple[str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", (seen + err).decode(errors="replace"))
    return out.decode(errors="replace"), text


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = subprocess.run(["pgrep", "-f", "--", text], capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr  # 1: none
    return [int(p) for p in found.stdout.split() if _alive(int(p))]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_prints_the_summary_and_the_exact_command_to_resume(tmp_path):
    args = ["run", "--data-dir", str(tmp_path), "--hours", "500", "--rate", "1", "--train-split", "0",
            "--recovery-dir", str(tmp_path / "rec")]
    proc = _start(*args)
    out, err = _stop(proc, signal.SIGINT, _wait_for_trades(proc, 1))
    assert proc.returncode == 130, err
    assert "tapeflow run (stopped before the end)" in out and "trades in" in out
    assert "interrupted (Ctrl-C)" in err
    assert f"tapeflow {shlex.join(args)}" in err  # the exact command resumes it
    for bad in NOISE:
        assert bad not in out + err, err


def test_sigterm_stops_cleanly_and_says_how_to_make_a_run_resumable(tmp_path):
    proc = _start("run", "--data-dir", str(tmp_path), "--hours", "500", "--rate", "1", "--train-split", "0")
    out, err = _stop(proc, signal.SIGTERM, _wait_for_trades(proc, 1))
    assert proc.returncode == 0, err
    assert "tapeflow run (stopped before the end)" in out
    assert "stopped (SIGTERM)" in err and "--recovery-dir" in err
    for bad in NOISE:
        assert bad not in out + err, err


def test_sigterm_stops_every_process_of_a_local_cluster(tmp_path):
    # paced (--speed): the workers are not busy with a backlog, so the cluster stops within seconds
    proc = _start("run", "--data-dir", str(tmp_path), "--hours", "500", "--rate", "1", "--train-split", "0",
                  "--processes", "2", "--speed", "300", "--symbols", "BTC/USDT:USDT,ETH/USDT:USDT")
    seen = _wait_for_trades(proc, 1)
    peers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                            text=True).stdout.split()]
    assert len(peers) == 1
    out, err = _stop(proc, signal.SIGTERM, seen)
    assert proc.returncode == 0, err
    assert "stopped (SIGTERM)" in err and "tapeflow run (stopped before the end)" in out
    for bad in NOISE:
        assert bad not in out + err, err
    deadline = time.time() + 5
    while _alive(peers[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(peers[0]), "the peer process outlived process 0"
