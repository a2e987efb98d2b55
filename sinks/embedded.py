"""The embedded (chdb://) store on disk: its directory, and whether a process (another one) has it open.

The embedded ClickHouse engine allows one process per store directory; chdb's own error for a
second opener does not say why, so ``sinks.store.Store`` and the read commands look first.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit


def embedded_path(dsn: str) -> Optional[Path]:
    """The directory of an embedded (chdb://) store; None for a server DSN."""
    parts = urlsplit(dsn)
    return Path(parts.path) if parts.scheme == "chdb" else None


def embedded_open(dsn: str) -> Optional[bool]:
    """Whether any process, this one included, has the embedded store of ``dsn`` open; None for a
    server DSN. The engine holds an exclusive ``flock`` on ``<dir>/status`` while it runs (released
    when its process ends, however it ends), so a running pipeline always has it: a store nobody
    has open is a store no pipeline is writing to."""
    path = embedded_path(dsn)
    if path is None:
        return None
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except OSError:
        return False  # no engine ever opened it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def embedded_holder(dsn: str) -> Optional[int]:
    """Whether another process has the embedded store of ``dsn`` open: its process id (0 where the
    status file does not say), else None (also for a server DSN).

    chdb's own error for a second opener ("Error initializing EmbeddedServer") does not say so (only
    its stderr does), hence this look before opening. The engine writes its PID to the status file
    it locks (``embedded_open``). A store this process itself has open (its engine holds the file;
    the next ``Store`` on the path shares it) is not held by another."""
    if not embedded_open(dsn):
        return None
    status = embedded_path(dsn) / "status"
    if _open_here(status):
        return None
    m = re.search(r"^PID: (\d+)", status.read_text(errors="replace"), re.M)
    return int(m.group(1)) if m else 0


def _open_here(path: Path) -> bool:
    """Whether this process has ``path`` open (Linux /proc)."""
    target = str(path.resolve())
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return False
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except (OSError, ValueError):
            continue
    return False
