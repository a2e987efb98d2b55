#!/usr/bin/env python
"""Per-bar cost of the feature stage, before (Polars over a 600-bar history at every bar) and after
(incremental indicators), measured in one process on the same bars.

The "before" code is read from git (``git show REV:operators/features.py``, REV = the last commit
with the Polars implementation) into a temporary module; the "after" code is the working tree's.
Both run the real ``FeatureStage.on_bars`` on one instrument: a 5m primary with 15m and 1h
overlays, each step getting what a closed 5m bar brings (the 5m bar, and the 15m / 1h bar closing
with it), after ``--history`` steps of warm-up so the old code works on a full window. Also timed:
the deep copy bytewax makes of the stage's state at every epoch close (``snapshot``).

Prints per primary bar: the stage's CPU time, per timeframe update, and per snapshot, old vs new,
with the number of features per row. Costs are this process's CPU time (other jobs on a shared
machine do not count); old and new alternate within each repeat and the median is reported.
Acceptance (issue 13): the stage at least 5x cheaper per bar with at least 3x the features; the
script exits 1 when that does not hold.

    .venv/bin/python bench/features_cost.py
    .venv/bin/python bench/features_cost.py --bars 300 --repeat 7
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from operators.bars import Bar  # noqa: E402
from operators.feature_catalog import FEATURE_NAMES  # noqa: E402
from operators.feature_state import FeatureState  # noqa: E402
from operators.features import FeatureStage, update  # noqa: E402

# the working tree's feature API, shaped like the single module the "before" code is
new = SimpleNamespace(FEATURE_NAMES=FEATURE_NAMES, FeatureState=FeatureState, FeatureStage=FeatureStage,
                      update=update)

OLD_REV = "83e531c24a9c61dd86363376984edeb9a358100c"  # the last commit computing features in Polars
T0 = 1_704_067_200_000
MIN = 60_000
TF_MIN = {"5m": 5, "15m": 15, "1h": 60}


def load_old(rev: str):
    """operators/features.py at ``rev`` as a module named ``features_before``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:operators/features.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="tapeflow-bench-")) / "features_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("features_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["features_before"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_bars(minutes: int, seed: int) -> dict[str, list[Bar]]:
    """5m, 15m and 1h bars of one instrument built from a random 1-minute path (OHLC, volumes and
    deltas add up; cohort signals random), oldest first."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.0008, minutes)))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.exponential(0.0004, minutes))
    low = np.minimum(open_, close) * (1 - rng.exponential(0.0004, minutes))
    vol = rng.lognormal(1, 0.7, minutes)
    buy = vol * rng.beta(0.8, 0.8, minutes)

    def bar(tf: str, i0: int, i1: int) -> Bar:
        v, b = float(vol[i0:i1].sum()), float(buy[i0:i1].sum())
        h, lo, c = float(high[i0:i1].max()), float(low[i0:i1].min()), float(close[i1 - 1])
        d = 2 * b - v
        s_top, s_bot = rng.uniform(-1, 1, 2)
        return Bar(exchange="x", symbol="BENCH/USDT:USDT", tf=tf, start=T0 + i0 * MIN, end=T0 + i1 * MIN,
                   open=float(open_[i0]), high=h, low=lo, close=c, volume=v, notional=v * c, vwap=(h + lo + c) / 3,
                   trades=int(rng.integers(5, 500)), buy_volume=b, sell_volume=v - b, delta=d,
                   min_delta=min(d, 0.0) - 1.0, max_delta=max(d, 0.0) + 1.0, largest_trade=1.0, largest_notional=c,
                   parent_orders=10, pro_orders=1, amateur_orders=5, pros_gross=1.0, pros_net=0.0,
                   amateurs_gross=1.0, amateurs_net=0.0, s_top=float(s_top), s_bot=float(s_bot),
                   s_mood=float(s_top - s_bot), pro_threshold=0.0, amateur_threshold=0.0,
                   poc=(h + lo) / 2, vah=h, val=lo, profile_bin=0.01)

    return {tf: [bar(tf, i - m, i) for i in range(m, minutes + 1, m)] for tf, m in TF_MIN.items()}


def new_state(mod):
    fields = getattr(mod.FeatureState, "__dataclass_fields__", {})
    return mod.FeatureState(h=600) if "h" in fields else mod.FeatureState()


def warm_stage(mod, bars: dict[str, list[Bar]], warm_end: int, history: int):
    """A FeatureStage whose every timeframe has seen its last ``history`` bars ending by
    ``warm_end`` (the old code's windows are full), overlays offered to its book."""
    old_window = {"history": history} if "history" in mod.FeatureStage.__dataclass_fields__ else {}
    stage = mod.FeatureStage(primary="5m", overlays=("15m", "1h"), horizon=3, band_k=0.5, **old_window)
    for tf, bs in bars.items():
        st = stage.states[tf] = new_state(mod)
        for b in [b for b in bs if b.end <= warm_end][-history:]:
            row = mod.update(st, b)
            if tf != "5m":
                stage.book.offer(row)
    return stage


def timed_groups(bars: dict[str, list[Bar]], warm_end: int) -> list[list[Bar]]:
    """After warm_end, what each closed 5m bar brings: the 5m bar and the 15m / 1h bars ending with it."""
    by_end: dict[int, list[Bar]] = {}
    for tf in ("5m", "15m", "1h"):
        for b in bars[tf]:
            if b.end > warm_end:
                by_end.setdefault(b.end, []).append(b)
    return [by_end[e] for e in sorted(by_end)]


def time_stage(mod, bars, warm_end: int, history: int) -> tuple[float, float, float]:
    """(CPU seconds per primary bar for the stage, for the 5m update alone, per snapshot)."""
    stage = warm_stage(mod, bars, warm_end, history)
    state_5m = copy.deepcopy(stage.states["5m"])  # for timing the 5m updates alone, from the same point
    groups = timed_groups(bars, warm_end)
    t = time.process_time()
    for g in groups:
        stage.on_bars(g)
    per_bar = (time.process_time() - t) / len(groups)
    primaries = [b for g in groups for b in g if b.tf == "5m"]
    t = time.process_time()
    for b in primaries:
        mod.update(state_5m, b)
    per_update = (time.process_time() - t) / len(primaries)
    n_snap = 20
    t = time.process_time()
    for _ in range(n_snap):
        copy.deepcopy(stage)  # what bytewax's stateful_flat_map snapshot does at every epoch close
    per_snap = (time.process_time() - t) / n_snap
    return per_bar, per_update, per_snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bars", type=int, default=240, help="timed primary (5m) bars per repeat")
    ap.add_argument("--history", type=int, default=600, help="bars per timeframe seen before timing (the old window)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision holding the Polars implementation")
    args = ap.parse_args()

    old = load_old(args.old_rev)
    warm_end = T0 + args.history * 60 * MIN  # 600 1h bars end here
    bars = make_bars(args.history * 60 + args.bars * 5, seed=1)
    res: dict[str, list] = {k: [] for k in ("old", "new", "old_snap", "new_snap", "old_5m", "new_5m")}
    n_feat = {"old": len(old.FEATURE_NAMES), "new": len(new.FEATURE_NAMES)}
    for _ in range(args.repeat):
        for name, mod in (("old", old), ("new", new)):
            per_bar, per_update, per_snap = time_stage(mod, bars, warm_end, args.history)
            res[name].append(per_bar)
            res[f"{name}_5m"].append(per_update)
            res[f"{name}_snap"].append(per_snap)
    med = {k: statistics.median(v) for k, v in res.items()}
    speedup = med["old"] / med["new"]
    print(f"feature stage, one instrument, 5m primary + 15m/1h overlays ({args.bars} bars x {args.repeat}, CPU time)")
    print(f"{'':24}{'before (Polars, 600 bars)':>28}{'after (incremental)':>22}{'ratio':>8}")
    print(f"{'features per timeframe':24}{n_feat['old']:>28}{n_feat['new']:>22}{n_feat['new'] / n_feat['old']:>7.1f}x")
    print(f"{'stage, per primary bar':24}{med['old'] * 1e6:>25.0f} us{med['new'] * 1e6:>19.0f} us{speedup:>7.1f}x")
    print(f"{'  5m update alone':24}{med['old_5m'] * 1e6:>25.0f} us{med['new_5m'] * 1e6:>19.0f} us"
          f"{med['old_5m'] / med['new_5m']:>7.1f}x")
    print(f"{'snapshot (deep copy)':24}{med['old_snap'] * 1e6:>25.0f} us{med['new_snap'] * 1e6:>19.0f} us"
          f"{med['old_snap'] / med['new_snap']:>7.1f}x")
    ok = speedup >= 5 and n_feat["new"] >= 3 * n_feat["old"]
    print(f"acceptance (>= 5x cheaper per bar with >= 3x the features): {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
