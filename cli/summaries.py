"""Summaries for people: read back from the store (strategy results, kill switches, the optimizer's
leaderboard and promotions) and the tables ``tapeflow run`` prints (progress, the run summary,
model quality, strategies)."""

from __future__ import annotations

from typing import Optional

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import err_console, out_console
from dataflows.config import Settings
from dataflows.run_counts import peak_rss_mb
from dataflows.model_io import model_quality
from operators.records import MINUTES_PER_YEAR
from operators.stats import sharpe, simple_returns
from sinks.store import Store, redact_dsn


def strategy_summary(store: Store, initial_equity: float) -> list[dict]:
    """Per strategy/variant: PnL, ROI, trades, win rate, Sharpe (per-minute equity returns,
    annualised) and max drawdown, from the stored fills and equity."""
    _, fills = store.query(
        "SELECT origin, strategy_id, variant_id, count() AS trades, countIf(realised_pnl > 0) AS wins, "
        "sum(realised_pnl) AS realised, sum(fee) AS fees FROM fills FINAL "
        "WHERE realised_pnl IS NOT NULL GROUP BY origin, strategy_id, variant_id")
    by = {(o, s, v): {"trades": t, "wins": w, "realised": r or 0.0} for o, s, v, t, w, r, _ in fills}
    _, series = store.query(
        "SELECT origin, strategy_id, variant_id, toStartOfMinute(ts) AS m, argMax(equity, (ts, seq)) AS eq, "
        "max(drawdown) AS dd FROM equity FINAL GROUP BY origin, strategy_id, variant_id, m "
        "ORDER BY origin, strategy_id, variant_id, m")
    curves: dict = {}
    for o, s, v, _, eq, dd in series:
        c = curves.setdefault((o, s, v), {"eq": [], "dd": 0.0})
        c["eq"].append(eq)
        c["dd"] = max(c["dd"], dd)
    out = []
    for key in sorted(set(by) | set(curves)):
        f = by.get(key, {"trades": 0, "wins": 0, "realised": 0.0})
        c = curves.get(key, {"eq": [], "dd": 0.0})
        last = c["eq"][-1] if c["eq"] else initial_equity
        out.append({
            "origin": key[0], "strategy_id": key[1], "variant_id": key[2],
            "pnl": last - initial_equity, "roi": last / initial_equity - 1, "realised_pnl": f["realised"],
            "trades": f["trades"], "win_rate": f["wins"] / f["trades"] if f["trades"] else None,
            "sharpe": sharpe(simple_returns([initial_equity] + c["eq"]), MINUTES_PER_YEAR), "max_drawdown": c["dd"],
        })
    return out


def kill_switch_status(store: Store) -> list[dict]:
    """The last kill-switch event (trip or reset) of every strategy."""
    return store.query_dicts(
        "SELECT source, argMax(kind, ts) AS last_kind, max(ts) AS at, argMax(reason, ts) AS reason "
        "FROM events FINAL WHERE kind IN ('kill_switch', 'kill_switch_reset') GROUP BY source ORDER BY source")


def leaderboard(store: Store, strategy_id: Optional[str] = None) -> list[dict]:
    """The newest metrics row of every variant (and production), best deflated Sharpe first."""
    where = "WHERE strategy_id = {sid:String}" if strategy_id else ""
    return store.query_dicts(
        "SELECT origin, strategy_id, variant_id, argMax(status, ts) AS status, max(ts) AS at, "
        "argMax(runtime_ms, ts) AS runtime_ms, argMax(trades, ts) AS trades, argMax(roi, ts) AS roi, "
        "argMax(win_rate, ts) AS win_rate, argMax(sharpe, ts) AS sharpe, argMax(sortino, ts) AS sortino, "
        "argMax(max_drawdown, ts) AS max_drawdown, argMax(dsr, ts) AS dsr, argMax(config, ts) AS config "
        f"FROM variant_metrics FINAL {where} GROUP BY origin, strategy_id, variant_id "
        "ORDER BY origin = 'production' DESC, ifNull(dsr, -1) DESC, ifNull(sharpe, -1e9) DESC",
        {"sid": strategy_id} if strategy_id else None)


def promotions(store: Store) -> list[dict]:
    """The optimizer's promotions, oldest first."""
    return store.query_dicts("SELECT ts, reason, detail FROM events FINAL WHERE kind = 'promotion' ORDER BY ts")


class ProgressBar:
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


def print_run_summary(total, elapsed: float, settings: Settings, resumed: bool, title: str = "tapeflow run",
                      replay: Optional[dict] = None, stored: bool = True) -> None:
    """The run's counts (trades in, bars, late, duplicates, dead letters), time, memory and store."""
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
    t.add_row("store", f"{settings.clickhouse_database} @ {redact_dsn(settings.dsn())}" if stored
              else "none (--no-store: rows counted, not kept)")
    out_console.print(t)
    if replay and replay.get("summary"):
        err_console.print(f"replay: {replay['summary']}")
    accounted = s.trades_in_bars + s.late_trades + dup + s.dead_letters
    if not resumed and accounted != total.trades_in:
        err_console.print(f"[yellow]note: {total.trades_in - accounted:,} trades not accounted for "
                          "(still in open windows?)[/yellow]")


def print_model_quality(store, since_ms: Optional[int]) -> list[dict]:
    """The models' scores on the matured labels (after ``since_ms``: the scored part), as printed."""
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


def print_strategies(store, initial_equity: float) -> list[dict]:
    """``strategy_summary`` as printed after a run."""
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
