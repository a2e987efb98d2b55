"""Routing keys kept beside the state (dataflows/routes.py): a resumed run finds every
instrument's state under the key it was saved with, whatever its process count or universe."""
import json

import pytest

from dataflows.routes import ROUTES_FILE, run_routes, with_new
from dataflows.runner import RecoveryMismatch
from operators.routing import balanced_keys

NAMES = [f"x:S{i}" for i in range(16)]


def test_without_a_recovery_directory_the_keys_are_balanced_and_nothing_is_written(tmp_path):
    assert run_routes(NAMES, 2, None, None, resuming=False) == balanced_keys(NAMES, 2)
    assert run_routes(NAMES, 1, None, None, resuming=False) == {}  # one worker: own names
    assert list(tmp_path.iterdir()) == []


def test_the_first_run_writes_its_keys_and_later_runs_keep_them(tmp_path):
    first = run_routes(NAMES, 2, None, tmp_path, resuming=False)
    assert first == balanced_keys(NAMES, 2) and first != {n: n for n in NAMES}  # some moved
    assert json.loads((tmp_path / ROUTES_FILE).read_text())["keys"] == first
    # resumed with 3 processes: the same keys (the state is under them), not 3-worker ones
    assert run_routes(NAMES, 3, None, tmp_path, resuming=True) == first
    assert balanced_keys(NAMES, 3) != first


def test_an_instrument_added_later_gets_a_key_nobody_has_and_is_kept(tmp_path):
    first = run_routes(NAMES, 2, None, tmp_path, resuming=False)
    suffixed = next(k for k in first.values() if "#" in k)
    later = [*NAMES, "x:NEW", suffixed]  # an instrument literally named like another's key
    keys = run_routes(later, 2, None, tmp_path, resuming=True)
    assert {n: keys[n] for n in NAMES} == first
    assert keys["x:NEW"] == "x:NEW" and keys[suffixed] != suffixed
    assert len(set(keys.values())) == len(keys)  # two instruments never share a key
    assert json.loads((tmp_path / ROUTES_FILE).read_text())["keys"] == keys


def test_state_saved_before_keys_were_kept_goes_on_under_the_instruments_own_names(tmp_path):
    keys = run_routes(NAMES, 2, None, tmp_path, resuming=True)  # state there, no file: an older version's
    assert keys == {n: n for n in NAMES}
    assert run_routes(NAMES, 2, None, tmp_path, resuming=True) == keys
    assert keys != balanced_keys(NAMES, 2)  # hash-routed as before, not rebalanced under its state


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / ROUTES_FILE).write_text("{not json")
    with pytest.raises(RecoveryMismatch, match="unreadable; delete the directory"):
        run_routes(NAMES, 2, None, tmp_path, resuming=True)


def test_with_new_leaves_kept_keys_alone():
    assert with_new({"a": "a#1"}, ["a", "a#1", "b"]) == {"a": "a#1", "a#1": "a#1#1", "b": "b"}
