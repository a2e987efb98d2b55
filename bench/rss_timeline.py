#!/usr/bin/env python
"""Resident memory of one ``tapeflow run`` over time: RSS, its anonymous part (heaps) and its
file-backed part (mapped library pages), sampled from /proc every ``--every`` seconds, then the peak.

Arguments after ``--`` go to ``tapeflow run``; a fresh data directory is used (and removed) unless
they name ``--data-dir``. Peers of a multi-process run are not sampled (their peaks are in the run's
summary); one process is what the main job runs.

    .venv/bin/python bench/rss_timeline.py                                   # the main job
    .venv/bin/python bench/rss_timeline.py --repeat 3 --print-every 60       # its median peak of 3 runs
    .venv/bin/python bench/rss_timeline.py -- --train-split 0 --hours 480    # 480 h without training
    .venv/bin/python bench/rss_timeline.py --print-every 10 -- --no-store --hours 192
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from common import proc_memory  # noqa: E402  (bench/ is the script's directory)


def sample(run_args: list[str], every: float, print_every: float) -> tuple[tuple, int]:
    """One run of ``tapeflow run`` with ``run_args`` (in a fresh data directory unless they name
    one), its RSS printed every ``print_every`` seconds; returns the peak sample and the exit code."""
    tmp = None
    run_args = list(run_args)
    if "--data-dir" not in run_args:
        tmp = tempfile.mkdtemp(prefix="tapeflow-rss.")
        run_args += ["--data-dir", str(Path(tmp) / "data")]
    cmd = [sys.executable, "-m", "cli.main", "run", "--quiet", *run_args]
    print(f"{'s':>7} {'RSS':>6} {'anon':>6} {'file':>6}   (MB)   {' '.join(cmd[3:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak, printed = (0, 0, 0), -print_every
    try:
        while proc.poll() is None:
            now = proc_memory(proc.pid)
            if now is not None:
                peak = max(peak, now)
                at = time.monotonic() - started
                if at - printed >= print_every:
                    print(f"{at:7.1f} {now[0]:6.0f} {now[1]:6.0f} {now[2]:6.0f}", flush=True)
                    printed = at
            time.sleep(every)
    finally:
        if proc.poll() is None:
            proc.kill()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"peak {peak[0]:.0f} MB RSS (anon {peak[1]:.0f}, file {peak[2]:.0f} at that sample); exit {proc.returncode}, "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return peak, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("--print-every", type=float, default=5.0, help="seconds between printed rows")
    ap.add_argument("--repeat", type=int, default=1, help="runs (each in a fresh data directory); then the median peak")
    ap.add_argument("run_args", nargs="*", help="arguments of `tapeflow run` (after --)")
    args = ap.parse_args()
    if args.repeat > 1 and "--data-dir" in args.run_args:
        ap.error("--repeat runs each in a fresh data directory: drop --data-dir (a store holds one run)")
    runs = [sample(args.run_args, args.every, args.print_every) for _ in range(max(1, args.repeat))]
    if len(runs) > 1:
        peaks = sorted(p[0] for p, _ in runs)
        print(f"peaks {' / '.join(f'{p:.0f}' for p in peaks)} MB: median {statistics.median(peaks):.0f} MB "
              f"over {len(runs)} runs")
    return max(rc for _, rc in runs)


if __name__ == "__main__":
    sys.exit(main())
