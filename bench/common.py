"""Shared by the benchmark scripts: run `tapeflow run` in a fresh process and read its summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_summary(args: list[str]) -> dict:
    """`tapeflow run ARGS --quiet --data-dir TMP --summary-json TMP/s.json` -> the summary dict,
    plus ``wall_s`` (the whole process, start-up included)."""
    with tempfile.TemporaryDirectory(prefix="tapeflow-bench-") as d:
        out = Path(d) / "summary.json"
        cmd = [sys.executable, "-m", "cli.main", "run", *args, "--quiet", "--data-dir", d,
               "--summary-json", str(out)]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res = json.loads(out.read_text())
        res["wall_s"] = time.time() - t0
        return res


def proc_memory(pid: int | str = "self") -> tuple[float, float, float] | None:
    """(RSS, anonymous, file-backed) of process ``pid`` in MB, from /proc; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    got = [re.search(rf"^{f}:\s+(\d+) kB", text, re.M) for f in ("VmRSS", "RssAnon", "RssFile")]
    return tuple(int(m.group(1)) / 1024 for m in got) if all(got) else None  # type: ignore[return-value]
