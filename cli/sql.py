"""``tapeflow sql``: a query against the configured store, printed as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.table import Table

from cli.common import cell, command_settings, err_console, open_store


@click.command()
@click.argument("query")
@click.option("--dsn", default=None, help="ClickHouse DSN (default: TAPEFLOW_CLICKHOUSE_DSN or embedded chdb)")
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.pass_context
def sql(ctx: click.Context, query: str, dsn: Optional[str], database: Optional[str], data_dir: Optional[Path],
        fmt: str) -> None:
    """Run QUERY against the configured store and print the result."""
    settings = command_settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    with open_store(settings, must_exist=True) as store:
        try:
            cols, rows = store.query(query)
        except Exception as err:  # noqa: BLE001 - show the server's message, not a traceback
            raise click.ClickException(f"query failed: {str(err).strip().splitlines()[0]}") from None
    _print_rows(cols, rows, fmt)


def _print_rows(cols: list[str], rows: list[tuple], fmt: str) -> None:
    """Rows as a table (with a row count on stderr), CSV or JSON."""
    if fmt == "json":
        click.echo(json.dumps([dict(zip(cols, r)) for r in rows], default=str))
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows([[cell(v) for v in r] for r in rows])
    else:
        t = Table(*cols, show_lines=False)
        for r in rows:
            t.add_row(*[cell(v) for v in r])
        Console(width=max(120, Console().width)).print(t)
        err_console.print(f"{len(rows)} row(s)")
