#!/usr/bin/env python
"""Resident memory of one ``tapeflow run`` over time: RSS, its anonymous part (heaps) and its
file-backed part (mapped library pages), sampled from /proc every ``--every`` seconds, then the peak.

Arguments after ``--`` go to ``tapeflow run``; a fresh data directory is used (and removed) unless
they name ``--data-dir``. Peers of a multi-process run are not sampled (their peaks are in the run's
summary); one process is what the main job runs.

    .venv/bin/python bench/rss_timeline.py                                   # the main job
    .venv/bin/python bench/rss_timeline.py -- --train-split 0 --hours 480    # 480 h without training
    .venv/bin/python bench/rss_timeline.py --print-every 10 -- --no-store --hours 192
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from common import proc_memory  # noqa: E402  (bench/ is the script's directory)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("--print-every", type=float, default=5.0, help="seconds between printed rows")
    ap.add_argument("run_args", nargs="*", help="arguments of `tapeflow run` (after --)")
    args = ap.parse_args()
    tmp = None
    run_args = list(args.run_args)
    if "--data-dir" not in run_args:
        tmp = tempfile.mkdtemp(prefix="tapeflow-rss.")
        run_args += ["--data-dir", str(Path(tmp) / "data")]
    cmd = [sys.executable, "-m", "cli.main", "run", "--quiet", *run_args]
    print(f"{'s':>7} {'RSS':>6} {'anon':>6} {'file':>6}   (MB)   {' '.join(cmd[3:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak, printed = (0, 0, 0), -args.print_every
    try:
        while proc.poll() is None:
            now = proc_memory(proc.pid)
            if now is not None:
                peak = max(peak, now)
                at = time.monotonic() - started
                if at - printed >= args.print_every:
                    print(f"{at:7.1f} {now[0]:6.0f} {now[1]:6.0f} {now[2]:6.0f}", flush=True)
                    printed = at
            time.sleep(args.every)
    finally:
        if proc.poll() is None:
            proc.kill()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"peak {peak[0]:.0f} MB RSS (anon {peak[1]:.0f}, file {peak[2]:.0f} at that sample); exit {proc.returncode}, "
          f"{time.monotonic() - started:.0f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
