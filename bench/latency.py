#!/usr/bin/env python
"""Decision latency inside the dataflow: wall time from a 1m window closing (bar_1m) to the
decision row for the primary bar it completes (features, River + ONNX scoring, portfolio).

Runs the real command on a paced synthetic feed (live-like: the window clock follows the wall
clock at --speed x real time; the portfolio waits for every instrument's bar of the minute, so a
decision waits for the slowest instrument's window to close) and reads decisions.latency_ms back.

    .venv/bin/python bench/latency.py                   # 3 symbols, 2 h of event time at 240x
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--speed", type=float, default=240.0)
    ap.add_argument("--symbols", default="BTC/USDT:USDT,ETH/USDT:USDT,SOL/USDT:USDT")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tapeflow-lat-") as d:
        subprocess.run([sys.executable, "-m", "cli.main", "run", "--quiet", "--data-dir", d, "--hours",
                        str(args.hours), "--speed", str(args.speed), "--symbols", args.symbols,
                        "--train-split", "0"], check=True, stdout=subprocess.DEVNULL)
        q = ("SELECT count() AS n, quantile(0.5)(latency_ms) AS p50, quantile(0.95)(latency_ms) AS p95, "
             "quantile(0.99)(latency_ms) AS p99, max(latency_ms) AS max FROM decisions FINAL WHERE latency_ms > 0")
        out = subprocess.run([sys.executable, "-m", "cli.main", "sql", "--data-dir", d, "--format", "json", q],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)[0]
        print(f"{r['n']} decisions at {args.speed:g}x: window close -> decision p50 {r['p50']:.1f} ms, "
              f"p95 {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms")


if __name__ == "__main__":
    main()
