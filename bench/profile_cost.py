#!/usr/bin/env python
"""Per-bar cost of bars with a very wide price range (volume profile and value area).

A 1m bar whose range is huge relative to the instrument's profile bin (a crash, or a bad
symbol mix) used to cost in proportion to range / bin. This builds, in one process, ordinary
1m bars (a range of ~20 profile bins) and bars whose range is 10^3 and 10^5 times the bin,
with the same number of trades, and times the real code on them: ``make_bar`` for each minute
plus its roll-up to 5m, 15m, 1h, 4h and 1d (merges and the value area of every emitted bar).
Prints the median per-bar cost over --repeat runs and the ratio wide / ordinary. Acceptance:
each ratio at most 2. Costs are this process's CPU time (other jobs on a shared machine do not
count) and the kinds are interleaved within each repeat, so what noise is left hits them alike.

    .venv/bin/python bench/profile_cost.py
    .venv/bin/python bench/profile_cost.py --bars 1440 --trades 300 --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from operators.bars import BarConfig, BarState, make_bar
from operators.rollups import RollupState, close_until, rollup

SYM = "BENCH/USDT:USDT"
BIN = 0.01  # the instrument's profile bin
CENTRE = 5_000.0
T0 = 1_704_067_200_000
MIN = 60_000
ROLLUPS = ["5m", "15m", "1h", "4h", "1d"]
KINDS = {"ordinary": 20, "wide 10^3": 1_000, "wide 10^5": 100_000}  # bar range, in profile bins
SCHEMA = {"id": pl.String, "ts": pl.Int64, "seq": pl.Int64, "price": pl.Float64, "amount": pl.Float64,
          "is_buy": pl.Boolean, "trader": pl.String, "recv_ts": pl.Int64}


def minutes(n_bars: int, n_trades: int, range_bins: int, seed: int) -> list[pl.DataFrame]:
    """1m trade frames (columns as the pipeline's chunks) whose prices span ``range_bins`` bins
    around CENTRE: the lowest and highest trades sit at the ends of the range, the others
    uniformly between them."""
    rng = np.random.default_rng(seed)
    half = range_bins * BIN / 2
    out, seq = [], 0
    for m in range(n_bars):
        ts = T0 + m * MIN + np.sort(rng.integers(0, MIN, n_trades))
        price = np.round(CENTRE + rng.uniform(-half, half, n_trades), 2)
        price[rng.integers(0, n_trades)], price[rng.integers(0, n_trades)] = CENTRE - half, CENTRE + half
        out.append(pl.DataFrame({
            "id": [str(seq + i) for i in range(n_trades)], "ts": ts, "seq": np.arange(seq, seq + n_trades),
            "price": price, "amount": np.round(rng.exponential(0.05, n_trades), 4) + 0.0001,
            "is_buy": rng.random(n_trades) < 0.5, "trader": [None] * n_trades, "recv_ts": ts + 5,
        }, schema=SCHEMA))
        seq += n_trades
    return out


def one_run(frames: list[pl.DataFrame], cfg: BarConfig) -> tuple[float, set]:
    """CPU seconds per 1m bar for make_bar + roll-ups of every frame, and the profile bins used."""
    st, rs = BarState(), RollupState()
    bins = set()
    t0 = time.process_time()
    for m, f in enumerate(frames):
        bar = make_bar(f, "bench", SYM, T0 + m * MIN, MIN, st, cfg)
        out = rollup(rs, bar, ROLLUPS, cfg.value_area)
        bins.update(b.profile_bin for b in (bar, *out))
    bins.update(b.profile_bin for b in close_until(rs, 2**62, cfg.value_area))
    return (time.process_time() - t0) / len(frames), bins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bars", type=int, default=1440, help="1m bars per kind (1440 = one day: every roll-up closes)")
    ap.add_argument("--trades", type=int, default=300, help="trades per 1m bar")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    cfg = BarConfig(profile_bins=((SYM, BIN),))
    data = {k: minutes(args.bars, args.trades, r, seed=i) for i, (k, r) in enumerate(KINDS.items())}
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    bins: dict[str, set] = {}
    for _ in range(args.repeat):
        for k, frames in data.items():
            t, bins[k] = one_run(frames, cfg)
            times[k].append(t)
    base = statistics.median(times["ordinary"])
    print(f"{args.bars} x 1m bars of {args.trades} trades per kind, make_bar + roll-ups to {', '.join(ROLLUPS)}; "
          f"CPU time, median of {args.repeat} runs; instrument bin {BIN}")
    worst = 0.0
    for k, r in KINDS.items():
        med = statistics.median(times[k])
        ratio = med / base
        worst = max(worst, ratio)
        runs = ", ".join(f"{t * 1e6:.0f}" for t in times[k])
        used = ", ".join(f"{b:g}" for b in sorted(bins[k]))
        print(f"{k:>10} (range {r:>7,} bins): {med * 1e6:7.0f} us/bar  x{ratio:.2f}  (runs: {runs} us; "
              f"profile bins used: {used})", flush=True)
    print(f"worst wide / ordinary = {worst:.2f} ({'ok' if worst <= 2 else 'ABOVE'} the acceptance of <= 2)")


if __name__ == "__main__":
    main()
