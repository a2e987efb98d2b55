"""The ``tapeflow`` command: its group (global options, logging, and one place that turns any error
into a line and an exit code) and every command, each from its own module."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import click

from cli import errors
from cli.common import Failure, err_console
from cli.stderr_noise import filter_native_stderr, quiet_libraries
from dataflows.logs import setup_logging

# Every command and the module that holds it. A command's module is imported when the command is
# used (click's lazy-group pattern), so `tapeflow run` does not pay for the report's, the status
# screen's or the model commands' imports (~0.3 s of start-up).
COMMANDS = {
    "run": "cli.run", "report": "cli.report", "optimizer": "cli.trading", "killswitch": "cli.trading",
    "train": "cli.models", "models": "cli.models", "ingest": "cli.tapes", "topic": "cli.tapes",
    "replay": "cli.tapes", "tape": "cli.tapes", "health": "cli.health", "status": "cli.status",
    "sql": "cli.sql",
}


class _Main(click.Group):
    """The ``tapeflow`` group: whatever a command raises becomes one or two lines and an exit code
    (``cli.errors.describe``: the original exception out of bytewax's wrappers; 2 for a
    user's mistake, 1 for a failure, 130 for Ctrl-C, 0 for SIGTERM); ``--debug`` adds the traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        module = COMMANDS.get(name)
        return None if module is None else getattr(importlib.import_module(module), name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - the one place every error is reported
            message, code = errors.describe(err)
            if ctx.params.get("debug"):
                traceback.print_exception(err, file=sys.stderr)
            if errors.interrupt(err) is None:
                raise Failure(message, code) from None
            runner = sys.modules.get("dataflows.runner")
            if runner is not None:  # an interrupt outside the run loop: no peer outlives us
                runner.stop_peers(runner._children)
            err_console.print(message, highlight=False, soft_wrap=True)
            raise click.exceptions.Exit(code) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with settings (overrides TAPEFLOW_* environment variables).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.option("--debug", is_flag=True,
              help="Tracebacks for errors, DEBUG logs (librdkafka's too) and native (Rust) output as it is.")
@click.pass_context
def main(ctx: click.Context, config: Optional[Path], verbose: bool, debug: bool) -> None:
    """tapeflow: exchange trades -> multi-timeframe bars and order-flow -> ClickHouse."""
    if not debug:
        filter_native_stderr()  # bytewax's Rust panic reports: the error itself is reported in one line
        if not verbose:
            quiet_libraries()  # retry warnings that repeat the error that follows them
    setup_logging(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING, json=True)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["debug"] = debug


if __name__ == "__main__":
    main(prog_name="tapeflow")
