"""``tapeflow run`` stopped by Ctrl-C or SIGTERM: telling a stop from an error, then printing what
was done and how to go on (resume, rerun) and exiting with the stop's code."""

from __future__ import annotations

import shlex
import signal
import sys
from typing import Optional

import click

from cli import errors
from cli.common import err_console
from cli.summaries import print_run_summary
from dataflows import runner
from dataflows.config import Settings


def is_stop(err: BaseException) -> bool:
    """Ctrl-C or SIGTERM, or any error once a stop is under way (a peer that stopped first)."""
    return errors.interrupt(err) is not None or runner.stop_requested() is not None


def settings_source(ctx: click.Context) -> Optional[str]:
    """The ``--source`` of the running command (for messages)."""
    return ctx.params.get("source")


def stopped(ctx: click.Context, err: BaseException, counts, elapsed: float, settings: Settings,
            *, is_peer: bool, resumable: bool, main_job: bool) -> None:
    """After Ctrl-C or SIGTERM (the peers have stopped): print what was done and how to go on,
    exit 130 (Ctrl-C) or 0 (SIGTERM: a requested stop, e.g. ``docker compose stop``)."""
    sigterm = runner.stop_requested() == signal.SIGTERM or isinstance(errors.interrupt(err), runner.Stopped)
    code = errors.STOPPED if sigterm else errors.INTERRUPTED
    if is_peer:
        ctx.exit(code)
    print_run_summary(counts, elapsed, settings, resumed=True, title="tapeflow run (stopped before the end)",
                      stored=not ctx.params.get("no_store"))
    what = "stopped (SIGTERM)" if sigterm else "interrupted (Ctrl-C)"
    if resumable:
        args = [a for a in sys.argv[1:] if a != "--replace"]  # the resumed run keeps the rows it made
        if not any(a == "--recovery-dir" or a.startswith("--recovery-dir=") for a in args):
            args = [*args, "--recovery-dir", str(settings.recovery_dir)]
        err_console.print(f"{what}. Its state is in {settings.recovery_dir}; resume from the last snapshot "
                          f"(taken every {settings.epoch_interval_s:g} s) with:\n  tapeflow {shlex.join(args)}",
                          highlight=False, soft_wrap=True, markup=False)
    elif main_job:
        err_console.print(f"{what}. The main job keeps its recovery state for its own phases only: a rerun starts "
                          "over (add --recovery-dir DIR to make it resumable).", highlight=False, soft_wrap=True)
    elif settings_source(ctx) == "kafka":
        err_console.print(f"{what}. A rerun goes on from the offsets committed at the last completed epoch, with "
                          "empty state (models, feature history, the minute in progress start over); run with "
                          "--recovery-dir DIR to resume exactly where it stopped.", highlight=False, soft_wrap=True)
    else:
        err_console.print(f"{what}. A rerun starts over; run with --recovery-dir DIR to be able to resume where "
                          "it stopped.", highlight=False, soft_wrap=True)
    ctx.exit(code)
