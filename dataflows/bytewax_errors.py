"""bytewax's wrapped exceptions: the chain from what bytewax raises back to the exception that was
raised for a reason, and recovering that exception when a cluster run loses it.

An exception raised inside a bytewax dataflow (a source, a step, a sink) does not reach the caller
as itself: bytewax wraps it in ``BytewaxRuntimeError`` layers (``__cause__``), sometimes a pyo3
``PanicException`` with only a panic text, and Rust prints a panic message on stderr. ``original``
walks that chain back; ``cli/errors.py`` turns the result into what a person reads.

Exception classes are matched by qualified name, so this module imports nothing heavy.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional

# bytewax's wrappers around the exception that was really raised
WRAPPERS = frozenset({
    "bytewax.errors.BytewaxRuntimeError",
    "pyo3_runtime.PanicException",
})


def type_names(exc: BaseException) -> set[str]:
    """The qualified names of the classes of ``exc`` (its type and every base)."""
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
    return bool(type_names(exc) & WRAPPERS)


def original(exc: BaseException) -> BaseException:
    """The first exception in the chain that is not a bytewax wrapper (the one raised for a reason);
    the innermost one if all are wrappers."""
    last = exc
    for e in chain(exc):
        last = e
        if not is_wrapper(e):
            return e
    return last


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
