"""The routing keys of a run's instruments, kept beside the state in a recovery directory.

``operators.routing.balanced_keys`` gives each instrument a key that lands it on a chosen worker.
Per-instrument state is saved under that key, so a run that resumes must use the keys the state
was saved with, whatever its own process count or instrument list: the first run of a recovery
directory writes its keys to ``ROUTES_FILE`` there, and every later run reads them. An instrument
that is not in the file (one added to the universe later) gets its own name as key (or ``name#n``
if another instrument's key is that name) and is added to the file. A directory that holds state
but no file was written by a version that keyed every instrument by its own name: so it goes on.
Processes of one cluster decide the same keys: the local peers start after process 0 wrote the
file, and separately started processes compute the same keys from the same universe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from dataflows.runner import RecoveryMismatch
from operators.routing import balanced_keys, first_key

ROUTES_FILE = "tapeflow-routes.json"


def with_new(kept: dict[str, str], universe: Iterable[str]) -> dict[str, str]:
    """``kept`` plus a key for each instrument of ``universe`` it lacks: its own name, or ``name#n``
    for the smallest ``n`` that is nobody's name or key."""
    out = dict(kept)
    taken = set(kept) | set(kept.values())
    for name in sorted(set(universe) - set(kept)):
        key = first_key(name, lambda k: k not in taken)
        out[name] = key
        taken |= {name, key}
    return out


def run_routes(universe: Iterable[str], workers: int, home: Optional[Callable[[str, int], Optional[int]]],
               recovery_dir: Optional[Path], resuming: bool, first_share: float = 1.0) -> dict[str, str]:
    """``{instrument: routing key}`` for this run (module docstring). ``resuming``: the recovery
    directory held a run's state before this run claimed it. ``first_share``: worker 0's share
    (``operators.routing.balanced_keys``)."""
    universe = sorted(set(universe))

    def fresh() -> dict[str, str]:
        return balanced_keys(universe, workers, home, first_share) if workers > 1 else {}

    if recovery_dir is None:
        return fresh()
    f = Path(recovery_dir) / ROUTES_FILE
    if f.exists():
        try:
            kept = json.loads(f.read_text())["keys"]
        except (OSError, ValueError, KeyError, TypeError):
            raise RecoveryMismatch(f"recovery directory {recovery_dir}: {f.name} is unreadable; delete the "
                                   "directory to start over") from None
    else:
        kept = {} if resuming else fresh()
    keys = with_new(kept, universe)
    if keys != kept or not f.exists():
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"keys": keys}, indent=1, sort_keys=True))
        tmp.replace(f)  # atomic: processes of one cluster may write at once (the same keys)
    return keys
