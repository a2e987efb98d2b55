"""From an exception to what a person reads: one line naming what is wrong, and an exit code.

``describe`` takes the exception that was raised for a reason out of bytewax's wrappers
(``dataflows/bytewax_errors.py``) and returns its message:

- user mistakes (settings, options, files, recovery directory; ``USAGE``): exit 2;
- failures with a message meant for people (broker down, store unusable; ``CLEAR``): exit 1;
- anything else (a bug, a library error): exit 1, with its type, where in the pipeline it
  happened (bytewax step and partition) and a pointer to ``--debug`` for the traceback;
- Ctrl-C: exit 130; SIGTERM (``dataflows.runner.Stopped``): exit 0, a requested stop.

Exception classes are matched by qualified name (module.Class: keep these in step when a class
moves), so this module imports nothing heavy.
"""

from __future__ import annotations

import re
from typing import Optional

from dataflows.bytewax_errors import chain, is_wrapper, original, type_names

USAGE_ERROR, FAILURE, INTERRUPTED, STOPPED = 2, 1, 130, 0

# exceptions that are a user's mistake: exit 2, their message as it is
USAGE = frozenset({
    "dataflows.config.ConfigError",
    "operators.tape_files.ReplayFormatError",
    "dataflows.runner.RecoveryMismatch",
    "dataflows.recovery_dir.RecoveryInUse",
    "dataflows.recovery_dir.RecoveryUnreadable",
    "builtins.FileNotFoundError",
    "click.exceptions.UsageError",
    "dataflows.venue_exchange.UnknownSymbolError",
})
# failures whose message is written for people: exit 1, their message as it is
CLEAR = frozenset({
    "dataflows.kafka_topic.KafkaUnavailable",
    "sinks.store.StoreError",
    "click.exceptions.ClickException",
    "dataflows.venue_exchange.FeedError",
})

MAX_CHARS = 500

_STEP = re.compile(r'in (?:step )?"([^"]+)"(?: for (partition|key) "([^"]*)")?')


def interrupt(exc: BaseException) -> Optional[BaseException]:
    """The KeyboardInterrupt (Ctrl-C) or ``Stopped`` (SIGTERM) anywhere in the chain, else None: a
    library may wrap it (``raise X from KeyboardInterrupt``) when it arrives inside its code."""
    return next((e for e in chain(exc) if isinstance(e, KeyboardInterrupt)), None)


def first_line(text: str) -> str:
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 1] + "…"


def _where(exc: BaseException) -> str:
    """Where in the dataflow bytewax says the error happened ('' when not inside one)."""
    for e in chain(exc):
        if is_wrapper(e):
            m = _STEP.search(str(e))
            if m:
                step, kind, part = m.groups()
                return f" (in pipeline step {step}" + (f", {kind} {part}" if kind else "") + ")"
    return ""


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and the exit code for ``exc`` (see the module docstring)."""
    stop = interrupt(exc)
    if stop is not None:
        if "dataflows.runner.Stopped" in type_names(stop):
            return "stopped (SIGTERM)", STOPPED
        return "interrupted (Ctrl-C)", INTERRUPTED
    err = original(exc)
    names = type_names(err)
    if names & USAGE:
        return _lines(_message(err)), USAGE_ERROR
    if names & CLEAR:
        return _lines(_message(err)), int(getattr(err, "exit_code", FAILURE) or FAILURE)
    text = first_line(str(err))
    if is_wrapper(err):  # nothing but a panic text: the real error was reported by the process that had it
        return (f"a pipeline worker failed: {text or type(err).__name__} (if another tapeflow process printed "
                "an error above, that is the cause; run with --debug for details)"), FAILURE
    what = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return f"{what}{_where(exc)}; run with --debug for the traceback", FAILURE


def _lines(text: str, most: int = 5) -> str:
    """A message written for people, as it is, but without blank lines and at most ``most`` lines."""
    lines = [first_line(x) for x in str(text).splitlines() if x.strip()]
    return "\n".join(lines[:most] + (["…"] if len(lines) > most else []))


def _message(err: BaseException) -> str:
    fmt = getattr(err, "format_message", None)  # click exceptions
    return fmt() if callable(fmt) else str(err)
