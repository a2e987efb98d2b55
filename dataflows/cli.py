"""The ``tapeflow`` command."""

from __future__ import annotations

import json
import logging
import shlex
import traceback
from contextlib import contextmanager
from dataclasses import asdict
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dataflows.config import ConfigError, Settings, load_settings
from dataflows.models_cli import DURATION

err_console = Console(stderr=True)
out_console = Console(width=140)
log = logging.getLogger("tapeflow")

DEFAULT_SYMBOLS = "BTC/USDT:USDT,ETH/USDT:USDT,SOL/USDT:USDT"


class Failure(click.ClickException):
    """A one-line error with its exit code: 2 for a user's mistake (usage, settings, input), 1 for
    a failure. click prints it as ``Error: <message>``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _warn_unknown_env(ctx: click.Context) -> None:
    """One line per ``TAPEFLOW_*`` variable nothing reads (a misspelt setting would be ignored
    silently), with the closest valid name. Not repeated by the peers of a local cluster."""
    from dataflows.config import unknown_env_vars

    if ctx.params.get("proc_id") and ctx.params.get("run_dir"):
        return
    for name, close in unknown_env_vars():
        hint = f" (did you mean {close}?)" if close else ""
        err_console.print(f"[yellow]warning: {name} is not a tapeflow setting and is ignored{hint}[/yellow]",
                          highlight=False, soft_wrap=True)


def _settings(ctx: click.Context, **overrides) -> Settings:
    from dataflows.logs import register_settings_secrets

    _warn_unknown_env(ctx)
    try:
        settings = load_settings(ctx.find_root().obj.get("config"), **overrides)
    except ConfigError as err:
        raise Failure(str(err), 2) from None
    register_settings_secrets(settings)
    return settings


def _embedded_path(dsn: str) -> Optional[Path]:
    """The directory of an embedded (chdb://) store, None for a server DSN."""
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return Path(parts.path) if parts.scheme == "chdb" else None


@contextmanager
def _store(settings: Settings, must_exist: bool = False) -> Iterator:
    """The configured store (schema applied), closed afterwards; a clear error if unusable.

    ``must_exist``: for commands that read (sql, report, train, status...): an embedded store
    that does not exist is refused, instead of being created empty and read as zeros (a misspelt
    --data-dir would otherwise look like an empty pipeline)."""
    from sinks.clickhouse import Store, StoreError

    path = _embedded_path(settings.dsn())
    if must_exist and path is not None and not path.exists():
        raise Failure(f"no tapeflow store at {path}: check --data-dir (now {settings.data_dir}) or "
                      "TAPEFLOW_DATA_DIR / --dsn, or run `tapeflow run` first to create it", 2)
    try:
        store = Store(settings.dsn(), settings.clickhouse_database, retry_s=settings.store_retry_s)
    except StoreError as err:
        hint = "" if path is not None else " Check --dsn / TAPEFLOW_CLICKHOUSE_DSN and that the server is up."
        raise Failure(f"{err}{hint}") from None
    try:
        yield store
    finally:
        store.close()


def _parse_start(text: str) -> int:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO date/time (e.g. 2024-01-01 or 2024-01-01T00:00Z)")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


class _Main(click.Group):
    """The ``tapeflow`` group: whatever a command raises becomes one or two lines and an exit code
    (``dataflows.errors.describe``: the original exception out of bytewax's wrappers; 2 for a
    user's mistake, 1 for a failure, 130 for Ctrl-C, 0 for SIGTERM); ``--debug`` adds the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - the one place every error is reported
            from dataflows import errors

            message, code = errors.describe(err)
            if ctx.params.get("debug"):
                traceback.print_exception(err, file=sys.stderr)
            if errors.interrupt(err) is None:
                raise Failure(message, code) from None
            runner = sys.modules.get("dataflows.runner")
            if runner is not None:  # an interrupt outside the run loop: no peer outlives us
                runner.stop_peers(runner._children)
            err_console.print(message, highlight=False, soft_wrap=True)
            raise click.exceptions.Exit(code) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with settings (overrides TAPEFLOW_* environment variables).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.option("--debug", is_flag=True,
              help="Tracebacks for errors, DEBUG logs (librdkafka's too) and native (Rust) output as it is.")
@click.pass_context
def main(ctx: click.Context, config: Optional[Path], verbose: bool, debug: bool) -> None:
    """tapeflow: exchange trades -> multi-timeframe bars and order-flow -> ClickHouse."""
    from dataflows.logs import filter_native_stderr, quiet_libraries, setup_logging

    if not debug:
        filter_native_stderr()  # bytewax's Rust panic reports: the error itself is reported in one line
        if not verbose:
            quiet_libraries()  # retry warnings that repeat the error that follows them
    setup_logging(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING, json=True)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["debug"] = debug


@main.command()
@click.option("--source", type=click.Choice(["synthetic", "replay", "kafka", "ccxt"]), default="synthetic",
              show_default=True)
@click.option("--feeds", default=None,
              help="ccxt: 'exchange:SYM,SYM;exchange2:SYM' e.g. 'binanceusdm:BTC/USDT:USDT,ETH/USDT:USDT'")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="ccxt: stop after this many seconds")
@click.option("--exchange-factory", default=None, help="ccxt: module:callable making exchange objects")
@click.option("--symbols", default=DEFAULT_SYMBOLS, show_default=True, help="synthetic: comma-separated symbols")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=48.0, show_default=True,
              help="synthetic: hours of event time")
@click.option("--start", "start", default="2024-01-01T00:00Z", show_default=True, help="synthetic: first minute (UTC)")
@click.option("--seed", type=click.IntRange(min=0), default=7, show_default=True, help="synthetic: random seed")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="synthetic: parent orders/s per symbol (default: per symbol)")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="replay: tape file (ccxt CSV, Parquet, Binance CSV); repeatable")
@click.option("--exchange", default=None, help="replay: exchange id when the file has no exchange column")
@click.option("--symbol", default=None, help="replay: symbol when the file has no symbol column")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=None,
              help="release trades at SPEED x real time (default: full speed)")
@click.option("--brokers", default=None, help="kafka: bootstrap servers (default TAPEFLOW_KAFKA_BROKERS)")
@click.option("--topic", default=None, help="kafka: trade topic (default trades)")
@click.option("--eof", is_flag=True, help="kafka: stop at the end of the topic instead of waiting for more")
@click.option("--instruments", default=None,
              help="kafka: every instrument on the topic, like --feeds: 'exchange:SYM1,SYM2;exchange2:SYM3' "
                   "(or TAPEFLOW_KAFKA_INSTRUMENTS): the portfolio waits for each, so its rows do not depend on "
                   "the order the partitions arrive in")
@click.option("--from", "start_from", type=click.Choice(["committed", "earliest", "latest"]), default="committed",
              show_default=True,
              help="kafka, without a recovery snapshot: start at the offsets this store's consumer group committed "
                   "(the beginning for a new group), the beginning or the end of the topic (dataflows/kafka.py)")
@click.option("--clock", type=click.Choice(["auto", "event", "wall"]), default="auto", show_default=True,
              help="window clock: event = watermark moves only with trades (replay, deterministic); "
                   "wall = also with the wall clock, so quiet symbols close (live). auto: wall for a "
                   "tailing Kafka source or a paced replay, event otherwise")
@click.option("--dsn", default=None, help="ClickHouse DSN (default: TAPEFLOW_CLICKHOUSE_DSN or embedded chdb)")
@click.option("--database", default=None, help="ClickHouse database (default: tapeflow)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="bytewax processes on this machine")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="bytewax worker threads per process")
@click.option("--recovery-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="bytewax recovery directory: resume where a stopped run left off")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="trades per source batch")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--no-store", is_flag=True, help="discard the output, only count it (benchmarks)")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the summary as JSON to this file")
@click.option("--proc-id", type=click.IntRange(min=0), default=None,
              help="this process's index in a multi-machine cluster (with --addresses)")
@click.option("--addresses", default=None,
              help="multi-machine cluster: 'host:port;host:port;...' of every process, same order everywhere")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--train-split", type=click.FloatRange(min=0, max=1, max_open=True), default=0.5, show_default=True,
              help="synthetic: run this share of the hours, train the ONNX ensemble on it, then score the "
                   "rest with it (0: no training)")
@click.option("--phase-end-ms", type=int, default=None, hidden=True)
@click.option("--model", default=None,
              help="serve this ONNX ensemble: a version in <data_dir>/artifacts or a version folder's path "
                   "(default: the newest trained on this store, for its instruments)")
@click.option("--replace", is_flag=True,
              help="the store holds another run's decisions, fills and equity: clear them first (recorded as a "
                   "store_replaced event); without it such a run is refused (dataflows/runs.py)")
@click.pass_context
def run(ctx: click.Context, source: str, feeds: Optional[str], duration: Optional[float],
        exchange_factory: Optional[str], symbols: str, hours: float, start: str, seed: int,
        rate: Optional[float], files: tuple[Path, ...], exchange: Optional[str], symbol: Optional[str],
        speed: Optional[float], brokers: Optional[str], topic: Optional[str], eof: bool, instruments: Optional[str],
        start_from: str, clock: str,
        dsn: Optional[str], database: Optional[str], data_dir: Optional[Path], processes: int, workers: int,
        recovery_dir: Optional[Path], batch_size: Optional[int], quiet: bool, no_store: bool,
        summary_json: Optional[Path], proc_id: Optional[int], addresses: Optional[str], run_dir: Optional[Path],
        train_split: float, phase_end_ms: Optional[int], model: Optional[str], replace: bool) -> None:
    """Run the pipeline into ClickHouse and print a summary.

    On synthetic data (the default) this is the whole job: the first part of the hours runs, the
    ONNX ensemble is trained on what it stored, and the rest runs with the ensemble loaded (same
    state throughout: the pipeline continues from its recovery snapshot)."""
    from dataflows import runner
    from dataflows.control import lineage_of
    from dataflows.pipeline import build_flow
    from sinks.clickhouse import ClickHouseSink

    settings = _settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir,
                         recovery_dir=recovery_dir, batch_size=batch_size, kafka_brokers=brokers,
                         kafka_topic=topic, model=model, kafka_instruments=_instruments(instruments))
    _check_cluster_options(proc_id, addresses)
    if summary_json is not None:  # an output path that cannot be written fails now, not after the run
        try:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise click.BadParameter(f"cannot create its directory {summary_json.parent}: {err.strerror}",
                                     param_hint="--summary-json") from None
    is_peer = proc_id is not None and proc_id > 0
    local_peer = is_peer and run_dir is not None  # started by process 0 (spawn_peers), which decided for it
    runner.install_stop_handlers(announce=not is_peer)  # Ctrl-C and SIGTERM stop the run with a summary (_stopped)
    run_dir = run_dir or settings.data_dir / "runs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    run_dir.mkdir(parents=True, exist_ok=True)

    t0 = _parse_start(start)
    end_ms = t0 + int(hours * 3_600_000)
    split_ms = None
    if source == "synthetic" and train_split > 0 and not no_store:
        split_ms = t0 + int(hours * train_split * 60) * 60_000  # a minute boundary
        split_ms = split_ms if t0 < split_ms < end_ms else None
    phases = [phase_end_ms] if phase_end_ms else ([split_ms, end_ms] if split_ms else [end_ms])
    rec_dir = settings.recovery_dir or (run_dir / "recovery" if split_ms else None)
    fingerprint = _source_fingerprint(source, settings, symbols=symbols, t0=t0, hours=hours, seed=seed, rate=rate,
                                      files=files, exchange=exchange, symbol=symbol, feeds=feeds)
    resuming = (not local_peer and settings.recovery_dir is not None
                and (settings.recovery_dir / runner.SOURCE_FILE).exists())
    # Kafka partitions without a snapshot in a recovery dir that is resumed were not read yet: from the start
    start_from = "earliest" if resuming else start_from
    if replace and resuming and not is_peer:
        raise click.BadParameter(f"--recovery-dir {settings.recovery_dir} holds a run's state: resumed after "
                                 "--replace, the rows it made before its snapshot would be gone; use a new "
                                 "--recovery-dir (or drop --replace to resume)", param_hint="--replace")
    if rec_dir is not None:  # refuse a recovery directory that holds another source's state
        runner.claim_recovery_dir(rec_dir, fingerprint)

    counts = runner.RunCounts()
    progress_ui = None if (quiet or is_peer) else _progress_ui(counts)
    progress = runner.counting_progress(counts, progress_ui.update if progress_ui else None)
    live = (source == "kafka" and not eof) or source == "ccxt" or bool(speed)
    pace = None if clock == "event" or (clock == "auto" and not live) else (speed or 1.0)

    if not is_peer and not no_store:  # schema first, with a clear error if the store is unusable
        with _store(settings) as store:  # then: the store holds this run's trading rows or none (runs.py)
            _claim_store(store, settings, fingerprint, replace=replace, resuming=resuming,
                         train_split=train_split if source == "synthetic" else None)

    elapsed = 0.0
    for k, phase_end in enumerate(phases):
        src = _source(source, settings, progress, symbols=symbols, t0=t0, end_ms=phase_end, seed=seed, rate=rate,
                      speed=speed, files=files, exchange=exchange, symbol=symbol, feeds=feeds, duration=duration,
                      exchange_factory=exchange_factory, eof=eof, start_from=start_from,
                      group=None if no_store else "store")
        if no_store:
            from sinks.null import NullSink

            sink = NullSink(counts.sink)
        else:
            sink = ClickHouseSink(settings.dsn(), settings.clickhouse_database, counts.sink,
                                  settings.sink_flush_rows, settings.sink_flush_ms,
                                  health_every_s=settings.health_every_s or None, process=proc_id or 0,
                                  retry_s=settings.store_retry_s,
                                  committer=src.offset_committer() if source == "kafka" else None)
        # the first part of a train-then-score run is scored without any ensemble: one left over from
        # an earlier run on the same data would score it in-sample
        first_of_split = split_ms is not None and k == 0
        flow = build_flow(settings, src, sink, pace=pace, ensemble=None if (no_store or first_of_split) else "auto",
                          control_lineage=lineage_of(rec_dir))
        recovery = runner.recovery_config(rec_dir, processes * workers)
        phase_dir = run_dir / f"phase-{k}" if proc_id is None else run_dir
        phase_dir.mkdir(parents=True, exist_ok=True)
        peers: list = []
        addr_list = addresses.split(";") if addresses else None
        if processes > 1 and proc_id is None:
            argv = [a for a in sys.argv[1:]] + (["--phase-end-ms", str(phase_end)] if source == "synthetic" else [])
            argv += ["--from", start_from] if source == "kafka" else []  # decided here, before the claim
            addr_list, peers = runner.spawn_peers(argv, processes, phase_dir)
        t_start = time.time()
        stop: Optional[BaseException] = None
        try:
            if progress_ui:
                progress_ui.start()
            runner.execute(flow, epoch_interval_s=settings.epoch_interval_s, recovery=recovery,
                           addresses=addr_list, proc_id=proc_id or 0, workers=workers)
        except BaseException as err:  # noqa: BLE001 - a stop is reported below, anything else at the top
            if not _is_stop(err):
                runner.stop_peers(peers, timeout_s=10)  # no peer is left waiting for this process
                raise
            stop = err
        finally:
            if progress_ui:
                progress_ui.stop()
        elapsed += time.time() - t_start
        if stop is not None:
            if is_peer:  # what it did, for process 0's summary
                counts.peak_rss_mb = runner.peak_rss_mb()
                (phase_dir / f"proc-{proc_id}.json").write_text(counts.to_json())
            else:
                runner.stop_peers(peers)
                if processes > 1:
                    runner.collect_counts(phase_dir, processes, counts)
            _stopped(ctx, stop, counts, elapsed, settings, is_peer=is_peer,
                     resumable=settings.recovery_dir is not None, main_job=split_ms is not None)
        if source == "ccxt":
            src.check()  # FeedError: a feed failed for good, or a --duration run received nothing
        if is_peer:
            counts.peak_rss_mb = runner.peak_rss_mb()
            (phase_dir / f"proc-{proc_id}.json").write_text(counts.to_json())
            return
        codes = runner.wait_peers(peers)
        if any(codes):
            raise click.ClickException(f"a pipeline process failed (exit codes {codes}); see its output above")
        if processes > 1:
            runner.collect_counts(phase_dir, processes, counts)
        if k < len(phases) - 1:
            try:
                _train(settings, until_ms=phase_end, quiet=quiet)
            except ValueError as err:  # too little data for the folds: say so and go on without
                err_console.print(f"[yellow]no ONNX ensemble trained: {err}[/yellow]")

    _print_summary(counts, elapsed, settings, resumed=rec_dir is not None and not split_ms,
                   replay=src.describe() if source == "replay" else None)
    if source == "kafka" and not settings.kafka_instruments:  # after the run: an error stays one line
        err_console.print("[yellow]note: no --instruments: instruments joined the portfolio as they arrived, so "
                          "with several partitions its decisions may depend on their order; name them "
                          "(like --feeds) for deterministic trading rows[/yellow]", highlight=False, soft_wrap=True)
    if counts.sink.store_error:  # the sink's last flush failed as it closed: say so, never exit 0
        raise Failure(f"the store did not take the last rows: {counts.sink.store_error}", 1)
    quality, strategies = [], []
    if not no_store:
        with _store(settings) as store:  # one open for both read-backs (an open re-applies the schema)
            quality = _print_model_quality(store, split_ms)
            strategies = _print_strategies(store, settings.strategy_config().initial_equity)
    if summary_json:
        summary_json.write_text(json.dumps({
            "trades_in": counts.trades_in, "elapsed_s": elapsed, "trades_per_s": counts.trades_in / elapsed,
            "processes": processes, "workers": workers,
            "peak_rss_mb": [runner.peak_rss_mb(), *counts.peer_rss_mb.values()],
            "sink": asdict(counts.sink), "model_quality": quality, "strategies": strategies},
            indent=2, default=str))


def _claim_store(store, settings: Settings, fingerprint: dict, *, replace: bool, resuming: bool, **options) -> None:
    """Refuse a run into a store holding another run's trading rows (exit 2), or clear them with
    --replace; record the run (dataflows/runs.py)."""
    from dataflows import runs

    ident = runs.run_identity(fingerprint, settings, **options)
    try:
        done = runs.claim_store(store, ident, where=runs.store_name(settings), replace=replace, resuming=resuming,
                                command=shlex.join(["tapeflow", *sys.argv[1:]]))
    except runs.RunConflict as err:
        raise Failure(str(err), 2) from None
    if done["replaced"]:
        held = ", ".join(f"{t} {n:,}" for t, n in done["rows"].items())
        err_console.print(f"--replace: cleared the store's trading rows ({held})", highlight=False, soft_wrap=True)


def _check_cluster_options(proc_id: Optional[int], addresses: Optional[str]) -> None:
    """--proc-id and --addresses join a multi-machine cluster: both or neither (--processes starts a
    local cluster whose peers get both)."""
    if proc_id is None and addresses:
        raise click.UsageError("--addresses needs --proc-id (this process's index in the list)")
    if proc_id is not None:
        if not addresses:
            raise click.UsageError("--proc-id needs --addresses 'host:port;host:port;...' (every process, same order)")
        n = len([a for a in addresses.split(";") if a.strip()])
        if proc_id >= n:
            raise click.BadParameter(f"{proc_id} is not an index into the {n} --addresses", param_hint="--proc-id")


def _source_fingerprint(source: str, settings: Settings, *, symbols: str, t0: int, hours: float, seed: int,
                        rate: Optional[float], files, exchange, symbol, feeds) -> dict:
    """What a recovery directory belongs to (dataflows.runner.claim_recovery_dir), from the run's
    options: the same input resumes, any other is refused."""
    from dataflows import runner

    if source == "synthetic":
        return runner.source_fingerprint(source, symbols=[s.strip() for s in symbols.split(",") if s.strip()],
                                         start_ms=t0, hours=hours, seed=seed, rate=rate)
    if source == "replay":
        return runner.source_fingerprint(source, files=list(files), exchange=exchange, symbol=symbol)
    if source == "kafka":
        return runner.source_fingerprint(source, brokers=settings.kafka_brokers, topic=settings.kafka_topic)
    return runner.source_fingerprint(source, feeds=feeds)


def _is_stop(err: BaseException) -> bool:
    """Ctrl-C or SIGTERM, or any error once a stop is under way (a peer that stopped first)."""
    from dataflows import errors, runner

    return errors.interrupt(err) is not None or runner.stop_requested() is not None


def settings_source(ctx: click.Context) -> Optional[str]:
    """The ``--source`` of the running command (for messages)."""
    return ctx.params.get("source")


def _stopped(ctx: click.Context, err: BaseException, counts, elapsed: float, settings: Settings,
             *, is_peer: bool, resumable: bool, main_job: bool) -> None:
    """After Ctrl-C or SIGTERM (the peers have stopped): print what was done and how to go on,
    exit 130 (Ctrl-C) or 0 (SIGTERM: a requested stop, e.g. ``docker compose stop``)."""
    import signal

    from dataflows import errors, runner

    sigterm = runner.stop_requested() == signal.SIGTERM or isinstance(errors.interrupt(err), runner.Stopped)
    code = errors.STOPPED if sigterm else errors.INTERRUPTED
    if is_peer:
        ctx.exit(code)
    _print_summary(counts, elapsed, settings, resumed=True, title="tapeflow run (stopped before the end)")
    what = "stopped (SIGTERM)" if sigterm else "interrupted (Ctrl-C)"
    if resumable:
        args = [a for a in sys.argv[1:] if a != "--replace"]  # the resumed run keeps the rows it made
        if not any(a == "--recovery-dir" or a.startswith("--recovery-dir=") for a in args):
            args = [*args, "--recovery-dir", str(settings.recovery_dir)]
        err_console.print(f"{what}. Its state is in {settings.recovery_dir}; resume from the last snapshot "
                          f"(taken every {settings.epoch_interval_s:g} s) with:\n  tapeflow {shlex.join(args)}",
                          highlight=False, soft_wrap=True, markup=False)
    elif main_job:
        err_console.print(f"{what}. The main job keeps its recovery state for its own phases only: a rerun starts "
                          "over (add --recovery-dir DIR to make it resumable).", highlight=False, soft_wrap=True)
    elif settings_source(ctx) == "kafka":
        err_console.print(f"{what}. A rerun goes on from the offsets committed at the last completed epoch, with "
                          "empty state (models, feature history, the minute in progress start over); run with "
                          "--recovery-dir DIR to resume exactly where it stopped.", highlight=False, soft_wrap=True)
    else:
        err_console.print(f"{what}. A rerun starts over; run with --recovery-dir DIR to be able to resume where "
                          "it stopped.", highlight=False, soft_wrap=True)
    ctx.exit(code)


def _source(source: str, settings: Settings, progress, *, symbols: str, t0: int, end_ms: int, seed: int,
            rate: Optional[float], speed: Optional[float], files, exchange, symbol, feeds, duration,
            exchange_factory, eof: bool, start_from: str = "committed", group: Optional[str] = "store"):
    from dataflows.sources import ReplaySource, SyntheticSource

    if source == "synthetic":
        syms = [s.strip() for s in symbols.split(",") if s.strip()]
        if not syms:
            raise click.BadParameter("--symbols is empty")
        return SyntheticSource(syms, t0, end_ms, seed=seed, rate=rate, batch_size=settings.batch_size,
                               speed=speed, progress=progress)
    if source == "replay":
        if not files:
            raise click.UsageError("--source replay needs at least one --file")
        src = ReplaySource(list(files), exchange=exchange, symbol=symbol, batch_size=settings.batch_size,
                           speed=speed, progress=progress)
        check = getattr(src, "check", None)
        if callable(check):  # every file problem now, as one line, not from inside the dataflow
            check()
        return src
    if source == "ccxt":
        return _ccxt_source(feeds, duration, exchange_factory, settings, progress)
    from dataflows.kafka import KafkaBatchSource, KafkaUnavailable, default_group, preflight

    try:
        preflight(settings.kafka_brokers, settings.kafka_topic)
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    return KafkaBatchSource(settings.kafka_brokers, settings.kafka_topic, tail=not eof,
                            batch_size=settings.kafka_batch_size, progress=progress, start=start_from,
                            universe=tuple(settings.kafka_instruments),
                            group_id=default_group(settings.dsn(), settings.clickhouse_database) if group else None)


def _instruments(text: Optional[str]) -> Optional[list[str]]:
    """``--instruments`` in the ``--feeds`` syntax (``exchange:SYM1,SYM2;exchange2:SYM3``) as
    ``exchange:symbol`` strings."""
    if text is None or not text.strip():  # "" (an unset compose variable): none declared
        return None
    from operators.ingest import parse_symbols  # not from ccxt_source: that imports ccxt (~0.8 s)

    try:
        return [f"{ex}:{sym}" for ex, syms in parse_symbols(text).items() for sym in syms]
    except ValueError as err:
        raise click.BadParameter(f"{err} (e.g. binanceusdm:BTC/USDT:USDT,ETH/USDT:USDT;bybit:BTC/USDT:USDT)",
                                 param_hint="--instruments") from None


def _train(settings: Settings, until_ms: Optional[int] = None, folds: int = 4, quiet: bool = False):
    """Train the ONNX ensemble on the store's features and labels; print the folds."""
    from dataflows.training import train_from_store

    with _store(settings, must_exist=True) as store:
        bar = None if quiet else Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"),
                                          TimeElapsedColumn(), console=err_console)
        task = bar.add_task("reading features", total=folds) if bar else None
        if bar:
            bar.start()
        try:
            manifest = train_from_store(
                store, settings, folds=folds, until_ms=until_ms,
                progress=(lambda i, k, msg: bar.update(task, completed=i, total=k, description=msg)) if bar else None)
        finally:
            if bar:
                bar.stop()
    t = Table(title=f"ONNX ensemble {manifest.version}", title_justify="left")
    for c in ("fold", "train rows", "valid rows", "log loss", "Brier", "accuracy"):
        t.add_column(c, justify="right")
    for m in manifest.members:
        t.add_row(str(m.fold), f"{m.train_rows:,}", f"{m.valid_rows:,}", f"{m.metrics['logloss']:.4f}",
                  f"{m.metrics['brier']:.4f}", f"{m.metrics['accuracy']:.3f}")
    out_console.print(t)
    return manifest


def _print_model_quality(store, since_ms: Optional[int]) -> list[dict]:
    from dataflows.training import model_quality

    rows = model_quality(store, since_ms)
    if not rows:
        return rows
    title = "model quality" + (" on the scored part (after training)" if since_ms else "")
    t = Table(title=title, title_justify="left")
    for c in ("model", "labels", "accuracy", "log loss", "Brier", "version"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], f"{r['n']:,}", f"{r['accuracy']:.3f}", f"{r['log_loss']:.4f}", f"{r['brier']:.4f}",
                  ",".join(sorted(r["versions"]))[:40])
    out_console.print(t)
    return rows


def _print_strategies(store, initial_equity: float) -> list[dict]:
    from dataflows.reporting import strategy_summary

    rows = strategy_summary(store, initial_equity)
    if not rows:
        return rows
    t = Table(title="strategies (paper)", title_justify="left")
    for c in ("origin", "strategy", "variant", "PnL", "ROI", "trades", "win rate", "Sharpe", "max DD"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["origin"], r["strategy_id"], r["variant_id"], f"{r['pnl']:,.2f}", f"{r['roi']:.2%}",
                  f"{r['trades']:,}", "-" if r["win_rate"] is None else f"{r['win_rate']:.1%}",
                  "-" if r["sharpe"] is None else f"{r['sharpe']:.2f}", f"{r['max_drawdown']:.2%}")
    out_console.print(t)
    return rows


@main.command()
@click.option("--day", required=True, help="UTC day to report, YYYY-MM-DD")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for the markdown and charts (default: <data_dir>/reports)")
@click.option("--strategy", default="production", show_default=True,
              help="whose trades: an origin (production | experimental) or a strategy id")
@click.option("--low-conf", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="entries whose decision's best model confidence is below this are listed as low-confidence")
@click.option("--llm/--no-llm", default=True, show_default=True,
              help="add an LLM summary when TAPEFLOW_LLM_BASE_URL and TAPEFLOW_LLM_MODEL are set (sends aggregates only)")
@click.option("--dsn", default=None, help="ClickHouse DSN (default: TAPEFLOW_CLICKHOUSE_DSN or embedded chdb)")
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def report(ctx: click.Context, day: str, out_dir: Optional[Path], strategy: str, low_conf: float, llm: bool,
           dsn: Optional[str], database: Optional[str], data_dir: Optional[Path]) -> None:
    """Write a daily summary (markdown + PNG charts): trades, wins, losses, best and worst trade,
    low-confidence entries, vetoes, kill-switch events, model quality."""
    from datetime import date

    from dataflows.report import LlmConfig, write_report

    try:
        the_day = date.fromisoformat(day)
    except ValueError:
        raise click.BadParameter(f"{day!r} is not a day (YYYY-MM-DD)", param_hint="--day") from None
    settings = _settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    try:
        llm_cfg = LlmConfig.from_env() if llm else None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    with _store(settings, must_exist=True) as store:
        path = write_report(store, the_day, out_dir or settings.data_dir / "reports", strategy=strategy,
                            llm=llm_cfg, low_conf=low_conf)
    click.echo(f"wrote {path}")


@main.group()
def optimizer() -> None:
    """The live optimizer of paper variants (enable with TAPEFLOW_OPTIMIZER='{"enabled": true}')."""


@optimizer.command("status")
@click.option("--strategy", default=None, help="strategy id (default: all)")
@click.option("--dsn", default=None)
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def optimizer_status(ctx: click.Context, strategy: Optional[str], dsn: Optional[str], database: Optional[str],
                     data_dir: Optional[Path]) -> None:
    """The live leaderboard from ClickHouse: newest metrics of every variant, then promotions."""
    import json as _json

    from dataflows.reporting import leaderboard, promotions

    settings = _settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    with _store(settings, must_exist=True) as store:
        rows, promos = leaderboard(store, strategy), promotions(store)
    if not rows:
        click.echo("no optimizer metrics yet (is the optimizer enabled? TAPEFLOW_OPTIMIZER='{\"enabled\": true}')")
        return

    def num(v, f):
        return "-" if v is None else format(v, f)

    t = Table(title="optimizer leaderboard", title_justify="left")
    for c in ("variant", "status", "runtime h", "trades", "ROI", "win rate", "Sharpe", "Sortino", "max DD", "DSR",
              "changes"):
        t.add_column(c, justify="right")
    for r in rows:
        name = "production" if r["origin"] == "production" else r["variant_id"]
        changes = ", ".join(f"{k}={v}" for k, v in _json.loads(r["config"] or "{}").items())
        t.add_row(name, r["status"], f"{r['runtime_ms'] / 3_600_000:.1f}", f"{r['trades']:,}", f"{r['roi']:.2%}",
                  num(r["win_rate"], ".1%"), num(r["sharpe"], ".2f"), num(r["sortino"], ".2f"),
                  f"{r['max_drawdown']:.2%}", num(r["dsr"], ".3f"), changes[:60])
    out_console.print(t)
    for p in promos:
        click.echo(f"promotion at {_cell(p['ts'])}: {_json.loads(p['detail']).get('variant_id')} ({p['reason'][:120]})")


@main.group()
def killswitch() -> None:
    """The drawdown kill switch: it halts a strategy until an operator resets it."""


@killswitch.command("reset")
@click.option("--by", default=None, help="who resets (audited); default: $USER")
@click.option("--strategy", default="production", show_default=True, help="production | all | a strategy id")
@click.option("--reason", default="", help="why (audited)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def killswitch_reset(ctx: click.Context, by: Optional[str], strategy: str, reason: str,
                     data_dir: Optional[Path]) -> None:
    """Ask the pipeline to lift a tripped kill switch (applied at its next input, audited in events)."""
    import getpass

    from dataflows.control import request_reset

    settings = _settings(ctx, data_dir=data_dir)
    path = request_reset(settings.data_dir, by or getpass.getuser(), strategy, reason)
    click.echo(f"reset requested ({path.name}); the pipeline applies it at its next input and records a "
               "kill_switch_reset event")


@killswitch.command("status")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def killswitch_status(ctx: click.Context, data_dir: Optional[Path]) -> None:
    """Last kill-switch event per strategy, and requests not yet applied."""
    from dataflows.control import pending
    from dataflows.reporting import kill_switch_status

    settings = _settings(ctx, data_dir=data_dir)
    waiting = pending(settings.data_dir)
    if waiting:
        click.echo(f"{len(waiting)} reset request(s) waiting for the pipeline: {', '.join(p.name for p in waiting)}")
    with _store(settings, must_exist=True) as store:
        rows = kill_switch_status(store)
    if not rows:
        click.echo("no kill switch has tripped")
    for r in rows:
        state = "HALTED" if r["last_kind"] == "kill_switch" else "trading"
        click.echo(f"{r['source']}: {state} (last {r['last_kind']} at {_cell(r['at'])}: {r['reason']})")


@main.command()
@click.option("--folds", type=click.IntRange(min=2), default=4, show_default=True,
              help="walk-forward folds (= ensemble members)")
@click.option("--every", type=DURATION, default=None,
              help="retrain on this schedule (e.g. 24h) until stopped: the trainer service (dataflows/models_cli.py)")
@click.option("--history", type=DURATION, default=None,
              help="train on the labelled rows of this much recent history (e.g. 7d; default: all)")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="with --every: stop after this many runs")
@click.option("--dsn", default=None)
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def train(ctx: click.Context, folds: int, every: Optional[float], history: Optional[float], runs: Optional[int],
          dsn: Optional[str], database: Optional[str], data_dir: Optional[Path]) -> None:
    """Train the ONNX LightGBM ensemble on stored features and labels (walk-forward, purged),
    through the deployment gate (served only if it beats the class prior and the active model)."""
    from dataflows.models_cli import run_train_command

    settings = _settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)

    def once():
        try:
            return _train(settings, folds=folds)
        except ValueError as err:
            raise click.ClickException(str(err)) from None

    run_train_command(ctx, settings, folds=folds, every=every, history=history, runs=runs, train_now=once)


def _ccxt_source(feeds: Optional[str], duration: Optional[float], factory: Optional[str], settings: Settings,
                 progress=None):
    from dataflows.ccxt_feed import PerpPolling
    from dataflows.ccxt_source import CcxtSource, load_factory, parse_symbols

    if not feeds:
        raise click.UsageError("--source ccxt needs --feeds 'exchange:SYM,SYM' (e.g. binanceusdm:BTC/USDT:USDT)")
    try:
        # perp polling from these settings (--config included); a scripted venue's own ``perp`` wins
        perp = None if factory and getattr(load_factory(factory), "perp", None) else PerpPolling.from_settings(settings)
        return CcxtSource(parse_symbols(feeds), factory_path=factory, duration_s=duration,
                          batch_size=settings.batch_size, progress=progress, perp=perp)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.option("--feeds", required=True,
              help="'exchange:SYM,SYM;exchange2:SYM', e.g. 'binanceusdm:BTC/USDT:USDT;bybit:BTC/USDT:USDT'")
@click.option("--brokers", default=None)
@click.option("--topic", "topic_name", default=None)
@click.option("--partitions", type=int, default=None, help="create the topic with this many partitions if missing")
@click.option("--record", "record_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="also record the normalised tape as Parquet files here (replay with --source replay)")
@click.option("--duration", type=float, default=None, help="stop after this many seconds (default: run forever)")
@click.option("--exchange-factory", default=None, help="module:callable making exchange objects (default ccxt.pro)")
@click.pass_context
def ingest(ctx: click.Context, feeds: str, brokers: Optional[str], topic_name: Optional[str],
           partitions: Optional[int], record_dir: Optional[Path], duration: Optional[float],
           exchange_factory: Optional[str]) -> None:
    """Live trades from exchanges (ccxt.pro websockets) into Kafka, with gap backfill."""
    from dataflows.ingest import KafkaTapeSink, ParquetTapeSink, build_ingest_flow
    from dataflows.kafka import KafkaUnavailable, ensure_topic, preflight
    from dataflows.runner import execute

    settings = _settings(ctx, kafka_brokers=brokers, kafka_topic=topic_name, kafka_partitions=partitions)
    try:
        preflight(settings.kafka_brokers)
        ensure_topic(settings.kafka_brokers, settings.kafka_topic, settings.kafka_partitions)
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    src = _ccxt_source(feeds, duration, exchange_factory, settings)
    flow = build_ingest_flow(src, KafkaTapeSink(settings.kafka_brokers, settings.kafka_topic),
                             ParquetTapeSink(record_dir) if record_dir else None,
                             heartbeat_dir=settings.data_dir / "heartbeat")
    log.info("ingesting %s into %s on %s", feeds, settings.kafka_topic, settings.kafka_brokers)
    execute(flow, epoch_interval_s=settings.epoch_interval_s, recovery=None)
    src.check()  # FeedError: a feed failed for good, or a --duration run received nothing


class _progress_ui:
    """One progress bar over all source partitions of this process."""

    def __init__(self, counts):
        self.counts = counts
        self.parts: dict[str, tuple[int, int]] = {}
        self.bar = Progress(TextColumn("[bold]pipeline"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                            TextColumn("{task.fields[rows]:>12,} trades"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err_console, transient=False)
        self.task = self.bar.add_task("run", total=1, rows=0)

    def update(self, part: str, done: int, total: int) -> None:
        self.parts[part] = (done, total)
        d = sum(v[0] for v in self.parts.values())
        t = sum(v[1] for v in self.parts.values()) or 1
        self.bar.update(self.task, completed=d, total=t, rows=self.counts.trades_in)

    def start(self) -> None:
        self.bar.start()

    def stop(self) -> None:
        self.bar.stop()


def _print_summary(total, elapsed: float, settings: Settings, resumed: bool, title: str = "tapeflow run",
                   replay: Optional[dict] = None) -> None:
    from dataflows.runner import peak_rss_mb
    from sinks.clickhouse import redact_dsn

    s = total.sink
    dup = s.counters.get("duplicates", 0)
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("trades in", f"{total.trades_in:,}")
    t.add_row("  into 1m bars", f"{s.trades_in_bars:,}")
    t.add_row("  late (late_trades)", f"{s.late_trades:,}")
    outliers = s.counters.get("late.ts_outlier", 0) + s.counters.get("late.ts_jump_unconfirmed", 0)
    if outliers:
        t.add_row("    of which timestamp outliers", f"{outliers:,}")
    t.add_row("  duplicates dropped", f"{dup:,}")
    t.add_row("  dead letters", f"{s.dead_letters:,}")
    for tf in settings.timeframes:
        t.add_row(f"bars {tf}", f"{s.bars.get(tf, 0):,}")
    t.add_row("elapsed", f"{elapsed:.2f} s")
    t.add_row("throughput", f"{total.trades_in / elapsed:,.0f} trades/s" if elapsed > 0 else "-")
    t.add_row("peak RSS", " + ".join(f"{m:,.0f} MB" for m in [peak_rss_mb(), *total.peer_rss_mb.values()]))
    t.add_row("store", f"{settings.clickhouse_database} @ {redact_dsn(settings.dsn())}")
    out_console.print(t)
    if replay and replay.get("summary"):
        err_console.print(f"replay: {replay['summary']}")
    accounted = s.trades_in_bars + s.late_trades + dup + s.dead_letters
    if not resumed and accounted != total.trades_in:
        err_console.print(f"[yellow]note: {total.trades_in - accounted:,} trades not accounted for "
                          "(still in open windows?)[/yellow]")


@main.group()
def topic() -> None:
    """Kafka topic administration."""


@topic.command("create")
@click.argument("name", required=False)
@click.option("--partitions", type=int, default=None, help="default TAPEFLOW_KAFKA_PARTITIONS (6)")
@click.option("--brokers", default=None)
@click.pass_context
def topic_create(ctx: click.Context, name: Optional[str], partitions: Optional[int], brokers: Optional[str]) -> None:
    """Create the trade topic (or NAME) if it does not exist."""
    from dataflows.kafka import KafkaUnavailable, ensure_topic, preflight

    settings = _settings(ctx, kafka_brokers=brokers, kafka_partitions=partitions)
    name = name or settings.kafka_topic
    try:
        preflight(settings.kafka_brokers)
        created = ensure_topic(settings.kafka_brokers, name, settings.kafka_partitions)
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"topic {name}: {'created with ' + str(settings.kafka_partitions) + ' partitions' if created else 'exists'}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "target", type=click.Choice(["kafka"]), default="kafka", show_default=True)
@click.option("--exchange", default=None, help="exchange id when the file has no exchange column")
@click.option("--symbol", default=None, help="symbol when the file has no symbol column")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=None,
              help="publish at SPEED x real time (default: full speed)")
@click.option("--brokers", default=None)
@click.option("--topic", "topic_name", default=None)
@click.option("--partitions", type=int, default=None, help="create the topic with this many partitions if missing")
@click.option("--quiet", is_flag=True)
@click.pass_context
def replay(ctx: click.Context, files: tuple[Path, ...], target: str, exchange: Optional[str], symbol: Optional[str],
           speed: Optional[float], brokers: Optional[str], topic_name: Optional[str], partitions: Optional[int],
           quiet: bool) -> None:
    """Publish recorded tapes (ccxt CSV, Parquet, Binance CSV) to Kafka, keyed exchange:symbol."""
    from dataflows.kafka import KafkaUnavailable, TradeProducer, ensure_topic, preflight, publish_tape
    from dataflows.sources import ReplayFormatError

    settings = _settings(ctx, kafka_brokers=brokers, kafka_topic=topic_name, kafka_partitions=partitions)
    try:
        preflight(settings.kafka_brokers)
        ensure_topic(settings.kafka_brokers, settings.kafka_topic, settings.kafka_partitions)
        producer = TradeProducer(settings.kafka_brokers, settings.kafka_topic)
        total = 0
        for f in files:
            bar = None if quiet else Progress(TextColumn(f"[bold]{f.name}"), BarColumn(),
                                              TextColumn("{task.completed:,} messages"), TimeElapsedColumn(),
                                              console=err_console)
            task = bar.add_task("publish", total=None) if bar else None
            if bar:
                bar.start()
            try:
                total += publish_tape(f, producer, exchange=exchange, symbol=symbol, speed=speed,
                                      progress=(lambda done, n: bar.update(task, completed=done, total=n or None))
                                      if bar else None)
            finally:
                if bar:
                    bar.stop()
    except (KafkaUnavailable, ReplayFormatError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"published {total:,} messages to {settings.kafka_topic} on {settings.kafka_brokers}")


@main.group()
def tape() -> None:
    """Recorded tapes (files replayable with --source replay or `tapeflow replay`)."""


@tape.command("synthetic")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help=".parquet or .csv")
@click.option("--symbols", default=DEFAULT_SYMBOLS, show_default=True)
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=6.0, show_default=True)
@click.option("--start", "start", default="2024-01-01T00:00Z", show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--rate", type=float, default=None, help="parent orders/s per symbol")
@click.option("--exchange", default="synthetic", show_default=True)
def tape_synthetic(out: Path, symbols: str, hours: float, start: str, seed: int, rate: Optional[float],
                   exchange: str) -> None:
    """Write a synthetic tape in the trade contract's columns, ordered by time."""
    import polars as pl

    from operators import synthetic as syn

    t0, minutes = _parse_start(start), int(hours * 60)
    frames = []
    for sym in [s.strip() for s in symbols.split(",") if s.strip()]:
        cols, _ = syn.generate(syn.spec_for(sym, rate), seed, t0, minutes)
        frames.append(pl.DataFrame(cols).with_columns(pl.lit(exchange).alias("exchange"), pl.lit(sym).alias("symbol")))
    df = pl.concat(frames).sort("ts", "symbol", "offset").select(
        "exchange", "symbol", pl.col("id").cast(pl.String), "ts", "price", "amount",
        pl.when(pl.col("is_buy")).then(pl.lit("buy")).otherwise(pl.lit("sell")).alias("side"))
    out.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(out) if out.suffix == ".csv" else df.write_parquet(out)
    click.echo(f"wrote {df.height:,} trades to {out}")


@main.command()
@click.option("--kafka/--no-kafka", default=True, help="check the Kafka brokers answer")
@click.option("--clickhouse/--no-clickhouse", default=True, help="check the ClickHouse store answers")
@click.option("--pipeline/--no-pipeline", default=None,
              help="check the pipeline makes progress: its newest pipeline_health row, and the last move of its "
                   "watermark, are younger than --max-stall-s (default: on with --clickhouse)")
@click.option("--ingest/--no-ingest", default=False,
              help="check the ingest heartbeat (<data_dir>/heartbeat): every venue received a trade within "
                   "--max-stall-s")
@click.option("--max-stall-s", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="how long without progress counts as stalled")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="connect timeout (s)")
@click.option("--brokers", default=None, help="Kafka bootstrap servers (default TAPEFLOW_KAFKA_BROKERS)")
@click.option("--dsn", default=None, help="ClickHouse DSN (default: TAPEFLOW_CLICKHOUSE_DSN or embedded chdb)")
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def health(ctx: click.Context, kafka: bool, clickhouse: bool, pipeline: Optional[bool], ingest: bool,
           max_stall_s: float, timeout: float, brokers: Optional[str], dsn: Optional[str], database: Optional[str],
           data_dir: Optional[Path]) -> None:
    """Exit 0 when the services answer AND make progress (container health checks); otherwise exit 1
    with one line saying what stalled and since when.

    Liveness, not reachability: a pipeline whose source went quiet still answers pings, so the
    check reads its progress (pipeline_health rows and watermark, or the ingest heartbeat file).
    On the embedded store this only works while no pipeline holds it; use a server DSN."""
    from dataflows.heartbeat import heartbeat_dir
    from dataflows.status import embedded_path, embedded_store_in_use, ingest_stalls, pipeline_stalls, wall_ms
    from sinks.clickhouse import Store, StoreError, redact_dsn

    settings = _settings(ctx, kafka_brokers=brokers, clickhouse_dsn=dsn, clickhouse_database=database,
                         data_dir=data_dir)
    pipeline = clickhouse if pipeline is None else pipeline
    problems = []
    if kafka:
        from dataflows.kafka import KafkaUnavailable, preflight

        try:
            preflight(settings.kafka_brokers, timeout_s=timeout)
        except KafkaUnavailable as err:
            problems.append(str(err))
    embedded = embedded_path(settings.dsn())
    if not (clickhouse or pipeline):
        pass
    elif embedded is not None and not embedded.exists():
        problems.append(f"ClickHouse: no embedded store at {embedded} (check --data-dir / --dsn)")
    elif embedded_store_in_use(settings.dsn()) is not None:
        problems.append(f"ClickHouse: the embedded store {embedded} is in use by another process (a running "
                        "pipeline?) and cannot be checked from here; use a ClickHouse server DSN for live checks")
    else:
        import clickhouse_connect

        store = None
        try:
            if embedded is not None:
                store = Store(settings.dsn(), settings.clickhouse_database, apply_schema=False, retry_s=0)
            else:
                c = clickhouse_connect.get_client(dsn=settings.dsn(), connect_timeout=timeout)
                c.query("SELECT 1")
                c.close()
                if pipeline:
                    store = Store(settings.dsn(), settings.clickhouse_database, apply_schema=False, retry_s=0)
            if pipeline:
                problems.extend(pipeline_stalls(store, wall_ms(), max_stall_s))
        except StoreError as err:
            problems.append(str(err).splitlines()[0])
        except Exception as err:  # noqa: BLE001
            problems.append(f"ClickHouse at {redact_dsn(settings.dsn())}: {str(err).splitlines()[0]}")
        finally:
            if store is not None:
                store.close()
    if ingest:
        problems.extend(ingest_stalls(heartbeat_dir(settings.data_dir), wall_ms(), max_stall_s))
    if problems:
        raise click.ClickException("; ".join(problems))
    click.echo("ok")


@main.command()
@click.option("--watch", type=click.FloatRange(min=0.5), default=None, metavar="SECONDS",
              help="refresh every SECONDS until Ctrl-C (default: print once)")
@click.option("--max-stall-s", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="liveness bound shown in the pipeline section (as `tapeflow health`)")
@click.option("--dsn", default=None, help="ClickHouse DSN (default: TAPEFLOW_CLICKHOUSE_DSN or embedded chdb)")
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def status(ctx: click.Context, watch: Optional[float], max_stall_s: float, dsn: Optional[str],
           database: Optional[str], data_dir: Optional[Path]) -> None:
    """One screen of what matters while it runs: feeds and their last trade, watermark lag,
    trades/s, equity and open positions, kill switch, models and their calibration, optimizer
    leaders. Reads the store and the ingest heartbeat (<data_dir>/heartbeat).

    Works against a ClickHouse server while the pipeline runs. The embedded store can be opened
    by one process only: while `tapeflow run` holds it, status says so and exits 1."""
    from rich.live import Live

    from dataflows.heartbeat import heartbeat_dir
    from dataflows.status import embedded_store_in_use, read_status, render
    from sinks.clickhouse import redact_dsn

    settings = _settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    name = f"{settings.clickhouse_database} @ {redact_dsn(settings.dsn())}"
    held = embedded_store_in_use(settings.dsn())
    if held is not None:
        raise click.ClickException(
            f"the embedded store {held} is in use by another process (a running `tapeflow run`?): only one "
            "process can open it. While the pipeline runs, point status at a ClickHouse server "
            "(--dsn http://user:pw@host:8123); or run it after the pipeline stops.")
    with _store(settings, must_exist=True) as store:

        def snapshot():
            return render(read_status(store, heartbeat_dir(settings.data_dir), settings.data_dir, name,
                                      max_stall_s=max_stall_s))

        if watch is None:
            out_console.print(snapshot())
            return
        try:
            if not out_console.is_terminal:  # piped or logged: one full screen per refresh
                while True:
                    out_console.print(snapshot())
                    time.sleep(watch)
            with Live(snapshot(), console=out_console, auto_refresh=False) as live:
                while True:
                    time.sleep(watch)
                    live.update(snapshot(), refresh=True)
        except KeyboardInterrupt:  # the way out of --watch: not an error
            pass


@main.command()
@click.argument("query")
@click.option("--dsn", default=None, help="ClickHouse DSN (default: TAPEFLOW_CLICKHOUSE_DSN or embedded chdb)")
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.pass_context
def sql(ctx: click.Context, query: str, dsn: Optional[str], database: Optional[str], data_dir: Optional[Path],
        fmt: str) -> None:
    """Run QUERY against the configured store and print the result."""
    settings = _settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    with _store(settings, must_exist=True) as store:
        try:
            cols, rows = store.query(query)
        except Exception as err:  # noqa: BLE001 - show the server's message, not a traceback
            raise click.ClickException(f"query failed: {str(err).strip().splitlines()[0]}") from None
    _print_rows(cols, rows, fmt)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return "" if v is None else str(v)


def _print_rows(cols: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps([dict(zip(cols, r)) for r in rows], default=str))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows([[_cell(v) for v in r] for r in rows])
    else:
        t = Table(*cols, show_lines=False)
        for r in rows:
            t.add_row(*[_cell(v) for v in r])
        Console(width=max(120, Console().width)).print(t)
        err_console.print(f"{len(rows)} row(s)")


from dataflows.models_cli import models as _models_command  # noqa: E402  (issue 12: tapeflow models)

main.add_command(_models_command)

if __name__ == "__main__":
    main(prog_name="tapeflow")
