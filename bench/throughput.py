#!/usr/bin/env python
"""Whole-pipeline throughput and memory on synthetic data: one process vs two.

Runs `tapeflow run` (the real command: source -> decode -> windows -> bars -> roll-ups ->
embedded ClickHouse) in fresh subprocesses and prints trades/s (dataflow wall time, start-up
excluded), peak RSS per process and, with several processes, each one's CPU time; and a floor
measured in the same run (the same tape, generated and aggregated into 1m OHLCV by a plain Python
loop), with each rate as a ratio to it. Medians over --repeat runs.

    .venv/bin/python bench/throughput.py                 # 8 symbols x 6 h, ~2.5M trades
    .venv/bin/python bench/throughput.py --symbols 50 --hours 2 --rate 4   # memory at 50 symbols
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_summary  # noqa: E402
from operators import synthetic as syn  # noqa: E402
from operators.records import MINUTE_MS  # noqa: E402

START_MS = 1_704_067_200_000  # `tapeflow run`'s default --start, 2024-01-01T00:00Z
SEED = 7  # its default --seed


def floor(args: argparse.Namespace) -> tuple[int, int, float]:
    """The floor: the same synthetic tape (the generator `tapeflow run` uses, same symbols, seed,
    rate and hours), aggregated into 1m OHLCV / buy volume / delta per instrument by a plain Python
    loop over its rows. Returns (trades, 1m bars, seconds incl. generating the tape)."""
    t0 = time.time()
    bars: dict = {}
    n = 0
    for i in range(args.symbols):
        sym = f"S{i:02d}/USDT:USDT"
        cols, _ = syn.generate(syn.spec_for(sym, args.rate), SEED, START_MS, int(args.hours * 60))
        for ts, price, amount, is_buy in zip(cols["ts"].tolist(), cols["price"].tolist(), cols["amount"].tolist(),
                                             cols["is_buy"].tolist()):
            key = (sym, ts // MINUTE_MS)
            signed = amount if is_buy else -amount
            b = bars.get(key)
            if b is None:
                bars[key] = [price, price, price, price, amount, amount if is_buy else 0.0, signed]
            else:
                b[1] = max(b[1], price)
                b[2] = min(b[2], price)
                b[3] = price
                b[4] += amount
                if is_buy:
                    b[5] += amount
                b[6] += signed
            n += 1
    return n, len(bars), time.time() - t0


def one_run(processes: int, args: argparse.Namespace) -> dict:
    symbols = ",".join(f"S{i:02d}/USDT:USDT" for i in range(args.symbols))
    return run_summary(["--train-split", "0", "--symbols", symbols, "--hours", str(args.hours), "--rate",
                        str(args.rate), "--processes", str(processes)] + (["--no-store"] if args.no_store else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symbols", type=int, default=8)
    ap.add_argument("--hours", type=float, default=6)
    ap.add_argument("--rate", type=float, default=8, help="parent orders/s per symbol")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--no-store", action="store_true",
                    help="discard output instead of writing to embedded ClickHouse (isolates pipeline memory)")
    args = ap.parse_args()
    floors = [floor(args) for _ in range(args.repeat)]
    floor_rate = statistics.median(f[0] / f[2] for f in floors)
    print(f"floor (the same synthetic tape generated and aggregated by a plain Python dict loop, 1m OHLCV): "
          f"{floors[0][0]:,} trades -> {floors[0][1]:,} 1m bars, median {floor_rate:,.0f} trades/s", flush=True)
    results = {}
    for p in [int(x) for x in args.processes.split(",")]:
        runs = [one_run(p, args) for _ in range(args.repeat)]
        rate = statistics.median(r["trades_per_s"] for r in runs)
        rss = max(max(r["peak_rss_mb"]) for r in runs)
        results[p] = rate
        each = ", ".join(f"{r['trades_per_s']:,.0f}" for r in runs)
        print(f"processes={p}: {runs[0]['trades_in']:,} trades, median {rate:,.0f} trades/s (runs: {each}), "
              f"wall incl. start-up {statistics.median(r['wall_s'] for r in runs):.1f} s, "
              f"peak RSS per process {rss:,.0f} MB", flush=True)
        # where the time went: process 0 also owns the store and the portfolio; cores busy = the
        # processes' CPU over the wall time (2 cores: 2.0 is a full machine)
        cpu = [statistics.median(r["cpu_s_by_process"][i] for r in runs) for i in range(p)]
        busy = statistics.median(sum(r["cpu_s_by_process"]) / r["wall_s"] for r in runs)
        print("  CPU per process (median, start-up included): "
              + ", ".join(f"p{i} {c:.1f} s" for i, c in enumerate(cpu)) + f"; cores busy {busy:.2f}", flush=True)
    if 1 in results and 2 in results:
        print(f"two processes / one = {results[2] / results[1]:.2f}x")
    for p, rate in results.items():
        print(f"tapeflow, {p} process(es), in the dataflow: {rate / floor_rate:.2f}x the floor")


if __name__ == "__main__":
    main()
