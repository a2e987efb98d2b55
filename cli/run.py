"""``tapeflow run``: the pipeline into the store, in phases (train-then-score on synthetic data),
with the peers of a local cluster, and the summary printed at the end or at a stop."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import click

from cli.common import DEFAULT_SYMBOLS, Failure, command_settings, err_console, open_store, parse_start
from cli.models import train_and_show
from cli import run_cluster as cluster
from cli.run_stop import is_stop, stopped
from cli.source_options import build_source, parse_instruments, recovery_fingerprint
from cli.summaries import ProgressBar, print_model_quality, print_run_summary, print_strategies
from dataflows import recovery_dir, run_counts, runner, runs
from dataflows.config import Settings
from dataflows.control import lineage_of
from dataflows.pipeline import build_flow
from sinks.clickhouse import ClickHouseSink
from sinks.null import NullSink
from operators.records import HOUR_MS, MINUTE_MS


@dataclass(frozen=True)
class RunOptions:
    """The options of ``tapeflow run`` (its ``--help`` says what each does)."""

    # source
    source: str
    # ccxt
    feeds: Optional[str]
    duration: Optional[float]
    exchange_factory: Optional[str]
    # synthetic
    symbols: str
    hours: float
    start: str
    seed: int
    rate: Optional[float]
    train_split: float
    # replay
    files: tuple[Path, ...]
    exchange: Optional[str]
    symbol: Optional[str]
    # kafka
    brokers: Optional[str]
    topic: Optional[str]
    eof: bool
    instruments: Optional[str]
    start_from: str
    # pacing
    speed: Optional[float]
    clock: str
    # store
    dsn: Optional[str]
    database: Optional[str]
    data_dir: Optional[Path]
    no_store: bool
    replace: bool
    model: Optional[str]
    # cluster and recovery
    processes: int
    workers: int
    recovery_dir: Optional[Path]
    batch_size: Optional[int]
    proc_id: Optional[int]
    addresses: Optional[str]
    run_dir: Optional[Path]
    phase_end_ms: Optional[int]
    # output
    quiet: bool
    summary_json: Optional[Path]


@click.command()
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
                   "(the beginning for a new group), the beginning or the end of the topic (dataflows/kafka_source.py)")
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
def run(ctx: click.Context, **options) -> None:
    """Run the pipeline into ClickHouse and print a summary.

    On synthetic data (the default) this is the whole job: the first part of the hours runs, the
    ONNX ensemble is trained on what it stored, and the rest runs with the ensemble loaded (same
    state throughout: the pipeline continues from its recovery snapshot)."""
    o = RunOptions(**options)
    settings = command_settings(ctx, clickhouse_dsn=o.dsn, clickhouse_database=o.database, data_dir=o.data_dir,
                                recovery_dir=o.recovery_dir, batch_size=o.batch_size, kafka_brokers=o.brokers,
                                kafka_topic=o.topic, model=o.model, kafka_instruments=parse_instruments(o.instruments))
    cluster.check_cluster_options(o.proc_id, o.addresses)
    _check_summary_json(o.summary_json)
    is_peer = o.proc_id is not None and o.proc_id > 0
    if is_peer and o.run_dir is not None:  # a local peer, started early: wait for process 0 (run_cluster.py)
        runner.await_release(o.run_dir)
    runner.install_stop_handlers(announce=not is_peer)  # Ctrl-C and SIGTERM stop the run with a summary (run_stop.py)
    run_dir = o.run_dir or settings.data_dir / "runs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    run_dir.mkdir(parents=True, exist_ok=True)

    t0, split_ms, phases = _phases(o)
    rec_dir = settings.recovery_dir or (run_dir / "recovery" if split_ms else None)
    fingerprint = recovery_fingerprint(o.source, settings, symbols=o.symbols, t0=t0, hours=o.hours, seed=o.seed,
                                       rate=o.rate, files=o.files, exchange=o.exchange, symbol=o.symbol, feeds=o.feeds)
    resuming = _resuming(o, settings, is_peer)
    # Kafka partitions without a snapshot in a recovery dir that is resumed were not read yet: from the start
    start_from = "earliest" if resuming else o.start_from
    if rec_dir is not None:  # refuse a recovery directory that another run uses, or that holds another source's state
        if not is_peer:
            recovery_dir.hold(rec_dir, on_wait=lambda: err_console.print(
                f"waiting for the processes of the previous run on {rec_dir} to end ...", highlight=False, soft_wrap=True))
        runner.claim_recovery_dir(rec_dir, fingerprint)
        if not is_peer and o.addresses is None:  # this process holds the directory and sees every partition
            _drop_unfinished_snapshots(rec_dir, o.quiet)

    counts = run_counts.RunCounts()
    progress_ui = None if (o.quiet or is_peer) else ProgressBar(counts)
    progress = runner.counting_progress(counts, progress_ui.update if progress_ui else None)
    live = (o.source == "kafka" and not o.eof) or o.source == "ccxt" or bool(o.speed)
    pace = None if o.clock == "event" or (o.clock == "auto" and not live) else (o.speed or 1.0)

    peers_of = (lambda k: cluster.start_peers(
        processes=o.processes, proc_id=o.proc_id, addresses_text=o.addresses, source=o.source, phase_end=phases[k],
        start_from=start_from, phase_path=cluster.phase_dir(run_dir, k, o.proc_id), recovery_dir=rec_dir))
    starting = peers_of(0)  # phase 0's peers start up while this process claims the store (run_cluster.py)
    if not is_peer and not o.no_store:  # schema first, with a clear error if the store is unusable
        with open_store(settings) as store:  # then: the store holds this run's trading rows or none (runs.py)
            _claim_store(store, settings, fingerprint, replace=o.replace, resuming=resuming,
                         train_split=o.train_split if o.source == "synthetic" else None)

    elapsed = 0.0
    for k, phase_end in enumerate(phases):
        starting = starting if k == 0 else peers_of(k)  # started before this process builds its flow
        src = build_source(o.source, settings, progress, symbols=o.symbols, t0=t0, end_ms=phase_end, seed=o.seed,
                           rate=o.rate, speed=o.speed, files=o.files, exchange=o.exchange, symbol=o.symbol,
                           feeds=o.feeds, duration=o.duration, exchange_factory=o.exchange_factory, eof=o.eof,
                           start_from=start_from, group=None if o.no_store else "store")
        # the first part of a train-then-score run is scored without any ensemble: one left over from
        # an earlier run on the same data would score it in-sample
        first_of_split = split_ms is not None and phase_end == split_ms  # (a peer runs the one phase it is told)
        flow = build_flow(settings, src, _sink(o, settings, counts, src), pace=pace,
                          ensemble=None if (o.no_store or first_of_split) else "auto",
                          control_lineage=lineage_of(rec_dir), snapshots=rec_dir is not None,
                          balance_workers=cluster.balance_workers(o.addresses, o.processes, o.workers),
                          recovery_dir=rec_dir, resuming=resuming)
        recovery = runner.recovery_config(rec_dir, o.processes * o.workers)
        phase_dir = cluster.phase_dir(run_dir, k, o.proc_id)
        addr_list, peers = starting
        runner.release_peers(phase_dir, peers)  # this process runs the dataflow now: so may they
        t_start = time.time()
        stop = _execute(flow, settings, o, recovery, addr_list, peers, progress_ui)
        elapsed += time.time() - t_start
        if stop is not None:
            if is_peer:  # what it did, for process 0's summary
                _leave_counts(counts, phase_dir, o.proc_id)
            else:
                runner.stop_peers(peers)
                if o.processes > 1:
                    run_counts.collect_counts(phase_dir, o.processes, counts)
            stopped(ctx, stop, counts, elapsed, settings, is_peer=is_peer,
                    resumable=settings.recovery_dir is not None, main_job=split_ms is not None)
        if o.source == "ccxt":
            src.check()  # FeedError: a feed failed for good, or a --duration run received nothing
        if is_peer:
            _leave_counts(counts, phase_dir, o.proc_id)
            return
        codes = runner.wait_peers(peers)
        if any(codes):
            raise click.ClickException(f"a pipeline process failed (exit codes {codes}); see its output above")
        if o.processes > 1:
            run_counts.collect_counts(phase_dir, o.processes, counts)
        if k < len(phases) - 1:
            try:
                train_and_show(settings, until_ms=phase_end, quiet=o.quiet)
            except ValueError as err:  # too little data for the folds: say so and go on without
                err_console.print(f"[yellow]no ONNX ensemble trained: {err}[/yellow]")

    _summarise(o, settings, counts, elapsed, src, resumed=rec_dir is not None and not split_ms, split_ms=split_ms)


def _drop_unfinished_snapshots(rec_dir: Path, quiet: bool) -> None:
    """Stale state a kill mid-epoch left behind (``dataflows.recovery_dir``), dropped once, before the
    first phase: a phase that ends cleanly leaves none for the next."""
    dropped = recovery_dir.drop_unfinished_snapshots(rec_dir)
    if dropped and dropped.snapshots and not quiet:
        err_console.print(f"resuming {rec_dir} from epoch {dropped.epoch}: dropped {dropped.snapshots} snapshot(s) "
                          "of the epoch(s) the stopped run did not finish; they run again", highlight=False,
                          soft_wrap=True)


def _check_summary_json(summary_json: Optional[Path]) -> None:
    """An output path that cannot be written fails now, not after the run."""
    if summary_json is not None:
        try:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise click.BadParameter(f"cannot create its directory {summary_json.parent}: {err.strerror}",
                                     param_hint="--summary-json") from None


def _phases(o: RunOptions) -> tuple[int, Optional[int], list[int]]:
    """The run's first minute, the end of the part the ensemble is trained on (None: no training
    between phases) and the event-time end of each phase."""
    t0 = parse_start(o.start)
    end_ms = t0 + int(o.hours * HOUR_MS)
    split_ms = None
    if o.source == "synthetic" and o.train_split > 0 and not o.no_store:
        split_ms = t0 + int(o.hours * o.train_split * 60) * MINUTE_MS  # a minute boundary
        split_ms = split_ms if t0 < split_ms < end_ms else None
    phases = [o.phase_end_ms] if o.phase_end_ms else ([split_ms, end_ms] if split_ms else [end_ms])
    return t0, split_ms, phases


def _resuming(o: RunOptions, settings: Settings, is_peer: bool) -> bool:
    """Whether this run resumes the state in ``--recovery-dir`` (refused with --replace)."""
    local_peer = is_peer and o.run_dir is not None  # started by process 0 (spawn_peers), which decided for it
    resuming = (not local_peer and settings.recovery_dir is not None
                and (settings.recovery_dir / runner.SOURCE_FILE).exists())
    if o.replace and resuming and not is_peer:
        raise click.BadParameter(f"--recovery-dir {settings.recovery_dir} holds a run's state: resumed after "
                                 "--replace, the rows it made before its snapshot would be gone; use a new "
                                 "--recovery-dir (or drop --replace to resume)", param_hint="--replace")
    return resuming


def _sink(o: RunOptions, settings: Settings, counts, src):
    """The store's sink (committing Kafka offsets once rows are stored), or a counting one for --no-store."""
    if o.no_store:

        return NullSink(counts.sink)

    return ClickHouseSink(settings.dsn(), settings.clickhouse_database, counts.sink,
                          settings.sink_flush_rows, settings.sink_flush_ms,
                          health_every_s=settings.health_every_s or None, process=o.proc_id or 0,
                          retry_s=settings.store_retry_s,
                          committer=src.offset_committer() if o.source == "kafka" else None)


def _execute(flow, settings: Settings, o: RunOptions, recovery, addresses, peers: list,
             progress_ui: Optional[ProgressBar]) -> Optional[BaseException]:
    """Run the phase's dataflow here; returns the stop (Ctrl-C, SIGTERM) that ended it early, None
    when it ran to its end. Any other error stops the peers first, then is raised."""
    try:
        if progress_ui:
            progress_ui.start()
        runner.execute(flow, epoch_interval_s=settings.epoch_interval_s, recovery=recovery,
                       addresses=addresses, proc_id=o.proc_id or 0, workers=o.workers)
    except BaseException as err:  # noqa: BLE001 - a stop is reported by the caller, anything else at the top
        if not is_stop(err):
            runner.stop_peers(peers, timeout_s=10)  # no peer is left waiting for this process
            raise
        return err
    finally:
        if progress_ui:
            progress_ui.stop()
    return None


def _leave_counts(counts, phase_dir: Path, proc_id: int) -> None:
    """A peer's counts (and peak memory, CPU time), for process 0's summary."""
    counts.peak_rss_mb, counts.cpu_s = run_counts.peak_rss_mb(), run_counts.cpu_s()
    (phase_dir / f"proc-{proc_id}.json").write_text(counts.to_json())


def _summarise(o: RunOptions, settings: Settings, counts, elapsed: float, src, *, resumed: bool,
               split_ms: Optional[int]) -> None:
    """After the last phase: the summary, the store's read-backs (model quality, strategies) and
    ``--summary-json``; a last flush the store did not take fails the run."""
    own_cpu_s = run_counts.cpu_s()  # before the read-backs below
    print_run_summary(counts, elapsed, settings, resumed=resumed,
                      replay=src.describe() if o.source == "replay" else None, stored=not o.no_store)
    if o.source == "kafka" and not settings.kafka_instruments:  # after the run: an error stays one line
        err_console.print("[yellow]note: no --instruments: instruments joined the portfolio as they arrived, so "
                          "with several partitions its decisions may depend on their order; name them "
                          "(like --feeds) for deterministic trading rows[/yellow]", highlight=False, soft_wrap=True)
    if counts.sink.store_error:  # the sink's last flush failed as it closed: say so, never exit 0
        raise Failure(f"the store did not take the last rows: {counts.sink.store_error}", 1)
    quality, strategies = [], []
    if not o.no_store:
        with open_store(settings) as store:  # one open for both read-backs (an open re-applies the schema)
            quality = print_model_quality(store, split_ms)
            strategies = print_strategies(store, settings.strategy_config().initial_equity)
    if o.summary_json:
        o.summary_json.write_text(json.dumps({
            "trades_in": counts.trades_in, "elapsed_s": elapsed, "trades_per_s": counts.trades_in / elapsed,
            "processes": o.processes, "workers": o.workers,
            "peak_rss_mb": [run_counts.peak_rss_mb(), *counts.peer_rss_mb.values()],
            "cpu_s_by_process": [own_cpu_s, *counts.peer_cpu_s.values()],
            "sink": asdict(counts.sink), "model_quality": quality, "strategies": strategies},
            indent=2, default=str))


def _claim_store(store, settings: Settings, fingerprint: dict, *, replace: bool, resuming: bool, **options) -> None:
    """Refuse a run into a store holding another run's trading rows (exit 2), or clear them with
    --replace; record the run (dataflows/runs.py)."""
    ident = runs.run_identity(fingerprint, settings, **options)
    try:
        done = runs.claim_store(store, ident, where=runs.store_name(settings), replace=replace, resuming=resuming,
                                command=shlex.join(["tapeflow", *sys.argv[1:]]))
    except runs.RunConflict as err:
        raise Failure(str(err), 2) from None
    if done["replaced"]:
        held = ", ".join(f"{t} {n:,}" for t, n in done["rows"].items())
        err_console.print(f"--replace: cleared the store's trading rows ({held})", highlight=False, soft_wrap=True)
