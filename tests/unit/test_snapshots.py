"""Per-key state is copied for a snapshot only when a recovery directory keeps it."""

from bytewax.operators import StatefulLogic

from dataflows.snapshots import FlatMapLogic, snapshotter


def _count(state, value):
    state = state or {"n": 0, "seen": []}
    if value is None:
        return None, ["dropped"]
    state["n"] += 1
    state["seen"].append(value)
    return state, [state["n"]]


def test_a_kept_snapshot_is_a_deep_copy_that_later_items_do_not_change():
    logic = FlatMapLogic(_count, None, snapshotter(True))
    assert logic.on_item("a") == ([1], StatefulLogic.RETAIN)
    snap = logic.snapshot()
    logic.on_item("b")
    assert snap == {"n": 1, "seen": ["a"]}
    assert logic.state == {"n": 2, "seen": ["a", "b"]}
    resumed = FlatMapLogic(_count, snap, snapshotter(True))  # what a restart builds from it
    assert resumed.on_item("c") == ([2], StatefulLogic.RETAIN)


def test_without_recovery_no_copy_is_taken():
    logic = FlatMapLogic(_count, None, snapshotter(False))
    logic.on_item("a")
    assert logic.snapshot() is None
    assert logic.state == {"n": 1, "seen": ["a"]}  # the state itself is untouched


def test_a_none_state_drops_the_key_like_bytewax():
    logic = FlatMapLogic(_count, {"n": 5, "seen": []}, snapshotter(True))
    assert logic.on_item(None) == (["dropped"], StatefulLogic.DISCARD)
