#!/usr/bin/env python
"""Resident memory per component, in the order a run loads them, in one fresh process.

Each step imports (or opens) one component on top of the ones before, as ``tapeflow run`` does, and
the script prints what the process's resident set grew by: all of it, its anonymous part (heap,
allocator arenas) and its file-backed part (the pages of shared libraries that were touched; counted
in RSS, shared with other processes that map the same files). The last steps are what only the
embedded store and training bring.

    .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import proc_memory  # noqa: E402  (RSS, anonymous, file-backed of this process, MB)


def open_store(tmp: str) -> None:
    from sinks.store import Store

    Store(f"chdb://{tmp}/clickhouse", "tapeflow").close()  # opens it and applies the schema


def train_imports() -> None:
    from models.lean_imports import import_lightgbm

    import_lightgbm()  # as models.train imports it
    importlib.import_module("onnxmltools")


def online_models() -> None:
    from models.online import OnlineConfig, OnlineModels

    OnlineModels(OnlineConfig())


STEPS = [
    ("numpy, polars", lambda _: (importlib.import_module("numpy"), importlib.import_module("polars"))),
    ("bytewax, confluent-kafka, msgspec", lambda _: [importlib.import_module(m) for m in
                                                     ("bytewax.operators", "confluent_kafka", "msgspec")]),
    ("the pipeline's modules (dataflows.pipeline, cli)", lambda _: [importlib.import_module(m) for m in
                                                                    ("dataflows.pipeline", "cli.run")]),
    ("River online models (models.online)", lambda _: online_models()),
    ("onnxruntime (serving the ensemble)", lambda _: importlib.import_module("onnxruntime")),
    ("clickhouse-connect", lambda _: importlib.import_module("clickhouse_connect")),
    ("chdb (the embedded ClickHouse, without pyarrow)",
     lambda _: importlib.import_module("models.lean_imports").import_chdb()),
    ("the store opened, schema applied", open_store),
    ("training: lightgbm (without scikit-learn, pandas), onnxmltools", lambda _: train_imports()),
]


def main() -> None:
    base = proc_memory()
    print(f"{'component':<62} {'+RSS':>8} {'+anon':>8} {'+file':>8} {'total':>8}   (MB)")
    print(f"{'python interpreter (start)':<62} {base[0]:8.0f} {base[1]:8.0f} {base[2]:8.0f} {base[0]:8.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        before = base
        for name, step in STEPS:
            step(tmp)
            now = proc_memory()
            print(f"{name:<62} {now[0] - before[0]:8.0f} {now[1] - before[1]:8.0f} {now[2] - before[2]:8.0f} "
                  f"{now[0]:8.0f}", flush=True)
            before = now


if __name__ == "__main__":
    main()
