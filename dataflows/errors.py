"""From an exception to what a person reads: one line naming what is wrong, and an exit code.

An exception raised inside a bytewax dataflow (a source, a step, a sink) does not reach the caller
as itself: bytewax wraps it in ``BytewaxRuntimeError`` layers (``__cause__``), sometimes a pyo3
``PanicException`` with only a panic text, and Rust prints a panic message on stderr. ``describe``
walks that chain back to the exception that was raised for a reason and returns its message:

- user mistakes (settings, options, files, recovery directory; ``USAGE``): exit 2;
- failures with a message meant for people (broker down, store unusable; ``CLEAR``): exit 1;
- anything else (a bug, a library error): exit 1, with its type, where in the pipeline it
  happened (bytewax step and partition) and a pointer to ``--debug`` for the traceback;
- Ctrl-C: exit 130; SIGTERM (``dataflows.runner.Stopped``): exit 0, a requested stop.

Exception classes are matched by qualified name, so this module imports nothing heavy.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Iterator, Optional

USAGE_ERROR, FAILURE, INTERRUPTED, STOPPED = 2, 1, 130, 0

# exceptions that are a user's mistake: exit 2, their message as it is
USAGE = frozenset({
    "dataflows.config.ConfigError",
    "dataflows.sources.ReplayFormatError",
    "dataflows.runner.RecoveryMismatch",
    "builtins.FileNotFoundError",
    "click.exceptions.UsageError",
    "dataflows.ccxt_feed.UnknownSymbolError",
})
# failures whose message is written for people: exit 1, their message as it is
CLEAR = frozenset({
    "dataflows.kafka.KafkaUnavailable",
    "sinks.clickhouse.StoreError",
    "click.exceptions.ClickException",
    "dataflows.ccxt_feed.FeedError",
})
# bytewax's wrappers around the exception that was really raised
WRAPPERS = frozenset({
    "bytewax.errors.BytewaxRuntimeError",
    "pyo3_runtime.PanicException",
})
MAX_CHARS = 500

_STEP = re.compile(r'in (?:step )?"([^"]+)"(?: for (partition|key) "([^"]*)")?')


def _names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, else ``__context__`` unless suppressed), and so on."""
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ if cur.__cause__ is not None else (
            None if cur.__suppress_context__ else cur.__context__)


def is_wrapper(exc: BaseException) -> bool:
    return bool(_names(exc) & WRAPPERS)


def original(exc: BaseException) -> BaseException:
    """The first exception in the chain that is not a bytewax wrapper (the one raised for a reason);
    the innermost one if all are wrappers."""
    last = exc
    for e in chain(exc):
        last = e
        if not is_wrapper(e):
            return e
    return last


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
        if "dataflows.runner.Stopped" in _names(stop):
            return "stopped (SIGTERM)", STOPPED
        return "interrupted (Ctrl-C)", INTERRUPTED
    err = original(exc)
    names = _names(err)
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


# -- bytewax 0.21 cluster runs can lose the error ---------------------------------------------------
#
# In ``cluster_main`` (several workers or processes) a worker's Python exception travels as a panic
# through a channel that is read only if the worker's thread is joined first; when a network thread
# of timely fails first (it does as soon as the worker is gone), the caller gets a bare
# ``PanicException("Send thread panic: Any { .. }")`` and the original error is dropped. bytewax
# does create a ``BytewaxRuntimeError`` around the original (its ``__cause__``) before panicking, so
# remembering those as they are made recovers it.

_made: deque = deque(maxlen=16)


def remember_bytewax_errors() -> None:
    """Keep the last ``BytewaxRuntimeError``s bytewax makes (see above); idempotent."""
    from bytewax.errors import BytewaxRuntimeError

    if getattr(BytewaxRuntimeError, "_tapeflow_remembered", False):
        return
    init = BytewaxRuntimeError.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _made.append(self)

    BytewaxRuntimeError.__init__ = __init__
    BytewaxRuntimeError._tapeflow_remembered = True


def forget_bytewax_errors() -> None:
    _made.clear()


def with_lost_cause(err: BaseException) -> BaseException:
    """``err``, with the first remembered bytewax error that carries a real exception attached as
    the cause of its innermost link, when ``err`` itself carries none (a panic text only)."""
    if not is_wrapper(original(err)):
        return err
    found = next((e for e in _made if e is not err and not is_wrapper(original(e))), None)
    if found is not None:
        *_, last = chain(err)
        if last.__cause__ is None and last is not found:
            last.__cause__ = found
    return err


def _lines(text: str, most: int = 5) -> str:
    """A message written for people, as it is, but without blank lines and at most ``most`` lines."""
    lines = [first_line(x) for x in str(text).splitlines() if x.strip()]
    return "\n".join(lines[:most] + (["…"] if len(lines) > most else []))


def _message(err: BaseException) -> str:
    fmt = getattr(err, "format_message", None)  # click exceptions
    return fmt() if callable(fmt) else str(err)
