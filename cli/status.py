"""``tapeflow status``: one screen of what matters while the pipeline runs (feeds, watermark lag,
trades/s, equity and positions, kill switch, models and their calibration, optimizer leaders),
read from the store and the ingest heartbeat. Everything here only reads."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli.common import command_settings, embedded_path, open_store, out_console
from cli.health import fmt_age, fmt_ts, pipeline_stalls, to_ms, wall_ms
from cli.summaries import kill_switch_status, leaderboard
from dataflows.control import pending
from dataflows.heartbeat import heartbeat_dir, read_ingest
from sinks.embedded import embedded_holder, embedded_open
from sinks.store import redact_dsn


@dataclass
class Status:
    """Everything ``tapeflow status`` shows; each section is empty (shown as "none") when the
    store has no data for it."""

    now_ms: int
    store: str
    pipeline: dict = field(default_factory=dict)
    stalls: list = field(default_factory=list)
    instruments: list = field(default_factory=list)
    ingest: Optional[dict] = None
    strategies: list = field(default_factory=list)
    variants: int = 0
    guards: list = field(default_factory=list)
    pending_resets: int = 0
    models: list = field(default_factory=list)
    leaders: list = field(default_factory=list)


def read_status(store, heartbeat: Path, data_dir: Path, store_name: str, now_ms: Optional[int] = None,
                max_stall_s: float = 120.0, running: Optional[bool] = None) -> Status:
    """Everything the status screen shows, read from the store, the heartbeat and the control directory
    (``running``: as ``cli.health.pipeline_stalls``)."""
    now = now_ms if now_ms is not None else wall_ms()
    st = Status(now, store_name)
    st.stalls = pipeline_stalls(store, now, max_stall_s, running)
    st.pipeline = _pipeline(store)
    st.instruments = _instruments(store)
    st.ingest = read_ingest(heartbeat)
    st.strategies, st.variants = _strategies(store)
    st.guards = _guards(store)
    st.pending_resets = len(pending(data_dir))
    st.models = _models(store)
    st.leaders = [r for r in leaderboard(store) if r["origin"] != "production"][:3]
    return st


def _pipeline(store) -> dict:
    rows = store.query_dicts("SELECT max(ts) AS last_ts, argMax(trades_per_s, ts) AS rate, "
                             "argMax(rss_mb, ts) AS rss, argMax(trades_total, ts) AS total, "
                             "max(watermark) AS wm, count() AS n FROM pipeline_health "
                             "WHERE ts >= (SELECT max(ts) FROM pipeline_health) - INTERVAL 1 DAY")
    if not rows or not rows[0]["n"]:
        return {}
    r = rows[0]
    (recent,) = store.query_dicts("SELECT sum(trades_in) AS trades, sum(late_trades) AS late, "
                                  "sum(dead_letters) AS dead FROM pipeline_health "
                                  "WHERE ts >= (SELECT max(ts) FROM pipeline_health) - INTERVAL 5 MINUTE")
    return {"last_row_ms": to_ms(r["last_ts"]), "trades_per_s": r["rate"], "rss_mb": r["rss"],
            "trades_total": r["total"], "watermark_ms": to_ms(r["wm"]), **recent}


def _instruments(store) -> list[dict]:
    """Per instrument: end of its newest 1m bar (a minute that had trades) and its event-time
    trade rate over its last five bar-minutes."""
    rows = store.query_dicts("SELECT b.exchange AS exchange, b.symbol AS symbol, max(b.end) AS last_end, "
                             "sum(b.trades) / 300 AS trades_per_s "
                             "FROM bars AS b FINAL "
                             "INNER JOIN (SELECT exchange, symbol, max(start) AS last_start FROM bars "
                             "            WHERE tf = '1m' GROUP BY exchange, symbol) AS l "
                             "ON b.exchange = l.exchange AND b.symbol = l.symbol "
                             "WHERE b.tf = '1m' AND b.start > l.last_start - INTERVAL 5 MINUTE "
                             "GROUP BY b.exchange, b.symbol ORDER BY exchange, symbol")
    return [{**r, "last_end": to_ms(r["last_end"])} for r in rows]


def _strategies(store) -> tuple[list[dict], int]:
    rows = store.query_dicts(
        "SELECT origin, strategy_id, variant_id, max(ts) AS marked, argMax(equity, (ts, seq)) AS eq, "
        "argMax(open_positions, (ts, seq)) AS positions, argMax(drawdown, (ts, seq)) AS dd, "
        "argMax(halted, (ts, seq)) AS is_halted FROM equity GROUP BY origin, strategy_id, variant_id "
        "ORDER BY origin = 'production' DESC, strategy_id, variant_id")
    prod = [{"origin": r["origin"], "strategy_id": r["strategy_id"], "variant_id": r["variant_id"], "ts": to_ms(r["marked"]),
             "equity": r["eq"], "open_positions": r["positions"], "drawdown": r["dd"], "halted": r["is_halted"]}
            for r in rows if r["origin"] == "production"]
    return prod, len(rows) - len(prod)


GUARD_SQL = """
SELECT source, guard, active, at, last_reason AS reason FROM (
    SELECT concat('strategy:', strategy_id, '/', variant_id) AS source, 'kill_switch' AS guard,
           toUInt8(argMax(halted, (ts, seq))) AS active, max(ts) AS at, '' AS last_reason
    FROM equity WHERE origin = 'production' GROUP BY strategy_id, variant_id
    UNION ALL
    SELECT toString(source) AS source, if(kind = 'pause_end', toString(reason), toString(kind)) AS guard,
           toUInt8(argMax(kind != 'pause_end', ts)) AS active, max(ts) AS at, argMax(toString(reason), ts) AS last_reason
    FROM events
    WHERE (kind IN ('daily_loss_limit', 'consecutive_losses')
           OR (kind = 'pause_end' AND reason IN ('daily_loss_limit', 'consecutive_losses')))
      AND JSONExtractString(detail, 'origin') = 'production'
    GROUP BY source, guard
) ORDER BY source, guard
"""


def _guards(store) -> list[dict]:
    """Production kill switch (the latest equity mark's ``halted``) and loss pauses (the latest of
    a pause event and its ``pause_end``), with the reason of the last kill-switch trip."""
    rows = store.query_dicts(GUARD_SQL)
    trips = {r["source"]: r for r in kill_switch_status(store)}
    for r in rows:
        r["at"] = to_ms(r["at"])
        if r["guard"] == "kill_switch" and r["source"] in trips:
            t = trips[r["source"]]
            r["reason"] = f"last {t['last_kind']} at {fmt_ts(to_ms(t['at']))}: {t['reason']}"
    return rows


MODELS_SQL = """
SELECT model, argMax(version, start) AS version, max(start) AS last_start
FROM predictions GROUP BY model ORDER BY model
"""


CALIBRATION_SQL = """
WITH (SELECT max(start) FROM prediction_outcomes) AS newest
SELECT model, count() AS n, avg(-log(greatest(p_true, 1e-15))) AS log_loss,
       -(  if(countIf(label = 0) > 0, countIf(label = 0) / count() * log(countIf(label = 0) / count()), 0)
         + if(countIf(label = 1) > 0, countIf(label = 1) / count() * log(countIf(label = 1) / count()), 0)
         + if(countIf(label = 2) > 0, countIf(label = 2) / count() * log(countIf(label = 2) / count()), 0))
         AS prior_log_loss,
       avg(brier) AS brier, avg(predicted = label) AS accuracy
FROM prediction_outcomes WHERE start > newest - INTERVAL 1 DAY GROUP BY model
"""


ECE_SQL = """
WITH (SELECT max(start) FROM prediction_outcomes) AS newest
SELECT model, sum(abs(hit - conf) * n) / sum(n) AS ece FROM (
    SELECT model, least(toUInt8(floor(greatest(p_down, p_flat, p_up) * 10)), 9) AS bin, count() AS n,
           avg(predicted = label) AS hit, avg(greatest(p_down, p_flat, p_up)) AS conf
    FROM prediction_outcomes WHERE start > newest - INTERVAL 1 DAY GROUP BY model, bin)
GROUP BY model
"""


def _models(store) -> list[dict]:
    models = {r["model"]: {**r, "last_start": to_ms(r["last_start"])} for r in store.query_dicts(MODELS_SQL)}
    for r in store.query_dicts(CALIBRATION_SQL):
        models.setdefault(r["model"], {"model": r["model"], "version": "", "last_start": None}).update(r)
    for r in store.query_dicts(ECE_SQL):
        if r["model"] in models:
            models[r["model"]]["ece"] = r["ece"]
    return [models[m] for m in sorted(models)]


def render(st: Status):
    """The status as one rich renderable (a group of small tables)."""
    now = st.now_ms
    parts: list = [Text.from_markup(f"[bold]tapeflow status[/bold]  {fmt_ts(now)}  ·  store {st.store}")]

    p = st.pipeline
    t = Table(title="pipeline", title_justify="left", show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    if not p:
        t.add_row("pipeline_health", "none (no row yet: is the pipeline running with health_every_s > 0?)")
    else:
        live = "[green]making progress[/green]" if not st.stalls else f"[red]{'; '.join(st.stalls)}[/red]"
        t.add_row("liveness", live)
        t.add_row("last health row", f"{fmt_ts(p['last_row_ms'])} ({fmt_age((now - p['last_row_ms']) / 1000)} ago)")
        wm = p.get("watermark_ms")
        t.add_row("watermark", "none (no minute closed yet)" if wm is None else
                  f"{fmt_ts(wm)} (lag {fmt_age((now - wm) / 1000)})")
        t.add_row("trades/s", f"{p['trades_per_s']:,.1f} (latest interval)  ·  {p['trades_total'] or 0:,} since start")
        t.add_row("last 5 min", f"{p['trades'] or 0:,} trades, {p['late'] or 0:,} late, {p['dead'] or 0:,} dead letters")
        t.add_row("memory", f"{p['rss_mb']:,.0f} MB")
    parts.append(t)

    t = Table(title="feeds", title_justify="left")
    for c in ("instrument", "last trade (ingest)", "trades (ingest)", "last 1m bar end", "trades/s (last 5 bars)"):
        t.add_column(c, justify="right" if c != "instrument" else "left")
    feeds = (st.ingest or {}).get("feeds", {})
    bars = {f"{r['exchange']}:{r['symbol']}": r for r in st.instruments}
    for inst in sorted(set(feeds) | set(bars)):
        f, b = feeds.get(inst), bars.get(inst)
        recv = f.get("last_recv_ms") if f else None
        t.add_row(inst,
                  "-" if not f else "none yet" if recv is None else f"{fmt_age((now - recv) / 1000)} ago",
                  "-" if not f else f"{f['trades']:,}",
                  "-" if not b else f"{fmt_ts(b['last_end'])} ({fmt_age((now - b['last_end']) / 1000)} ago)",
                  "-" if not b else f"{b['trades_per_s']:.2f}")
    if not feeds and not bars:
        t.add_row("none", "", "", "", "")
    parts.append(t)
    if st.ingest is None:
        parts.append(Text("ingest heartbeat: none (no `tapeflow ingest` heartbeat in this data dir)"))

    t = Table(title="strategies (production, latest equity mark)", title_justify="left")
    for c in ("strategy", "equity", "open positions", "drawdown", "state", "marked"):
        t.add_column(c, justify="right" if c != "strategy" else "left")
    guards = {(g["source"], g["guard"]): g for g in st.guards}
    for r in st.strategies:
        src = f"strategy:{r['strategy_id']}/{r['variant_id']}"
        paused = [g["guard"] for (s, k), g in guards.items() if s == src and k != "kill_switch" and g["active"]]
        state = "[red]HALTED (kill switch)[/red]" if r["halted"] else \
            f"[yellow]paused: {', '.join(paused)}[/yellow]" if paused else "trading"
        t.add_row(f"{r['strategy_id']}/{r['variant_id']}", f"{r['equity']:,.2f}", str(r["open_positions"]),
                  f"{r['drawdown']:.2%}", state, fmt_ts(r["ts"]))
    if not st.strategies:
        t.add_row("none", "", "", "", "", "")
    parts.append(t)
    ks = [g for g in st.guards if g["guard"] == "kill_switch" and g["active"]]
    line = "kill switch: " + ("; ".join(f"[red]HALTED[/red] {g['source']} ({g['reason']})" for g in ks)
                              if ks else "not tripped" if st.strategies else "none (no equity marks)")
    if st.pending_resets:
        line += f"  ·  {st.pending_resets} reset request(s) waiting for the pipeline"
    if st.variants:
        line += f"  ·  {st.variants} experimental variant(s) (leaders below)"
    parts.append(Text.from_markup(line))

    t = Table(title="models (calibration over the last day of matured predictions)", title_justify="left")
    for c in ("model", "version", "last scored", "labels", "log loss", "prior", "Brier", "accuracy", "ECE"):
        t.add_column(c, justify="right" if c != "model" else "left")

    def num(v, f):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)

    for m in st.models:
        n = m.get("n")
        t.add_row(m["model"], (m.get("version") or "-")[:28], fmt_ts(m.get("last_start")),
                  "none" if not n else f"{n:,}", num(m.get("log_loss"), ".4f"), num(m.get("prior_log_loss"), ".4f"),
                  num(m.get("brier"), ".4f"), num(m.get("accuracy"), ".3f"), num(m.get("ece"), ".3f"))
    if not st.models:
        t.add_row("none", "", "", "", "", "", "", "", "")
    parts.append(t)

    t = Table(title="optimizer leaders", title_justify="left")
    for c in ("variant", "status", "trades", "ROI", "Sharpe", "DSR"):
        t.add_column(c, justify="right" if c != "variant" else "left")
    for r in st.leaders:
        t.add_row(f"{r['strategy_id']}/{r['variant_id']}", r["status"], f"{r['trades']:,}", f"{r['roi']:.2%}",
                  num(r["sharpe"], ".2f"), num(r["dsr"], ".3f"))
    if not st.leaders:
        t.add_row("none (optimizer off or no metrics yet)", "", "", "", "", "")
    parts.append(t)
    return Group(*parts)


@click.command()
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
    settings = command_settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    name = f"{settings.clickhouse_database} @ {redact_dsn(settings.dsn())}"
    if embedded_holder(settings.dsn()) is not None:
        raise click.ClickException(
            f"the embedded store {embedded_path(settings.dsn())} is in use by another process (a running `tapeflow run`?): only one "
            "process can open it. While the pipeline runs, point status at a ClickHouse server "
            "(--dsn http://user:pw@host:8123); or run it after the pipeline stops.")
    running = embedded_open(settings.dsn())  # before this process opens it (None: a server)
    with open_store(settings, must_exist=True) as store:

        def snapshot():
            return render(read_status(store, heartbeat_dir(settings.data_dir), settings.data_dir, name,
                                      max_stall_s=max_stall_s, running=running))

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
