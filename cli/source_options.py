"""From the options of ``tapeflow run`` and ``tapeflow ingest`` to a pipeline source (synthetic,
replay files, Kafka or ccxt venues), and the fingerprint a recovery directory is claimed with."""

from __future__ import annotations

from typing import Optional

import click

from dataflows import runner
from dataflows.config import Settings
from dataflows.kafka_source import KafkaBatchSource, default_group
from dataflows.kafka_topic import KafkaUnavailable, preflight
from dataflows.replay_source import ReplaySource
from dataflows.synthetic_source import SyntheticSource
from operators.venue_trades import parse_symbols


def recovery_fingerprint(source: str, settings: Settings, *, symbols: str, t0: int, hours: float, seed: int,
                         rate: Optional[float], files, exchange, symbol, feeds) -> dict:
    """What a recovery directory belongs to (dataflows.runner.claim_recovery_dir), from the run's
    options: the same input resumes, any other is refused."""
    if source == "synthetic":
        return runner.source_fingerprint(source, symbols=[s.strip() for s in symbols.split(",") if s.strip()],
                                         start_ms=t0, hours=hours, seed=seed, rate=rate)
    if source == "replay":
        return runner.source_fingerprint(source, files=list(files), exchange=exchange, symbol=symbol)
    if source == "kafka":
        return runner.source_fingerprint(source, brokers=settings.kafka_brokers, topic=settings.kafka_topic)
    return runner.source_fingerprint(source, feeds=feeds)


def build_source(source: str, settings: Settings, progress, *, symbols: str, t0: int, end_ms: int, seed: int,
                 rate: Optional[float], speed: Optional[float], files, exchange, symbol, feeds, duration,
                 exchange_factory, eof: bool, start_from: str = "committed", group: Optional[str] = "store"):
    """The ``--source`` of a run, for the phase that ends at ``end_ms`` (synthetic); every problem
    with its options or input as a click error, before the dataflow starts."""
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
        return ccxt_source(feeds, duration, exchange_factory, settings, progress)

    try:
        preflight(settings.kafka_brokers, settings.kafka_topic)
    except KafkaUnavailable as err:
        raise click.ClickException(str(err)) from None
    return KafkaBatchSource(settings.kafka_brokers, settings.kafka_topic, tail=not eof,
                            batch_size=settings.kafka_batch_size, progress=progress, start=start_from,
                            universe=tuple(settings.kafka_instruments), max_skew_ms=settings.kafka_max_skew_ms,
                            max_hold_s=settings.kafka_max_hold_s,
                            group_id=default_group(settings.dsn(), settings.clickhouse_database) if group else None)


def parse_instruments(text: Optional[str]) -> Optional[list[str]]:
    """``--instruments`` in the ``--feeds`` syntax (``exchange:SYM1,SYM2;exchange2:SYM3``) as
    ``exchange:symbol`` strings."""
    if text is None or not text.strip():  # "" (an unset compose variable): none declared
        return None
    try:
        return [f"{ex}:{sym}" for ex, syms in parse_symbols(text).items() for sym in syms]
    except ValueError as err:
        raise click.BadParameter(f"{err} (e.g. binanceusdm:BTC/USDT:USDT,ETH/USDT:USDT;bybit:BTC/USDT:USDT)",
                                 param_hint="--instruments") from None


def ccxt_source(feeds: Optional[str], duration: Optional[float], factory: Optional[str], settings: Settings,
                progress=None):
    """The ccxt source of ``--feeds`` (live venues, with perp polling), for ``run`` and ``ingest``."""
    from dataflows.venue_perp_feed import PerpPolling  # ccxt (~0.8 s): only for a ccxt source
    from dataflows.venue_source import CcxtSource, load_factory  # ccxt

    if not feeds:
        raise click.UsageError("--source ccxt needs --feeds 'exchange:SYM,SYM' (e.g. binanceusdm:BTC/USDT:USDT)")
    try:
        # perp polling from these settings (--config included); a scripted venue's own ``perp`` wins
        perp = None if factory and getattr(load_factory(factory), "perp", None) else PerpPolling.from_settings(settings)
        return CcxtSource(parse_symbols(feeds), factory_path=factory, duration_s=duration,
                          batch_size=settings.batch_size, progress=progress, perp=perp)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
