"""Commands that move trade tapes: live trades from exchanges into Kafka (``tapeflow ingest``), the
topic (``tapeflow topic create``), recorded files into Kafka (``tapeflow replay``) and synthetic
tapes written to files (``tapeflow tape synthetic``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import DEFAULT_SYMBOLS, command_settings, err_console, log, parse_start
from cli.source_options import ccxt_source
from dataflows.ingest import KafkaTapeSink, ParquetTapeSink, build_ingest_flow
from dataflows.kafka_topic import (
    KafkaUnavailable, TradeProducer, ensure_topic, preflight, publish_tape,
)
from dataflows.runner import execute
from operators import synthetic
from operators.tape_files import ReplayFormatError


@click.command()
@click.option("--feeds", required=True,
              help="'exchange:SYM,SYM;exchange2:SYM', e.g. 'binanceusdm:BTC/USDT:USDT;bybit:BTC/USDT:USDT'")
@click.option("--brokers", default=None)
@click.option("--topic", "topic_name", default=None)
@click.option("--partitions", type=int, default=None, help="create the topic with this many partitions if missing")
@click.option("--record", "record_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="also record the normalised tape as Parquet files here: trades and perp data "
                   "(replay them with --source replay --file ...)")
@click.option("--duration", type=float, default=None, help="stop after this many seconds (default: run forever)")
@click.option("--exchange-factory", default=None, help="module:callable making exchange objects (default ccxt.pro)")
@click.pass_context
def ingest(ctx: click.Context, feeds: str, brokers: Optional[str], topic_name: Optional[str],
           partitions: Optional[int], record_dir: Optional[Path], duration: Optional[float],
           exchange_factory: Optional[str]) -> None:
    """Live trades from exchanges (ccxt.pro websockets) into Kafka, with gap backfill."""
    settings = command_settings(ctx, kafka_brokers=brokers, kafka_topic=topic_name, kafka_partitions=partitions)
    try:
        preflight(settings.kafka_brokers)
        ensure_topic(settings.kafka_brokers, settings.kafka_topic, settings.kafka_partitions)
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    src = ccxt_source(feeds, duration, exchange_factory, settings)
    flow = build_ingest_flow(src, KafkaTapeSink(settings.kafka_brokers, settings.kafka_topic),
                             ParquetTapeSink(record_dir) if record_dir else None,
                             heartbeat_dir=settings.data_dir / "heartbeat")
    log.info("ingesting %s into %s on %s", feeds, settings.kafka_topic, settings.kafka_brokers)
    execute(flow, epoch_interval_s=settings.epoch_interval_s, recovery=None)
    src.check()  # FeedError: a feed failed for good, or a --duration run received nothing


@click.group()
def topic() -> None:
    """Kafka topic administration."""


@topic.command("create")
@click.argument("name", required=False)
@click.option("--partitions", type=int, default=None, help="default TAPEFLOW_KAFKA_PARTITIONS (6)")
@click.option("--brokers", default=None)
@click.pass_context
def topic_create(ctx: click.Context, name: Optional[str], partitions: Optional[int], brokers: Optional[str]) -> None:
    """Create the trade topic (or NAME) if it does not exist."""
    settings = command_settings(ctx, kafka_brokers=brokers, kafka_partitions=partitions)
    name = name or settings.kafka_topic
    try:
        preflight(settings.kafka_brokers)
        created = ensure_topic(settings.kafka_brokers, name, settings.kafka_partitions)
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"topic {name}: {'created with ' + str(settings.kafka_partitions) + ' partitions' if created else 'exists'}")


@click.command()
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
    settings = command_settings(ctx, kafka_brokers=brokers, kafka_topic=topic_name, kafka_partitions=partitions)
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


@click.group()
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
    t0, minutes = parse_start(start), int(hours * 60)
    df = synthetic.tape([s.strip() for s in symbols.split(",") if s.strip()], seed, t0, minutes, rate=rate,
                        exchange=exchange)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(out) if out.suffix == ".csv" else df.write_parquet(out)
    click.echo(f"wrote {df.height:,} trades to {out}")
