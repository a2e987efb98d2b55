"""Snapshots of per-key state, taken only when a recovery directory keeps them.

bytewax calls ``snapshot()`` of every stateful step at each epoch's close, for each key touched
in it, and once for every key at the end, even when the run has no recovery directory; its own
``stateful_flat_map`` deep-copies the state each time. Without recovery those copies are thrown
away. ``snapshotter(keep)`` is what the pipeline's logics call: ``copy.deepcopy`` when a recovery
directory keeps the snapshots, otherwise a function that takes none. ``stateful_flat_map`` is
bytewax's operator of that name (same step ids, so recovery directories stay readable) with the
snapshot left to it.

>>> snapshotter(True)([1, [2]]), snapshotter(False)([1, [2]])
([1, [2]], None)
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulLogic

Snapshot = Callable[[Any], Any]


def _none(_state: Any) -> None:
    return None


def snapshotter(keep: bool) -> Snapshot:
    """``copy.deepcopy`` if the snapshots are kept (a recovery directory), else no copy at all."""
    return copy.deepcopy if keep else _none


class FlatMapLogic(StatefulLogic):
    """``mapper(state, value) -> (state, values)``; a None state drops the key (as bytewax's)."""

    def __init__(self, mapper: Callable, state: Optional[Any], snap: Snapshot):
        self.mapper, self.state, self.snap = mapper, state, snap

    def on_item(self, value: Any) -> tuple[Iterable, bool]:
        state, out = self.mapper(self.state, value)
        if state is None:
            return out, StatefulLogic.DISCARD
        self.state = state
        return out, StatefulLogic.RETAIN

    def snapshot(self) -> Any:
        return self.snap(self.state)


@operator
def stateful_flat_map(step_id: str, up: KeyedStream, mapper: Callable, snap: Snapshot = copy.deepcopy) -> KeyedStream:
    """bytewax's ``stateful_flat_map`` (the same inner step, ``stateful``), snapshotting with ``snap``."""
    return op.stateful("stateful", up, lambda resume: FlatMapLogic(mapper, resume, snap))
