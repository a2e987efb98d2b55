"""A local peer, started early by process 0, waits for the phase's release (dataflows/runner.py):
it goes on once process 0 releases the phase, and ends when process 0 is gone."""

from __future__ import annotations

import threading

import pytest

from dataflows import runner


def test_a_phase_without_peers_writes_no_release(tmp_path):
    runner.release_peers(tmp_path, [])
    assert not (tmp_path / runner.RELEASE_FILE).exists()


def test_a_peer_waits_until_the_phase_is_released(tmp_path):
    released = threading.Event()
    done = threading.Event()

    def peer():
        runner.await_release(tmp_path, poll_s=0.001)
        assert released.is_set()  # never before
        done.set()

    t = threading.Thread(target=peer)
    t.start()
    assert not done.wait(0.2)  # still waiting: nothing released
    released.set()
    runner.release_peers(tmp_path, [object()])  # a phase with a peer
    t.join(10)
    assert done.is_set()


def test_a_peer_whose_parent_is_gone_ends(tmp_path, monkeypatch):
    parents = iter([100, 100, 1])  # reparented on the third look: process 0 is gone
    monkeypatch.setattr(runner.os, "getppid", lambda: next(parents))
    with pytest.raises(SystemExit):
        runner.await_release(tmp_path, poll_s=0)
    assert not (tmp_path / runner.RELEASE_FILE).exists()
