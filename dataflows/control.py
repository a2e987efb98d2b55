"""Operator commands to a running pipeline, as files in ``<data_dir>/control/``.

``tapeflow killswitch reset`` writes a request file; the portfolio stage picks it up (looking at
most every ``check_every_s``), applies it at its next input and renames it ``*.done``; the reset
itself is audited as a ``kill_switch_reset`` event in ClickHouse. Files work the same for the
embedded store (one process) and in compose (`docker compose exec pipeline tapeflow killswitch
reset`), and a request made while the pipeline is down waits for its next start.

Surviving a crash (issue 11): a request is applied to the portfolio's state, and that state is
durable only once a recovery snapshot that includes it is committed; a crash before that rolls
the state back to before the request, while its file already says ``.done``. So the ``.done`` file
records which *lineage* took it (``taken_by``: the recovery directory, as claimed; without one,
this process), the portfolio state remembers the ids of the requests it applied
(``PortfolioLogic``), and the inbox hands the portfolio every request its lineage took as well as
the new ones: a request is applied exactly once to every state that descends from the one that
first took it, whatever the moment of a crash, and never to another run's state.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from dataflows.runner import SOURCE_FILE

PREFIX = "killswitch-reset-"


def control_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "control"


def request_reset(data_dir: Path, by: str, strategy: str = "production", reason: str = "") -> Path:
    d = control_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    path = d / f"{PREFIX}{now.strftime('%Y%m%dT%H%M%S%f')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"by": by, "strategy": strategy, "reason": reason,
                               "requested_at_ms": int(now.timestamp() * 1000)}))
    os.replace(tmp, path)
    return path


def lineage_of(recovery_dir: Optional[Path]) -> Optional[str]:
    """The lineage of a run's state: its recovery directory and when that was claimed (its source
    file, ``dataflows.runner.SOURCE_FILE``, is written once); None without one (each inbox is then
    its own lineage: no state outlives the process)."""
    if recovery_dir is None:
        return None
    claim = Path(recovery_dir) / SOURCE_FILE
    stamp = claim.stat().st_mtime_ns if claim.exists() else 0
    return f"{Path(recovery_dir).resolve()}@{stamp}"


class ControlInbox:
    """Requests, checked at most every ``check_every_s`` (monotonic clock). ``take`` returns the new
    ones (marking them taken by ``lineage``) and those this lineage took before, each with its
    ``id``: the caller applies those it has not applied yet (see the module docstring)."""

    def __init__(self, data_dir: Path, check_every_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 lineage: Optional[str] = None):
        self.dir = control_dir(data_dir)
        self.every, self.clock = check_every_s, clock
        self.lineage = lineage or f"process:{os.getpid()}:{uuid.uuid4().hex}"
        self.next_check = 0.0

    def take(self) -> list[dict]:
        now = self.clock()
        if now < self.next_check:
            return []
        self.next_check = now + self.every
        if not self.dir.is_dir():
            return []
        for f in sorted(self.dir.glob(f"{PREFIX}*.json")):
            try:
                req = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            done = f.with_suffix(".done")
            tmp = f.with_suffix(".taking")
            tmp.write_text(json.dumps({**req, "taken_by": self.lineage}))
            os.replace(tmp, done)
            f.unlink(missing_ok=True)
        out = []
        for f in sorted(self.dir.glob(f"{PREFIX}*.done")):
            try:
                req = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if req.get("taken_by") == self.lineage:
                out.append({**req, "id": f.stem})
        return out


def pending(data_dir: Path) -> list[Path]:
    d = control_dir(data_dir)
    return sorted(d.glob(f"{PREFIX}*.json")) if d.is_dir() else []
