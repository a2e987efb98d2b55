"""The daily report (``tapeflow report --day YYYY-MM-DD``): a markdown summary of one UTC day of one
strategy, with PNG charts (cli/charts.py), and optionally a few sentences from an LLM (cli/llm.py).
What each number means and which day it belongs to: cli/report_data.py.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import click

from cli.charts import equity_chart, pnl_chart
from cli.common import command_settings, open_store
from cli.llm import LlmConfig, llm_summary
from cli.report_data import LOW_CONF, QUERIES, DayData, aggregates_of, collect, strategy_key
from sinks.store import Store

log = logging.getLogger("tapeflow.report")

MAX_LISTED = 50                    # rows listed per table in the markdown (the counts cover all)

SECTIONS = ("Trades", "Best and worst trade", "Closed trades", "Equity", "Low-confidence entries",
            "Vetoes by reason", "Kill switch and risk guards", "Model quality")


def _money(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.4f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


def _time(t: Optional[datetime]) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M")


def _side(s: int) -> str:
    return {1: "long", -1: "short"}.get(int(s), str(s))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _listed(rows: list, noun: str) -> tuple[list, list[str]]:
    if len(rows) <= MAX_LISTED:
        return rows, []
    return rows[:MAX_LISTED], ["", f"_… and {len(rows) - MAX_LISTED} more {noun} (the counts above cover all)._"]


def render(data: DayData, summary: Optional[str] = None, llm_failed: bool = False) -> str:
    """The report as markdown (charts by their file names in ``data.charts``)."""
    s, d = data.stats, data.day.isoformat()
    agg = aggregates_of(data)
    many = len({strategy_key(r) for r in data.equity_summary} | {strategy_key(t) for t in data.trades}) > 1
    L: list[str] = [f"# tapeflow daily report — {d} (UTC)", "",
                    f"Strategy: **{data.strategy}** · day {d}T00:00Z – {data.day + timedelta(days=1)}T00:00Z · "
                    f"generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}Z", ""]
    if summary:
        L += ["## Summary", "", summary, "", "_Written by a language model from the aggregates below only._", ""]
    elif llm_failed:
        L += ["_An LLM summary was requested but could not be produced (see the logs)._", ""]

    L += ["## Trades", ""]
    if s["trades"] == 0:
        L += [f"No trade closed on {d} for strategy {data.strategy}.", ""]
    L += _table(["what", "value"], [
        ["closed trades", s["trades"]], ["wins", s["wins"]], ["losses", s["losses"]],
        ["win rate", _pct(s["win_rate"])], ["realised PnL (net of fees)", _money(s["pnl"])],
        ["average PnL per trade", _money(s["avg_pnl"])], ["gross profit", _money(s["gross_profit"])],
        ["gross loss", _money(s["gross_loss"])], ["fees paid (all fills of the day)", _money(data.fees["fees"])],
        ["entries", data.fees["entries"]], ["instruments traded", s["instruments"]],
        ["equity at open", _money(agg["equity_open"])], ["equity at close", _money(agg["equity_close"])],
        ["equity change", _money(agg["equity_change"])],
        ["max drawdown", _pct(agg["max_drawdown"])],
    ]) + ["", "A win is a closed trade with PnL > 0; every other closed trade counts as a loss.", ""]

    L += ["## Best and worst trade", ""]
    if data.best is None:
        L += ["No trade closed on this day, so there is no best or worst trade.", ""]
    else:
        L += _table(["", "symbol", "side", "entry", "exit", "exit reason", "PnL", "bps"], [
            [which, f"{t['exchange']}:{t['symbol']}", _side(t["side"]), _time(t["entry_ts"]), _time(t["exit_ts"]),
             t["exit_reason"], _money(t["pnl"]), f"{t['pnl_bps']:.1f}" if t["pnl_bps"] is not None else "-"]
            for which, t in (("best", data.best), ("worst", data.worst))]) + [""]

    L += ["## Closed trades", ""]
    if not data.trades:
        L += ["No trade closed on this day: nothing to list or chart.", ""]
    else:
        rows, more = _listed(data.trades, "trades")
        L += [f"![PnL per trade]({data.charts['pnl']})", ""] if "pnl" in data.charts else []
        L += _table((["strategy"] if many else []) + ["#", "symbol", "side", "entry", "exit", "exit reason", "arm", "PnL"],
                    [([strategy_key(t)] if many else [])
                     + [t["position_id"], f"{t['exchange']}:{t['symbol']}", _side(t["side"]),
                        _time(t["entry_ts"]), _time(t["exit_ts"]), t["exit_reason"], t["arm"] or "-", _money(t["pnl"])]
                     for t in rows]) + more + [""]

    L += ["## Equity", ""]
    if not data.equity:
        L += [f"No equity mark for strategy {data.strategy} on this day (the pipeline did not run over it).", ""]
    else:
        L += [f"![Equity]({data.charts['equity']})", ""] if "equity" in data.charts else []
        L += _table(["strategy", "open", "close", "low", "high", "max drawdown", "halted"], [
            [strategy_key(r), _money(r["open"]), _money(r["close"]), _money(r["low"]), _money(r["high"]),
             _pct(r["max_drawdown"]), "yes" if r["halted"] else "no"] for r in data.equity_summary]) + [""]

    L += ["## Low-confidence entries", ""]
    low, none = data.low_conf_entries, data.no_conf_entries
    L += [f"Entries whose opening decision had a best model confidence below {data.low_conf:.2f}: "
          f"**{len(low)}** of {len(data.entries)} entries"
          + (f" ({len(none)} more had no model prediction at all)." if none else "."), ""]
    if not data.entries:
        L += ["No position was opened on this day.", ""]
    elif not low:
        L += ["None: every entry of the day was taken at or above the threshold.", ""]
    else:
        rows, more = _listed(low, "entries")
        L += _table(["#", "symbol", "side", "entry", "arm", "best conf", "conf min", "PnL"], [
            [e["position_id"], f"{e['exchange']}:{e['symbol']}", _side(e["side"]), _time(e["entry_ts"]),
             e["arm"] or "-", f"{e['best_conf']:.3f}", f"{e['conf_min']:.2f}",
             _money(e["pnl"]) if e["pnl"] is not None else "open"] for e in rows]) + more + [""]

    L += ["## Vetoes by reason", ""]
    if not data.vetoes:
        L += [f"No veto on this day ({data.decisions['decisions']} decisions).", ""]
    else:
        L += [f"{data.decisions['vetoed']} of {data.decisions['decisions']} decisions carried at least one veto "
              "(a decision can carry several).", ""]
        L += _table(["reason", "decisions"], [[v["reason"], v["decisions"]] for v in data.vetoes]) + [""]

    L += ["## Kill switch and risk guards", ""]
    if not data.events:
        L += ["No kill-switch trip, reset or risk-guard trip on this day.", ""]
    else:
        L += [f"Kill-switch trips: **{agg['kill_switch_trips']}**, resets: **{agg['kill_switch_resets']}**"
              + "".join(f", {k.replace('_', ' ')}: **{n}**" for k, n in agg["risk_guard_trips"].items()) + ".", ""]
        L += _table(["time", "event", "reason", "strategy"], [
            [_time(e["ts"]), e["kind"], e["reason"], e["source"]] for e in data.events]) + [""]

    L += ["## Model quality", ""]
    if not data.models:
        L += ["No prediction of this day has a matured label yet: nothing to score.", ""]
    else:
        def ece(model: str, kind: str) -> str:
            v = data.ece(model, kind)
            return "-" if v is None else f"{v:.3f}"

        L += _table(["model", "labels", "accuracy", "log loss", "Brier", "ECE", "ECE (raw)"], [
            [m["model"], m["n"], f"{m['accuracy']:.3f}", f"{m['log_loss']:.4f}", f"{m['brier']:.4f}",
             ece(m["model"], "calibrated"), ece(m["model"], "raw")]
            for m in data.models]) + ["", "Predictions of the day's bars against their matured labels "
                                          "(Brier: sum over the three classes, lower is better; ECE: classwise "
                                          "expected calibration error of the probabilities the gates read, and of "
                                          "the model's raw output, 10 bins; models/calibration.py).", ""]

    L += ["---", "", "Every number above comes from a named query in `cli/report_data.py` "
          f"({', '.join(QUERIES)}).", ""]
    return "\n".join(L)


def write_report(store: Store, day: date, out_dir: Path, *, strategy: str = "production",
                 llm: Optional[LlmConfig] = None, low_conf: float = LOW_CONF) -> Path:
    """Write ``out_dir/report-YYYY-MM-DD.md`` and its charts (``report-YYYY-MM-DD-equity.png``,
    ``report-YYYY-MM-DD-pnl.png``, each only when there is something to draw); returns the
    markdown's path. ``llm``: an LLM summary from the aggregates (None: no summary)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(store, day, strategy=strategy, low_conf=low_conf)
    stem = f"report-{day.isoformat()}"
    if data.equity:
        equity_chart(data, out_dir / f"{stem}-equity.png")
        data.charts["equity"] = f"{stem}-equity.png"
    if data.trades:
        pnl_chart(data, out_dir / f"{stem}-pnl.png")
        data.charts["pnl"] = f"{stem}-pnl.png"
    summary = llm_summary(llm, aggregates_of(data)) if llm is not None else None
    path = out_dir / f"{stem}.md"
    path.write_text(render(data, summary, llm_failed=llm is not None and summary is None), encoding="utf-8")
    log.info("report written", extra={"path": str(path), "day": day.isoformat(), "strategy": strategy})
    return path


@click.command()
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
    try:
        the_day = date.fromisoformat(day)
    except ValueError:
        raise click.BadParameter(f"{day!r} is not a day (YYYY-MM-DD)", param_hint="--day") from None
    settings = command_settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    try:
        llm_cfg = LlmConfig.from_env() if llm else None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    with open_store(settings, must_exist=True) as store:
        path = write_report(store, the_day, out_dir or settings.data_dir / "reports", strategy=strategy,
                            llm=llm_cfg, low_conf=low_conf)
    click.echo(f"wrote {path}")
