#!/usr/bin/env python
"""Oracle edge: how much of the synthetic tape's predictability the models capture (issue 12).

Runs the main job (``tapeflow run`` at its defaults: 3 symbols, 48 h, seed 7; the first half trains
the ONNX ensemble, the second half is scored with it) into a temporary data directory, or reads a
run that exists (``--data-dir``: the tape is read from the run's recovery directory), then scores,
on the scored half and on the same rows for everyone:

- the oracle: the generator's own state at each bar's close (informed flow, regime, trend, anchor)
  turned into label probabilities (operators/synthetic.py ``oracle_probabilities``);
- River (river_lr, river_arf) and the ONNX ensemble, calibrated and raw;
- the class prior (the rows' own label frequencies).

It prints accuracy, log loss, classwise ECE and the share of the oracle's edge each one captures,
(prior - model) / (prior - oracle) in log loss (models/oracle.py), and with ``--markdown FILE``
writes the table as markdown for the README.

    .venv/bin/python bench/oracle_edge.py
    .venv/bin/python bench/oracle_edge.py --data-dir data --markdown /tmp/oracle_readme.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="a finished run (default: run the main job now)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    ap.add_argument("--paths", type=int, default=4000, help="Monte Carlo futures per bar for the oracle")
    args = ap.parse_args()

    from dataflows.config import load_settings
    from models.oracle import edge_report, markdown, scored_rows, tape_of, with_oracle
    from sinks.store import Store

    data_dir = args.data_dir
    elapsed = None
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="oracle-edge-"))
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "cli.main", "run", "--data-dir", str(data_dir), "--quiet"],
                             cwd=ROOT, capture_output=True, text=True)
        elapsed = time.time() - t0
        if res.returncode != 0:
            print(res.stdout + res.stderr, file=sys.stderr)
            return 1
    tape = tape_of(data_dir)
    if tape is None:
        print(f"{data_dir}: no synthetic run found (the oracle exists only for the synthetic tape)", file=sys.stderr)
        return 2
    settings = load_settings(data_dir=str(data_dir))
    split = tape["start_ms"] + int(tape["hours"] * 0.5 * 60) * 60_000  # the main job's train split
    store = Store(settings.dsn(), settings.clickhouse_database)
    try:
        df = scored_rows(store, tf=settings.primary_tf, horizon=settings.label_horizon, since_ms=split)
    finally:
        store.close()
    rows = edge_report(with_oracle(df, tape, tf=settings.primary_tf, horizon=settings.label_horizon,
                                   paths=args.paths))
    if not rows:
        print("no scored rows with every model's prediction", file=sys.stderr)
        return 1
    caption = (f"Oracle edge on the scored half of the main job ({', '.join(tape['symbols'])}, "
               f"{tape['hours']:g} h, seed {tape['seed']}; {rows[0]['rows']} labelled {settings.primary_tf} bars, "
               f"label = direction over {settings.label_horizon} bars with an ATR flat band). "
               "Share = (prior - model) / (prior - oracle) in log loss.")
    print(caption + (f" Main job: {elapsed:.0f} s." if elapsed else ""))
    print(f"{'predictor':<22} {'accuracy':>8} {'log loss':>9} {'ECE':>6} {'share of edge':>14}")
    for r in rows:
        print(f"{r['name']:<22} {r['accuracy']:8.3f} {r['log_loss']:9.4f} {r['ece'] or 0:6.3f} {r['share']:14.0%}")
    if args.markdown:
        args.markdown.write_text(markdown(rows, caption) + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
