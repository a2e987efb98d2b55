"""Operator commands to a running pipeline, as files in ``<data_dir>/control/``.

``tapeflow killswitch reset`` writes a request file; the portfolio stage picks it up (looking at
most every ``check_every_s``), applies it at its next input and renames it ``*.done``; the reset
itself is audited as a ``kill_switch_reset`` event in ClickHouse. Files work the same for the
embedded store (one process) and in compose (`docker compose exec pipeline tapeflow killswitch
reset`), and a request made while the pipeline is down waits for its next start.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

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


class ControlInbox:
    """Pending requests, checked at most every ``check_every_s`` (monotonic clock)."""

    def __init__(self, data_dir: Path, check_every_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.dir = control_dir(data_dir)
        self.every, self.clock = check_every_s, clock
        self.next_check = 0.0

    def take(self) -> list[dict]:
        now = self.clock()
        if now < self.next_check:
            return []
        self.next_check = now + self.every
        if not self.dir.is_dir():
            return []
        out = []
        for f in sorted(self.dir.glob(f"{PREFIX}*.json")):
            try:
                req = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            f.rename(f.with_suffix(".done"))
            out.append(req)
        return out


def pending(data_dir: Path) -> list[Path]:
    d = control_dir(data_dir)
    return sorted(d.glob(f"{PREFIX}*.json")) if d.is_dir() else []
