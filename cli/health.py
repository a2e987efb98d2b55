"""``tapeflow health``: liveness checks for container health checks, read from the store and the
ingest heartbeat; and the small readers and formatters ``tapeflow status`` shares with them.

Liveness, not reachability. The pipeline writes ``pipeline_health`` rows from its sink with its
watermark (newest 1m bar end) and start time (sinks/health.py); the ingest writes a heartbeat
file (dataflows/heartbeat.py). A process can answer pings while making no progress: a dead
websocket, a stuck source, a feed that only sends garbage. So the checks look at progress:

- pipeline: the newest ``pipeline_health`` row is older than the bound (the sink has written
  nothing: no trade reached a closed minute), or the watermark of the current run has not moved
  for longer than the bound (rows still come, e.g. dead letters, but no minute closes);
- ingest: a venue has received no trade for longer than the bound (or none since start).

Each finding is one line saying what stalled and since when. Everything here only reads.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import click

from cli.common import command_settings, embedded_path
from dataflows.heartbeat import heartbeat_dir, read_ingest
from dataflows.kafka_topic import KafkaUnavailable, preflight
from sinks.embedded import embedded_holder, embedded_open
from sinks.store import Store, StoreError, redact_dsn


def wall_ms() -> int:
    """Now, in epoch ms."""
    return time.time_ns() // 1_000_000


def fmt_ts(ms: Optional[int]) -> str:
    """Epoch ms as a UTC time to the second; "-" for None."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_age(seconds: Optional[float]) -> str:
    """A duration in the unit that reads best (s, min, h, d); "-" for None."""
    if seconds is None:
        return "-"
    s = max(seconds, 0.0)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def to_ms(v: Any) -> Optional[int]:
    """A DateTime64 read back (aware or naive UTC datetime) -> epoch ms."""
    if v is None:
        return None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return int(round(v.timestamp() * 1000))
    return int(v)


def pipeline_stalls(store, now_ms: int, max_stall_s: float, running: Optional[bool] = None) -> list[str]:
    """Findings about the pipeline's progress (empty: it is making progress). ``running``: False when
    no process has the embedded store open (``sinks.embedded.embedded_open``, asked before this
    process opened it): then no pipeline writes to it, however fresh its newest row."""
    bound = max_stall_s * 1000
    try:
        (last,) = store.query_dicts("SELECT count() AS n, max(ts) AS last_ts, argMax(started, ts) AS last_started "
                                    "FROM pipeline_health")
    except Exception as err:  # noqa: BLE001 - a store without the table or the 008 columns
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"pipeline: cannot read pipeline_health ({first[:200]}); has the pipeline started once with "
                "this version (it applies infra/clickhouse/008_liveness.sql)?"]
    if not last["n"]:
        return ["pipeline: no pipeline_health row at all (is the pipeline running, with health_every_s > 0?)"]
    newest = to_ms(last["last_ts"])
    if running is False:
        return [f"pipeline not running: nothing has the embedded store open (a running pipeline keeps it open); "
                f"its newest pipeline_health row is from {fmt_ts(newest)} ({fmt_age((now_ms - newest) / 1000)} ago)"]
    if now_ms - newest > bound:
        return [f"pipeline stalled: no pipeline_health row since {fmt_ts(newest)} "
                f"({fmt_age((now_ms - newest) / 1000)} ago; bound {max_stall_s:g} s)"]
    started = to_ms(last["last_started"])
    if started is None:  # rows from a pipeline older than the liveness columns: only the row age is known
        return []
    (run,) = store.query_dicts("WITH (SELECT max(watermark) FROM pipeline_health "
                               "      WHERE toUnixTimestamp64Milli(started) = {s:Int64}) AS wm "
                               "SELECT wm, minIf(ts, watermark = wm) AS since FROM pipeline_health "
                               "WHERE toUnixTimestamp64Milli(started) = {s:Int64}", {"s": started})
    wm = to_ms(run["wm"])
    if wm is None:
        if now_ms - started > bound:
            return [f"pipeline stalled: no minute has closed since the pipeline started at {fmt_ts(started)} "
                    f"({fmt_age((now_ms - started) / 1000)} ago; bound {max_stall_s:g} s)"]
        return []
    since = to_ms(run["since"])
    if now_ms - since > bound:
        return [f"pipeline stalled: watermark stuck at {fmt_ts(wm)} since {fmt_ts(since)} "
                f"({fmt_age((now_ms - since) / 1000)} ago; bound {max_stall_s:g} s)"]
    return []


def ingest_stalls(directory: Path, now_ms: int, max_stall_s: float) -> list[str]:
    """Findings about the ingest heartbeat in ``directory`` (empty: every venue receives trades)."""
    bound = max_stall_s * 1000
    beat = read_ingest(directory)
    if beat is None:
        return [f"ingest: no heartbeat in {directory} (is `tapeflow ingest` running with this data dir?)"]
    out = []
    if now_ms - beat["updated_ms"] > bound and not beat["venues"]:
        out.append(f"ingest stalled: heartbeat not updated since {fmt_ts(beat['updated_ms'])}")
    for name, v in sorted(beat["venues"].items()):
        last = v["last_recv_ms"]
        ev = v.get("last_event")
        hint = f"; last event {ev['kind']} at {fmt_ts(ev['at_ms'])}: {ev['reason'][:80]}" if ev else ""
        if last is None:
            if now_ms - beat["started_ms"] > bound:
                out.append(f"ingest stalled: {name} no trade received since start at {fmt_ts(beat['started_ms'])} "
                           f"({fmt_age((now_ms - beat['started_ms']) / 1000)} ago; bound {max_stall_s:g} s{hint})")
        elif now_ms - last > bound:
            out.append(f"ingest stalled: {name} no trade received since {fmt_ts(last)} "
                       f"({fmt_age((now_ms - last) / 1000)} ago; bound {max_stall_s:g} s{hint})")
    return out


@click.command()
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
    settings = command_settings(ctx, kafka_brokers=brokers, clickhouse_dsn=dsn, clickhouse_database=database,
                                data_dir=data_dir)
    pipeline = clickhouse if pipeline is None else pipeline
    problems = []
    if kafka:
        try:
            preflight(settings.kafka_brokers, timeout_s=timeout)
        except KafkaUnavailable as err:
            problems.append(str(err))
    embedded = embedded_path(settings.dsn())
    if not (clickhouse or pipeline):
        pass
    elif embedded is not None and not embedded.exists():
        problems.append(f"ClickHouse: no embedded store at {embedded} (check --data-dir / --dsn)")
    elif embedded_holder(settings.dsn()) is not None:
        problems.append(f"ClickHouse: the embedded store {embedded} is in use by another process (a running "
                        "pipeline?) and cannot be checked from here; use a ClickHouse server DSN for live checks")
    else:
        import clickhouse_connect

        store = None
        running = embedded_open(settings.dsn())  # before this process opens it
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
                problems.extend(pipeline_stalls(store, wall_ms(), max_stall_s, running))
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
