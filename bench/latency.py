#!/usr/bin/env python
"""Decision latency inside the dataflow: wall time from a 1m window closing (bar_1m) to the
decision row for the primary bar it completes (features, River + ONNX scoring, portfolio).

Runs the real command on a paced synthetic feed (live-like: the window clock follows the wall
clock at --speed x real time; the portfolio waits for every instrument's bar of the minute, so a
decision waits for the slowest instrument's window to close) and reads decisions back. Each
decision's latency is split in two, from its own columns (``decided_at - latency_ms`` is the wall
time its bar's window closed):

- waiting for the other instruments: from its window's close to the last close among the
  instruments of that minute (each instrument's window closes on its own clock, anchored when its
  newest trade reached the window operator);
- after the minute's last bar: from that last close to the decision (the last bar's features and
  scoring, the portfolio, the book).

With a few dozen decisions per run, p99 is about the slowest decision: ``--repeat N`` pools N runs.

    .venv/bin/python bench/latency.py                        # 3 symbols, 2 h of event time at 240x
    .venv/bin/python bench/latency.py --speed 60 --repeat 3  # 216 decisions, ~6 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np

QUERY = """
SELECT latency_ms, decided - latency_ms AS closed, decided,
       max(decided - latency_ms) OVER (PARTITION BY origin, strategy_id, variant_id, ts) AS last_closed
FROM (SELECT *, toUnixTimestamp64Milli(decided_at) AS decided FROM decisions FINAL WHERE latency_ms > 0)
"""


def one_run(args, data_dir: str) -> list[dict]:
    subprocess.run([sys.executable, "-m", "cli.main", "run", "--quiet", "--data-dir", data_dir, "--hours",
                    str(args.hours), "--speed", str(args.speed), "--symbols", args.symbols,
                    "--train-split", "0"], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([sys.executable, "-m", "cli.main", "sql", "--data-dir", data_dir, "--format", "json",
                          QUERY], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def describe(name: str, values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return f"{name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, max {a.max():.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--speed", type=float, default=240.0)
    ap.add_argument("--symbols", default="BTC/USDT:USDT,ETH/USDT:USDT,SOL/USDT:USDT")
    ap.add_argument("--repeat", type=int, default=1, help="runs to pool (each into a fresh store)")
    args = ap.parse_args()
    rows: list[dict] = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="tapeflow-lat-") as d:
            got = one_run(args, d)
        rows += got
        print(f"run {i + 1}/{args.repeat}: {len(got)} decisions, p99 "
              f"{np.percentile([r['latency_ms'] for r in got], 99):.1f} ms", flush=True)
    if not rows:
        sys.exit("no decisions with a latency: is the feed long enough for a primary bar?")
    print(f"{len(rows)} decisions at {args.speed:g}x ({args.repeat} run(s) pooled)")
    print("  " + describe("window close -> decision", [r["latency_ms"] for r in rows]))
    print("  " + describe("  waiting for the minute's other instruments", [r["last_closed"] - r["closed"] for r in rows]))
    print("  " + describe("  after the minute's last bar", [r["decided"] - r["last_closed"] for r in rows]))


if __name__ == "__main__":
    main()
