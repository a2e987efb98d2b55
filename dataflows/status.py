"""The operator's view: liveness checks (``tapeflow health``) and the one-screen status
(``tapeflow status``), read from the store and the ingest heartbeat.

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

import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from dataflows.heartbeat import read_ingest

DAY_MS = 86_400_000
MIN_OUTCOMES = 200  # matured predictions needed before calibration is judged (alerts use the same floor)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def fmt_ts(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_age(seconds: Optional[float]) -> str:
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


def _ms(v: Any) -> Optional[int]:
    """A DateTime64 read back (aware or naive UTC datetime) -> epoch ms."""
    if v is None:
        return None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return int(round(v.timestamp() * 1000))
    return int(v)


def embedded_path(dsn: str) -> Optional[Path]:
    """The directory of an embedded (chdb://) store; None for a server DSN."""
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return Path(parts.path) if parts.scheme == "chdb" else None


def embedded_store_in_use(dsn: str) -> Optional[Path]:
    """The directory of an embedded (chdb://) store that another process holds open, else None.

    The engine locks ``<dir>/status`` (flock) while it runs and removes it at exit; chdb's own
    error for a second opener does not say so (only its stderr does), hence this look. A store
    this process itself has open (its engine holds the file) is not "in use": it can be read."""
    import fcntl

    path = embedded_path(dsn)
    if path is None:
        return None
    status_file = path / "status"
    try:
        fd = os.open(status_file, os.O_RDONLY)
    except OSError:
        return None  # no engine has it open
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return None if _open_here(status_file, skip=fd) else path
    finally:
        os.close(fd)


def _open_here(path: Path, skip: int) -> bool:
    """Whether this process has ``path`` open on a descriptor other than ``skip`` (Linux /proc)."""
    target = str(path.resolve())
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return False
    for fd in fds.iterdir():
        try:
            if int(fd.name) != skip and os.readlink(fd) == target:
                return True
        except (OSError, ValueError):
            continue
    return False


def _rows(store, sql: str, params: Optional[dict] = None) -> list[dict]:
    cols, rows = store.query(sql, params)
    return [dict(zip(cols, r)) for r in rows]


# ------------------------------------------------------------------------------------- liveness

def pipeline_stalls(store, now_ms: int, max_stall_s: float) -> list[str]:
    """Findings about the pipeline's progress (empty: it is making progress)."""
    bound = max_stall_s * 1000
    try:
        (last,) = _rows(store, "SELECT count() AS n, max(ts) AS last_ts, argMax(started, ts) AS last_started "
                               "FROM pipeline_health")
    except Exception as err:  # noqa: BLE001 - a store without the table or the 008 columns
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"pipeline: cannot read pipeline_health ({first[:200]}); has the pipeline started once with "
                "this version (it applies infra/clickhouse/008_liveness.sql)?"]
    if not last["n"]:
        return ["pipeline: no pipeline_health row at all (is the pipeline running, with health_every_s > 0?)"]
    newest = _ms(last["last_ts"])
    if now_ms - newest > bound:
        return [f"pipeline stalled: no pipeline_health row since {fmt_ts(newest)} "
                f"({fmt_age((now_ms - newest) / 1000)} ago; bound {max_stall_s:g} s)"]
    started = _ms(last["last_started"])
    if started is None:  # rows from a pipeline older than the liveness columns: only the row age is known
        return []
    (run,) = _rows(store,
                   "WITH (SELECT max(watermark) FROM pipeline_health "
                   "      WHERE toUnixTimestamp64Milli(started) = {s:Int64}) AS wm "
                   "SELECT wm, minIf(ts, watermark = wm) AS since FROM pipeline_health "
                   "WHERE toUnixTimestamp64Milli(started) = {s:Int64}", {"s": started})
    wm = _ms(run["wm"])
    if wm is None:
        if now_ms - started > bound:
            return [f"pipeline stalled: no minute has closed since the pipeline started at {fmt_ts(started)} "
                    f"({fmt_age((now_ms - started) / 1000)} ago; bound {max_stall_s:g} s)"]
        return []
    since = _ms(run["since"])
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


# --------------------------------------------------------------------------------------- status

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
                max_stall_s: float = 120.0) -> Status:
    from dataflows.control import pending
    from dataflows.reporting import leaderboard

    now = now_ms if now_ms is not None else wall_ms()
    st = Status(now, store_name)
    st.stalls = pipeline_stalls(store, now, max_stall_s)
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
    rows = _rows(store, "SELECT max(ts) AS last_ts, argMax(trades_per_s, ts) AS rate, "
                        "argMax(rss_mb, ts) AS rss, argMax(trades_total, ts) AS total, "
                        "max(watermark) AS wm, count() AS n FROM pipeline_health "
                        "WHERE ts >= (SELECT max(ts) FROM pipeline_health) - INTERVAL 1 DAY")
    if not rows or not rows[0]["n"]:
        return {}
    r = rows[0]
    (recent,) = _rows(store, "SELECT sum(trades_in) AS trades, sum(late_trades) AS late, "
                             "sum(dead_letters) AS dead FROM pipeline_health "
                             "WHERE ts >= (SELECT max(ts) FROM pipeline_health) - INTERVAL 5 MINUTE")
    return {"last_row_ms": _ms(r["last_ts"]), "trades_per_s": r["rate"], "rss_mb": r["rss"],
            "trades_total": r["total"], "watermark_ms": _ms(r["wm"]), **recent}


def _instruments(store) -> list[dict]:
    """Per instrument: end of its newest 1m bar (a minute that had trades) and its event-time
    trade rate over its last five bar-minutes."""
    rows = _rows(store,
                 "SELECT b.exchange AS exchange, b.symbol AS symbol, max(b.end) AS last_end, "
                 "sum(b.trades) / 300 AS trades_per_s "
                 "FROM bars AS b FINAL "
                 "INNER JOIN (SELECT exchange, symbol, max(start) AS last_start FROM bars "
                 "            WHERE tf = '1m' GROUP BY exchange, symbol) AS l "
                 "ON b.exchange = l.exchange AND b.symbol = l.symbol "
                 "WHERE b.tf = '1m' AND b.start > l.last_start - INTERVAL 5 MINUTE "
                 "GROUP BY b.exchange, b.symbol ORDER BY exchange, symbol")
    return [{**r, "last_end": _ms(r["last_end"])} for r in rows]


def _strategies(store) -> tuple[list[dict], int]:
    rows = _rows(store,
                 "SELECT origin, strategy_id, variant_id, max(ts) AS marked, argMax(equity, (ts, seq)) AS eq, "
                 "argMax(open_positions, (ts, seq)) AS positions, argMax(drawdown, (ts, seq)) AS dd, "
                 "argMax(halted, (ts, seq)) AS is_halted FROM equity GROUP BY origin, strategy_id, variant_id "
                 "ORDER BY origin = 'production' DESC, strategy_id, variant_id")
    prod = [{"origin": r["origin"], "strategy_id": r["strategy_id"], "variant_id": r["variant_id"], "ts": _ms(r["marked"]),
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
    from dataflows.reporting import kill_switch_status

    rows = _rows(store, GUARD_SQL)
    trips = {r["source"]: r for r in kill_switch_status(store)}
    for r in rows:
        r["at"] = _ms(r["at"])
        if r["guard"] == "kill_switch" and r["source"] in trips:
            t = trips[r["source"]]
            r["reason"] = f"last {t['last_kind']} at {fmt_ts(_ms(t['at']))}: {t['reason']}"
    return rows


MODELS_SQL = """
SELECT model, argMax(version, start) AS version, max(start) AS last_start
FROM predictions GROUP BY model ORDER BY model
"""

# Calibration over the last day of matured predictions (by the predicted bar's start, counted
# back from the newest one): log loss against the class prior of the same labels, Brier,
# accuracy and the expected calibration error of the top class (10 confidence bins).
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
    models = {r["model"]: {**r, "last_start": _ms(r["last_start"])} for r in _rows(store, MODELS_SQL)}
    for r in _rows(store, CALIBRATION_SQL):
        models.setdefault(r["model"], {"model": r["model"], "version": "", "last_start": None}).update(r)
    for r in _rows(store, ECE_SQL):
        if r["model"] in models:
            models[r["model"]]["ece"] = r["ece"]
    return [models[m] for m in sorted(models)]


# --------------------------------------------------------------------------------------- render

def render(st: Status):
    """The status as one rich renderable (a group of small tables)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

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
