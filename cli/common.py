"""What every ``tapeflow`` command shares: the consoles, ``Failure`` (a one-line error with its exit
code), settings from the options, the configured store, and small parsers and formatters."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import click
from rich.console import Console

from dataflows.config import ConfigError, Settings, load_settings, unknown_env_vars
from dataflows.logs import register_settings_secrets
from sinks.embedded import embedded_path
from sinks.store import Store, StoreError

err_console = Console(stderr=True)
out_console = Console(width=140)
log = logging.getLogger("tapeflow")

DEFAULT_SYMBOLS = "BTC/USDT:USDT,ETH/USDT:USDT,SOL/USDT:USDT"


class Failure(click.ClickException):
    """A one-line error with its exit code: 2 for a user's mistake (usage, settings, input), 1 for
    a failure. click prints it as ``Error: <message>``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _warn_unknown_env(ctx: click.Context) -> None:
    """One line per ``TAPEFLOW_*`` variable nothing reads (a misspelt setting would be ignored
    silently), with the closest valid name. Not repeated by the peers of a local cluster."""
    if ctx.params.get("proc_id") and ctx.params.get("run_dir"):
        return
    for name, close in unknown_env_vars():
        hint = f" (did you mean {close}?)" if close else ""
        err_console.print(f"[yellow]warning: {name} is not a tapeflow setting and is ignored{hint}[/yellow]",
                          highlight=False, soft_wrap=True)


def command_settings(ctx: click.Context, **overrides) -> Settings:
    """The settings of this command: ``--config``, the environment and the command's options
    (``overrides``; None: not given); its secrets are registered with the log redaction."""
    _warn_unknown_env(ctx)
    try:
        settings = load_settings(ctx.find_root().obj.get("config"), **overrides)
    except ConfigError as err:
        raise Failure(str(err), 2) from None
    register_settings_secrets(settings)
    return settings


@contextmanager
def open_store(settings: Settings, must_exist: bool = False) -> Iterator:
    """The configured store (schema applied), closed afterwards; a clear error if unusable.

    ``must_exist``: for commands that read (sql, report, train, status...): an embedded store
    that does not exist is refused, instead of being created empty and read as zeros (a misspelt
    --data-dir would otherwise look like an empty pipeline)."""
    path = embedded_path(settings.dsn())
    if must_exist and path is not None and not path.exists():
        raise Failure(f"no tapeflow store at {path}: check --data-dir (now {settings.data_dir}) or "
                      "TAPEFLOW_DATA_DIR / --dsn, or run `tapeflow run` first to create it", 2)
    try:
        store = Store(settings.dsn(), settings.clickhouse_database, retry_s=settings.store_retry_s)
    except StoreError as err:
        hint = "" if path is not None else " Check --dsn / TAPEFLOW_CLICKHOUSE_DSN and that the server is up."
        raise Failure(f"{err}{hint}") from None
    try:
        yield store
    finally:
        store.close()


def parse_start(text: str) -> int:
    """An ISO date or time (UTC unless it says otherwise) as epoch ms; a click error otherwise."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO date/time (e.g. 2024-01-01 or 2024-01-01T00:00Z)")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def cell(v) -> str:
    """A value as a table cell: floats to 10 significant digits, datetimes to the ms, None empty."""
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return "" if v is None else str(v)
