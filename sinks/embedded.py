"""The embedded (chdb://) store on disk: its directory, and whether another process holds it.

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


def embedded_holder(dsn: str) -> Optional[int]:
    """Whether another process has the embedded store of ``dsn`` open: its process id (0 where the
    status file does not say), else None (also for a server DSN).

    The engine holds an exclusive ``flock`` on ``<dir>/status`` while it runs and writes its PID
    there. chdb's own error for a second opener ("Error initializing EmbeddedServer") does not say
    so (only its stderr does), hence this look before opening. A store this process itself has open
    (its engine holds the file; the next ``Store`` on the path shares it) is not held by another."""
    path = embedded_path(dsn)
    if path is None:
        return None
    status = path / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None  # no engine has it open
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        if _open_here(status, skip=fd):
            return None
        m = re.search(r"^PID: (\d+)", status.read_text(errors="replace"), re.M)
        return int(m.group(1)) if m else 0
    finally:
        os.close(fd)


def _open_here(path: Path, skip: int) -> bool:
    """Whether this process has ``path`` open on a descriptor other than ``skip`` (Linux /proc)."""
    target = str(path.resolve())
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return False
    for fd in fds.iterdir():
        try:
            if int(fd.name) != skip and os.readlink(fd) == target:
                return True
        except (OSError, ValueError):
            continue
    return False
