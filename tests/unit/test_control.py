"""Operator commands reach the portfolio stage: `tapeflow killswitch reset` (the real command) lifts
a tripped kill switch at the pipeline's next input, audited as a kill_switch_reset event."""

import json
import pickle
import subprocess
import sys

import msgspec

from dataflows.control import ControlInbox, pending, request_reset
from dataflows.pipeline import PortfolioLogic
from operators.portfolio import Portfolio
from operators.risk import RiskEvent
from operators.decision import Decision
from tests.unit.test_strategy import LONG, P, T0, bar, cfg, row


def _halted_portfolio_logic(data_dir):
    c = cfg(stop_loss_pct=0.04, base_notional=10_000.0, sigma_target=5.0, daily_loss_limit=0.0,
            max_consecutive_losses=0)
    logic = PortfolioLogic(None, lambda: Portfolio.create(c), ControlInbox(data_dir, check_every_s=0), lambda: None)
    for k in range(3):  # three 4% stop-outs: a 12% drawdown trips the 10% kill switch
        t = T0 + k * 4 * P
        logic.on_batch([row(t, preds=LONG)])
        logic.on_batch([bar(t, 100.0, h=100.0, l=95.0, c=95.5)])
    assert logic.p.production.halted
    return logic


def test_killswitch_reset_command_lifts_the_halt_at_the_next_input_and_is_audited(tmp_path):
    logic = _halted_portfolio_logic(tmp_path)
    out, _ = logic.on_batch([row(T0 + 20 * P, preds=LONG)])
    (d,) = [r for r in out if isinstance(r, Decision)]
    assert d.reason == "drawdown_limit"

    res = subprocess.run([sys.executable, "-m", "cli.main", "killswitch", "reset", "--data-dir", str(tmp_path),
                          "--by", "alice", "--reason", "reviewed"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(pending(tmp_path)) == 1

    out, _ = logic.on_batch([row(T0 + 21 * P, preds=LONG)])
    resets = [r for r in out if isinstance(r, RiskEvent) and r.kind == "kill_switch_reset"]
    assert len(resets) == 1 and msgspec.json.decode(resets[0].detail)["by"] == "alice"
    assert resets[0].as_event().kind == "kill_switch_reset"  # stored in events
    (d,) = [r for r in out if isinstance(r, Decision)]
    assert d.action == "open_long" and not logic.p.production.halted
    assert pending(tmp_path) == []  # applied once, then marked done
    out, _ = logic.on_batch([])
    assert not [r for r in out if isinstance(r, RiskEvent)]


def test_requests_are_taken_by_one_lineage_and_throttled(tmp_path):
    clock = [0.0]
    inbox = ControlInbox(tmp_path, check_every_s=5.0, clock=lambda: clock[0], lineage="rec@1")
    assert inbox.take() == []
    request_reset(tmp_path, by="bob", strategy="all")
    assert inbox.take() == []  # not looked at again before 5 s
    clock[0] = 5.0
    (req,) = inbox.take()
    assert req["by"] == "bob" and req["strategy"] == "all" and req["id"].startswith("killswitch-reset-")
    assert pending(tmp_path) == []
    done = list((tmp_path / "control").glob("*.done"))
    assert len(done) == 1 and json.loads(done[0].read_text())["taken_by"] == "rec@1"
    clock[0] = 10.0
    assert [r["id"] for r in inbox.take()] == [req["id"]]  # offered again: the state says if it was applied
    assert ControlInbox(tmp_path, check_every_s=0, lineage="rec@2").take() == []  # another run's: never
    assert ControlInbox(tmp_path, check_every_s=0).take() == []


def test_a_reset_taken_just_before_a_crash_is_applied_once_to_the_restored_state(tmp_path):
    """The crash comes after the request was taken (its file says done) and before a snapshot that
    includes its effect was committed: the state restored from the snapshot before it gets the
    reset once; a state restored from a later snapshot, or another run's state, does not."""
    logic = _halted_portfolio_logic(tmp_path)
    logic.inbox = ControlInbox(tmp_path, check_every_s=0, lineage="rec@1")
    before = pickle.dumps(logic.snapshot())  # the last committed snapshot (bytewax pickles it)
    request_reset(tmp_path, by="alice")
    out, _ = logic.on_batch([row(T0 + 21 * P, preds=LONG)])
    (first,) = [r for r in out if isinstance(r, RiskEvent) and r.kind == "kill_switch_reset"]
    after = pickle.dumps(logic.snapshot())
    assert pending(tmp_path) == [] and not logic.p.production.halted

    def restart(snapshot, lineage="rec@1"):  # a new process: new inbox, state from the recovery snapshot
        return PortfolioLogic(pickle.loads(snapshot), None, ControlInbox(tmp_path, check_every_s=0, lineage=lineage),
                              lambda: None)

    def resets(lg, n=3):
        got = []
        for k in range(n):
            out, _ = lg.on_batch([row(T0 + (22 + k) * P, preds=LONG)])
            got += [r for r in out if isinstance(r, RiskEvent) and r.kind == "kill_switch_reset"]
        return got

    rolled_back = restart(before)
    assert rolled_back.p.production.halted
    (again,) = resets(rolled_back)  # applied again, once
    assert not rolled_back.p.production.halted
    assert (again.ts, again.detail) == (first.ts, first.detail)  # the same audit row (same events key)
    assert resets(restart(after)) == []  # its effect was in the snapshot: not applied twice
    other = restart(before, lineage="rec@2")  # another run's state
    assert resets(other) == [] and other.p.production.halted
