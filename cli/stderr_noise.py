"""What native code and chatty libraries write that a person running ``tapeflow`` should not see:
Rust panic reports that carry an exception out of bytewax (the exception itself is reported in
one line), librdkafka's own lines, bytewax's reports of secondary panics, and retry warnings
that repeat the error that follows them. ``--debug`` keeps all of it."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Optional, TextIO


# Third-party loggers whose warnings repeat what the error that follows them says (urllib3's
# "Retrying ... Connection refused", clickhouse-connect's "Unexpected Http Driver Exception").
NOISY_LOGGERS = ("urllib3", "clickhouse_connect", "kafka")


def quiet_libraries(level: int = logging.ERROR) -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)


_PANIC_START = re.compile(r"^thread '.*' panicked at ")
_PANIC_TAIL = re.compile(r"^(note: run with `RUST_BACKTRACE|note: Some details are omitted|stack backtrace:"
                         r"|\s+\d+: |\s+at |\s*$)")
_LIBRDKAFKA_LINE = re.compile(r"^%\d\|\d+\.\d+\|")


class NativeNoise:
    """Decides, line by line, what native code wrote to stderr that a user should not see:

    - a Rust panic report (``thread '<unnamed>' panicked at src/...:`` + its payload line, the
      ``RUST_BACKTRACE`` note, backtrace frames). bytewax panics to carry a Python exception out of
      the dataflow; the exception itself reaches the caller, which reports it in one line;
    - librdkafka's own lines (``%3|1712345678.123|FAIL|...``) from a client without a ``logger``.

    Everything else is kept.

    >>> n = NativeNoise()
    >>> [n.keep(x) for x in ["thread '<unnamed>' panicked at src/inputs.rs:446:37:", "Box<dyn Any>",
    ...                      "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
    ...                      "", "pipeline 10%", "%3|1796245126.639|FAIL|rdkafka#producer-1| refused"]]
    [False, False, False, False, True, False]
    """

    def __init__(self) -> None:
        self.in_panic = False
        self.payload_next = False

    def keep(self, line: str) -> bool:
        if _PANIC_START.match(line):
            self.in_panic, self.payload_next = True, line.rstrip().endswith(":")
            return False
        if self.in_panic:
            if self.payload_next:
                self.payload_next = False
                return False
            if _PANIC_TAIL.match(line):
                return False
            self.in_panic = False
        return not _LIBRDKAFKA_LINE.match(line)


_BYTEWAX_PANIC_ERROR = re.compile(r"^\(src/\S+\.rs:\d+:\d+\) panicked at ")


def _quiet_panic_prints(default):
    """A ``sys.excepthook`` that keeps bytewax's own report of a secondary panic out of sight:
    in a cluster, after the first failure, network threads panic too ("MergeQueue poisoned") and
    bytewax's panic hook prints each (``PyErr.print``, which calls ``sys.excepthook``) once nobody
    waits for them. They go to the debug log; anything else is printed as usual."""

    def hook(kind, value, tb):
        if isinstance(value, RuntimeError) and _BYTEWAX_PANIC_ERROR.match(str(value)):
            logging.getLogger("tapeflow.bytewax").debug("secondary panic: %s", value)
            return
        default(kind, value, tb)

    return hook


def filter_native_stderr(noise_factory=NativeNoise) -> Optional[TextIO]:
    """Drop native noise (see ``NativeNoise``, and bytewax's secondary panic reports: see
    ``_quiet_panic_prints``) from this process's stderr; returns the new ``sys.stderr`` or None
    when stderr is not file descriptor 2 (an in-process test runner).

    Native code (Rust, C) writes to file descriptor 2 directly, so the filter sits there: fd 2
    becomes a pipe read by a thread that passes kept lines on to the original stderr, and
    ``sys.stderr`` is re-opened on a copy of the original descriptor, so Python's own output (and
    rich's terminal detection for the progress bar) is untouched. At exit fd 2 is restored and
    the thread drains what is left. Child processes get the original stderr when they are given
    ``stderr=sys.stderr``; those that inherit fd 2 write through the filter."""
    import atexit
    import select

    try:
        if sys.stderr.fileno() != 2:
            return None
    except (AttributeError, ValueError, OSError):
        return None
    old = sys.stderr
    old.flush()
    original = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    sys.stderr = os.fdopen(original, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                           errors="backslashreplace", closefd=False)

    def pump() -> None:
        noise, pending = noise_factory(), b""
        broken = False  # the reader of our stderr went away: keep draining, so no writer ever blocks

        def emit(chunk: bytes) -> None:
            nonlocal broken
            if broken or not noise.keep(chunk.decode("utf-8", "replace")):
                return
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(original, view):]
            except OSError:
                broken = True

        while True:
            ready, _, _ = select.select([r], [], [], 0.2)
            if not ready:
                if pending:  # a partial line that is not being completed: pass it on
                    emit(pending)
                    pending = b""
                continue
            data = os.read(r, 65536)
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                emit(line + b"\n")
        if pending:
            emit(pending)
        os.close(r)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    sys.excepthook = _quiet_panic_prints(sys.excepthook)

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)  # closes the pipe's write end held by fd 2: the thread sees EOF
        thread.join(timeout=2)

    atexit.register(restore)
    return sys.stderr
