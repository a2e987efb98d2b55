#!/usr/bin/env python
"""Per-batch cost of decoding and validating trades (``operators.decode.decode_batch``), the code
of a given commit vs the working tree's, measured in one process on the same batches.

A paced or live source hands over small batches (a few trades each: the synthetic feed at 60x
released 5 rows a batch at the median), where Polars' fixed cost per query and the building of
the validation expressions outweigh the rows; a backlog hands over large ones. Both are timed,
as column batches (replay, synthetic) and as Kafka messages, with and without a bad row among
them. The "before" code is read from git (``git show REV:operators/decode.py``) into a temporary
module. Old and new alternate within each repeat; the median CPU time of this process per batch is
reported, and the script checks that both give the same frames and the same dead letters.

    .venv/bin/python bench/decode_cost.py                  # against REV (the commit before the change)
    .venv/bin/python bench/decode_cost.py --rev HEAD~3 --repeat 9
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from operators import decode as new  # noqa: E402
from operators.records import FrameBatch, RawBatch  # noqa: E402

REV = "9e4898c"  # the last commit that built the validation expressions at every batch
NOW = 1_704_067_200_000


def old_module(rev: str):
    text = subprocess.run(["git", "show", f"{rev}:operators/decode.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="tapeflow-decode-")) / "decode_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("decode_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["decode_old"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def trades(n: int, bad: bool) -> list[dict]:
    rows = [{"exchange": "binanceusdm", "symbol": f"S{i % 3}/USDT:USDT", "id": str(1000 + i), "ts": NOW - 5_000 + i,
             "price": 100.0 + (i % 7) * 0.5, "amount": 0.01 * (1 + i % 5), "side": "buy" if i % 2 else "sell"}
            for i in range(n)]
    if bad:
        rows[n // 2]["price"] = -1.0
    return rows


def batches(n: int, bad: bool) -> dict:
    rows = trades(n, bad)
    frame = pl.DataFrame(rows).with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))
    keys = [f"{r['exchange']}:{r['symbol']}".encode() for r in rows]
    return {"columns": FrameBatch("bench", "0", frame, NOW, []),
            "Kafka messages": RawBatch("bench", "0", list(range(n)), [msgspec.json.encode(r) for r in rows], NOW, keys)}


def per_batch(fn, batch, loops: int) -> tuple[float, float]:
    """(wall, CPU of every thread of this process) seconds per batch."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(loops):
        fn(batch, NOW)
    return (time.perf_counter() - w) / loops, (time.process_time() - c) / loops


def same(a, b) -> bool:
    return a.frame.equals(b.frame) and [d.__dict__ if hasattr(d, "__dict__") else msgspec.structs.asdict(d)
                                        for d in a.dead] == [d.__dict__ if hasattr(d, "__dict__")
                                                             else msgspec.structs.asdict(d) for d in b.dead]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default=REV)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    old = old_module(args.rev)
    print(f"decode_batch per batch, {args.rev} vs the working tree (medians of {args.repeat}; wall time of the "
          f"calling thread, and CPU time of all threads: Polars runs a query on its thread pool)")
    print(f"{'batch':<44}{'wall before':>12}{'after':>10}{'ratio':>8}{'CPU before':>12}{'after':>10}{'ratio':>8}")
    for n, loops in ((5, 1000), (10_000, 10)):
        for bad in (False, True):
            for kind, batch in batches(n, bad).items():
                if not same(old.decode_batch(batch, NOW), new.decode_batch(batch, NOW)):
                    sys.exit(f"{kind}, {n} rows: the two versions disagree")
                before, after = [], []
                for _ in range(args.repeat):
                    before.append(per_batch(old.decode_batch, batch, loops))
                    after.append(per_batch(new.decode_batch, batch, loops))
                label = f"{n:,} {'rows' if kind == 'columns' else 'messages'}{', one bad' if bad else ''} ({kind})"
                line = f"{label:<44}"
                for i in (0, 1):
                    b, a = statistics.median(x[i] for x in before), statistics.median(x[i] for x in after)
                    line += f"{b * 1e3:>10.3f}ms{a * 1e3:>8.3f}ms{a / b:>7.2f}x"
                print(line, flush=True)

if __name__ == "__main__":
    main()
