"""Trading commands: the live optimizer's leaderboard (``tapeflow optimizer status``) and the
drawdown kill switch (``tapeflow killswitch reset|status``)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Optional

import click
from rich.table import Table

from cli.common import cell, command_settings, open_store, out_console
from cli.summaries import kill_switch_status, leaderboard, promotions
from dataflows.control import pending, request_reset
from operators.records import HOUR_MS


@click.group()
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
    settings = command_settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    with open_store(settings, must_exist=True) as store:
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
        changes = ", ".join(f"{k}={v}" for k, v in json.loads(r["config"] or "{}").items())
        t.add_row(name, r["status"], f"{r['runtime_ms'] / HOUR_MS:.1f}", f"{r['trades']:,}", f"{r['roi']:.2%}",
                  num(r["win_rate"], ".1%"), num(r["sharpe"], ".2f"), num(r["sortino"], ".2f"),
                  f"{r['max_drawdown']:.2%}", num(r["dsr"], ".3f"), changes[:60])
    out_console.print(t)
    for p in promos:
        click.echo(f"promotion at {cell(p['ts'])}: {json.loads(p['detail']).get('variant_id')} ({p['reason'][:120]})")


@click.group()
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
    settings = command_settings(ctx, data_dir=data_dir)
    path = request_reset(settings.data_dir, by or getpass.getuser(), strategy, reason)
    click.echo(f"reset requested ({path.name}); the pipeline applies it at its next input and records a "
               "kill_switch_reset event")


@killswitch.command("status")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def killswitch_status(ctx: click.Context, data_dir: Optional[Path]) -> None:
    """Last kill-switch event per strategy, and requests not yet applied."""
    settings = command_settings(ctx, data_dir=data_dir)
    waiting = pending(settings.data_dir)
    if waiting:
        click.echo(f"{len(waiting)} reset request(s) waiting for the pipeline: {', '.join(p.name for p in waiting)}")
    with open_store(settings, must_exist=True) as store:
        rows = kill_switch_status(store)
    if not rows:
        click.echo("no kill switch has tripped")
    for r in rows:
        state = "HALTED" if r["last_kind"] == "kill_switch" else "trading"
        click.echo(f"{r['source']}: {state} (last {r['last_kind']} at {cell(r['at'])}: {r['reason']})")
