#!/usr/bin/env python
"""How an instrument's River forest grows with the labels it learns, by ARF depth limit.

One ``river_arf`` pipeline per depth (the pipeline's own: ``models.online.build_models``, 10 trees,
the 22 default online features) learns ``--labels`` labels of a seeded synthetic signal (two
informative features, the rest noise, three classes); at checkpoints it prints the pickled size
of the pipeline (what a recovery snapshot holds, and a stand-in for its memory), the number of
leaves, and at the end the accuracy over the last half (predicted before learned). The pipeline
labels one primary bar at a time: 288 labels a day per instrument on the 5m default.

    .venv/bin/python bench/arf_memory.py
    .venv/bin/python bench/arf_memory.py --labels 5000 --depths none,4,6
"""

from __future__ import annotations

import argparse
import pickle
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataflows.config import Settings  # noqa: E402
from models.online import (ARF, FillScaled, OnlineConfig, build_models, forest, preprocessing,  # noqa: E402
                           share_distribution_rngs)


def grow(depth: int | None, labels: int, names: tuple[str, ...]) -> None:
    if depth is None:  # River's default, no limit: build_models' pipeline without max_depth
        cfg = OnlineConfig(seed=1)
        arf = (preprocessing.StandardScaler() | FillScaled(names, cfg.clip)
               | forest.ARFClassifier(n_models=cfg.arf_models, seed=cfg.seed))
    else:
        arf = build_models(names, OnlineConfig(seed=1, arf_max_depth=depth))[ARF]
    rng, shared = random.Random(3), random.Random(0)
    correct, t0 = 0, time.perf_counter()
    checkpoints = {labels // 8, labels // 4, labels // 2, labels}
    for n in range(1, labels + 1):
        x = {k: rng.gauss(0, 1) for k in names}
        s = x[names[0]] + 0.5 * x[names[1]] + rng.gauss(0, 1)
        y = 0 if s < -0.5 else (2 if s > 0.5 else 1)
        p = arf.predict_proba_one(x)
        if n > labels // 2 and p and max(p, key=p.get) == y:
            correct += 1
        arf.learn_one(x, y)
        if n % 500 == 0:
            share_distribution_rngs(arf, shared)  # as models/online.py does after each learn
        if n in checkpoints:
            leaves = sum(m.n_leaves for m in arf[-1])
            print(f"depth {depth or 'none':>4}  labels {n:>6,}  pickled {len(pickle.dumps(arf)) / 1e6:6.1f} MB  "
                  f"leaves {leaves:>5}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"depth {depth or 'none':>4}  accuracy over the last {labels - labels // 2:,} labels: "
          f"{correct / (labels - labels // 2):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=20_000, help="labels learned per depth")
    ap.add_argument("--depths", default="none,4,6,8", help="comma-separated depth limits ('none': unlimited)")
    args = ap.parse_args()
    names = tuple(Settings().online_features)
    for d in args.depths.split(","):
        grow(None if d.strip() == "none" else int(d), args.labels, names)


if __name__ == "__main__":
    main()
