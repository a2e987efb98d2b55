"""A run killed between writing an epoch's snapshots and its frontier leaves snapshots of an epoch
it did not finish; no later run may resume from them (``dataflows.recovery_dir``).

Found as a rare failure of ``test_malformed_kafka``'s kill/resume test: after the third resume the
roll-up state of BTC held the 1m bars up to minute 46 while its Kafka positions were at minute 27,
so the 1h bar counted 19 minutes twice. The first test reproduces the mechanism with bytewax
alone; the second checks that ``tapeflow run`` removes such snapshots before it resumes.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.recovery_dir import drop_unfinished_snapshots, resume_epoch


def _summing_flow(items: list, out: list) -> Dataflow:
    flow = Dataflow("t")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(items)), lambda x: x[0])
    summed = op.stateful_map("sum", keyed, lambda acc, x: ((acc or 0) + x[1],) * 2)
    op.output("out", summed, TestingSink(out))
    return flow


def _frontier_lost(db: Path, ex_num: int, frontier: int) -> None:
    """The state a SIGKILL leaves after an epoch's snapshots were written and before its frontier
    was: the execution's frontier row is the one before."""
    with sqlite3.connect(db) as c:
        c.execute("UPDATE fronts SET worker_frontier = ? WHERE ex_num = ?", (frontier, ex_num))
    c.close()


@pytest.mark.parametrize("repair", [False, True])
def test_a_snapshot_of_an_epoch_no_run_finished_is_never_resumed_from(tmp_path, repair):
    # Three executions on one recovery directory. Their epochs hold different items, as in real
    # runs, where epochs are cut by wall time; here each execution is given the items its epoch 1
    # held, so the cut is exact.
    init_db_dir(tmp_path, 1)
    rc, db = RecoveryConfig(str(tmp_path)), tmp_path / "part-0.sqlite3"
    runs: list[list] = [[], [], []]

    # 1: key a counted twice in epoch 1, snapshots written, killed before the epoch's frontier
    run_main(_summing_flow([("a", 1), ("a", 1)], runs[0]), epoch_interval=timedelta(seconds=10), recovery_config=rc)
    _frontier_lost(db, 0, 1)
    if repair:
        assert drop_unfinished_snapshots(tmp_path).epoch == 1
    # 2: resumes from epoch 1, where this time only key b came; it finishes
    run_main(_summing_flow([("b", 1)], runs[1]), epoch_interval=timedelta(seconds=10), recovery_config=rc)
    if repair:
        drop_unfinished_snapshots(tmp_path)
    # 3: resumes after 2's end; key a's first item
    run_main(_summing_flow([("b", 1), ("a", 5)], runs[2]), epoch_interval=timedelta(seconds=10), recovery_config=rc)

    assert runs[1] == [("b", 1)]
    if repair:
        assert runs[2] == [("a", 5)]  # a's count from run 1 was never part of a finished epoch
    else:  # bytewax 0.21 alone: run 3 resumes key a from run 1's unfinished epoch
        assert runs[2] == [("a", 7)]


def test_resume_epoch_is_computed_as_bytewax_computes_it():
    # bytewax's own cases (src/recovery.rs tests resume_from_*): no execution yet; every worker wrote
    # its frontier; one did not (it counts from its execution's resume epoch); older executions ignored
    assert resume_epoch([], []) is None
    assert resume_epoch([(1, 3, 11)], [(1, 0, 13), (1, 1, 12), (1, 2, 13)]) == 12
    assert resume_epoch([(1, 3, 11)], [(1, 0, 13), (1, 2, 13)]) == 11
    assert resume_epoch([(0, 3, 1), (1, 3, 11)], [(0, 0, 50), (1, 0, 13), (1, 1, 14), (1, 2, 15)]) == 13
    assert resume_epoch([(1, 1, 11)], [(1, 0, 9)]) == 11  # a frontier below the resume epoch: the resume epoch


def _stale_rows(rec: Path) -> list[int]:
    """The epochs of the snapshots of the key no run touches."""
    epochs = []
    for db in rec.glob("part-*.sqlite3"):
        with sqlite3.connect(db) as c:
            epochs += [r[0] for r in c.execute("SELECT snap_epoch FROM snaps WHERE state_key = 'stale-key'")]
        c.close()
    return sorted(epochs)


@pytest.mark.parametrize("processes", [1, 2])
def test_tapeflow_run_drops_unfinished_snapshots_before_it_resumes(tmp_path, processes):
    rec = tmp_path / "recovery"
    args = [sys.executable, "-m", "cli.main", "run", "--source", "synthetic", "--symbols", "BTC/USDT:USDT",
            "--hours", "0.1", "--no-store", "--quiet", "--data-dir", str(tmp_path / "data"), "--recovery-dir", str(rec),
            "--processes", str(processes)]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    parts = sorted(rec.glob("part-*.sqlite3"))
    assert len(parts) == processes
    exs, fronts = [], []
    for db in parts:
        with sqlite3.connect(db) as c:
            exs += c.execute("SELECT ex_num, worker_count, resume_epoch FROM exs").fetchall()
            fronts += c.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts").fetchall()
        c.close()
    epoch = resume_epoch(exs, fronts)
    # what a kill after the next epoch's snapshots and before its frontier leaves: a snapshot at the
    # epoch the next run resumes from (a key no run touches, so only the repair can remove it)
    with sqlite3.connect(parts[-1]) as c:
        c.execute("INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?, ?, ?, ?)",
                  ("tapeflow.rollup.stateful_batch", "stale-key", epoch, None))
        c.execute("INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?, ?, ?, ?)",
                  ("tapeflow.rollup.stateful_batch", "stale-key", epoch - 1, None))
    c.close()
    assert _stale_rows(rec) == [epoch - 1, epoch]

    res = subprocess.run([a for a in args if a != "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming {rec} from epoch {epoch}: dropped 1 snapshot(s) of the epoch(s) the stopped run did not finish" \
        in res.stderr
    # the one of a finished epoch stays: it is that key's state (bytewax's own clean-up would keep the
    # newer one and delete this one as superseded)
    assert _stale_rows(rec) == [epoch - 1]


_HOLDER = """
import subprocess, sys, time
from dataflows.recovery_dir import hold, held_fds
hold(sys.argv[1])
if sys.argv[2] == "peer":  # a peer started the way runner.spawn_peers starts them; then this process dies
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=held_fds())
    print("held", peer.pid, flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(60)
"""


def _holder(rec: Path, mode: str) -> tuple[subprocess.Popen, Optional[int]]:
    """A process holding ``rec`` (and the pid of its peer, in mode "peer")."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(rec), mode], stdout=subprocess.PIPE, text=True)
    said = proc.stdout.readline().split()
    assert said[0] == "held"
    return proc, int(said[1]) if len(said) > 1 else None


def test_one_run_at_a_time_holds_a_recovery_directory_until_its_last_process_ends(tmp_path):
    from dataflows.recovery_dir import RecoveryInUse, hold

    rec = tmp_path / "recovery"
    proc, _ = _holder(rec, "alone")
    with pytest.raises(RecoveryInUse, match=f"recovery directory {rec} is in use by another tapeflow run"):
        hold(rec, wait_s=0.3)
    proc.kill()
    proc.wait()
    # a process that dies releases it; one whose peer lives on does not, until the peer ends
    proc, peer = _holder(rec, "peer")
    proc.wait()
    with pytest.raises(RecoveryInUse):
        hold(rec, wait_s=0.3)
    os.kill(peer, signal.SIGKILL)
    proc, _ = _holder(rec, "alone")  # free again (taken in another process: this one keeps no lock)
    proc.kill()
    proc.wait()


def test_a_second_tapeflow_run_on_a_recovery_directory_in_use_is_refused(tmp_path):
    rec = tmp_path / "recovery"
    proc, _ = _holder(rec, "alone")  # a run that holds it (the CLI's own hold is what is tested here)
    try:
        res = subprocess.run([sys.executable, "-m", "cli.main", "run", "--source", "synthetic", "--hours", "0.1",
                              "--no-store", "--quiet", "--data-dir", str(tmp_path / "data"), "--recovery-dir", str(rec)],
                             capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"waiting for the processes of the previous run on {rec} to end" in res.stderr
    assert f"recovery directory {rec} is in use by another tapeflow run" in res.stderr
    assert not (rec / "part-0.sqlite3").exists()  # refused before it touched the directory


def test_a_partition_file_that_is_not_a_recovery_database_is_one_line_and_exit_2(tmp_path):
    rec = tmp_path / "recovery"
    rec.mkdir()
    (rec / "part-0.sqlite3").write_bytes(b"not a database at all")  # bytewax alone: a Rust panic, exit 1
    res = subprocess.run([sys.executable, "-m", "cli.main", "run", "--source", "synthetic", "--hours", "0.1",
                          "--no-store", "--quiet", "--data-dir", str(tmp_path / "data"), "--recovery-dir", str(rec)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "Result::unwrap" not in res.stderr
    assert f"recovery directory {rec}: part-0.sqlite3 is not a bytewax recovery database" in res.stderr
