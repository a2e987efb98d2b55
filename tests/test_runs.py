"""Runs are separate things (issue 11, dataflows/runs.py): a store holds one run's trading rows; the
same run may start again, another is refused (or clears them with --replace)."""

import json

import pytest

from dataflows import runs
from dataflows.runner import source_fingerprint
from sinks.rows import EQUITY_COLUMNS, EVENT_COLUMNS, Rows
from tests.helpers import settings
from tests.test_cli import sql_json, tapeflow

SYN = source_fingerprint("synthetic", symbols=["BTC/USDT:USDT"], start_ms=0, hours=1.0, seed=7, rate=None)


def _equity_row(store, ts=1_000):
    row = dict(origin="production", strategy_id="ensemble", variant_id="base", config_hash="h", ts=ts, seq=1,
               equity=1e4, cash=1e4, realised_pnl=0.0, unrealised_pnl=0.0, fees=0.0, funding=0.0, exposure=0.0,
               open_positions=0, peak=1e4, drawdown=0.0, halted=0)
    store.insert("equity", Rows(EQUITY_COLUMNS, [[row[c] for c in EQUITY_COLUMNS]]))


def test_identity_is_input_and_settings_that_make_rows_not_where_they_live(tmp_path):
    a = runs.run_identity(SYN, settings(tmp_path / "a"))
    assert runs.run_identity(SYN, settings(tmp_path / "b", batch_size=7, store_retry_s=3)) == a
    assert runs.run_identity(SYN, settings(tmp_path / "a", lateness_ms=2_000)) == a  # the default, spelt out
    assert runs.run_identity(SYN, settings(tmp_path / "a", lateness_ms=5_000)).config_hash != a.config_hash
    assert runs.run_identity(SYN, settings(tmp_path / "a", strategy={"conf_min": 0.6})).config_hash != a.config_hash
    other_input = runs.run_identity({**SYN, "seed": 8}, settings(tmp_path / "a"))
    assert other_input.config_hash == a.config_hash and other_input.run_id != a.run_id
    assert runs.run_identity(SYN, settings(tmp_path / "a"), train_split=0.5).run_id != a.run_id


def test_a_store_holds_one_runs_trading_rows(store, tmp_path):
    cfg = settings(tmp_path)
    mine, theirs = runs.run_identity(SYN, cfg), runs.run_identity({**SYN, "seed": 8}, cfg)
    runs.claim_store(store, mine, where="--data-dir X")
    _equity_row(store)
    runs.claim_store(store, mine, where="--data-dir X")  # the same run again: a rerun or a resume
    with pytest.raises(runs.RunConflict) as err:
        runs.claim_store(store, theirs, where="--data-dir X")
    msg = str(err.value)
    assert "\n" not in msg and "--data-dir X" in msg and "--replace" in msg and mine.run_id in msg
    assert "differs in its input" in msg and "settings" not in msg.split("differs in its")[1]
    assert [r["run_id"] for r in runs.recorded_runs(store)] == [mine.run_id]  # the refused run left no trace

    store.insert("events", Rows(EVENT_COLUMNS, [
        ["kill_switch", 2_000, "", "", None, None, "drawdown_limit", "{}", "strategy:ensemble/base"],
        ["data_gap", 2_000, "x", "y", 1_000, 2_000, "gap", "{}", "ingest:x"]]))
    done = runs.claim_store(store, theirs, where="--data-dir X", replace=True)
    assert done["replaced"] and done["rows"]["equity"] == 1
    assert store.query("SELECT count() FROM equity")[1][0][0] == 0
    kinds = dict(store.query("SELECT kind, detail FROM events FINAL")[1])
    assert set(kinds) == {"data_gap", "store_replaced"}  # the data's events stay, the strategies' go
    assert json.loads(kinds["store_replaced"])["replaced_runs"] == [mine.run_id]
    assert [r["run_id"] for r in runs.recorded_runs(store)] == [theirs.run_id]


def test_rows_of_no_recorded_run_are_refused_unless_resuming_and_an_empty_store_forgets_old_runs(store, tmp_path):
    cfg = settings(tmp_path)
    mine, theirs = runs.run_identity(SYN, cfg), runs.run_identity({**SYN, "seed": 8}, cfg)
    _equity_row(store)  # written by a tapeflow that did not record runs
    with pytest.raises(runs.RunConflict, match="not recorded"):
        runs.claim_store(store, mine, where="--data-dir X")
    runs.claim_store(store, mine, where="--data-dir X", resuming=True)  # its own recovery dir: continue
    store.command("TRUNCATE TABLE equity")
    runs.claim_store(store, theirs, where="--data-dir X")  # no trading rows: any run may start
    assert [r["run_id"] for r in runs.recorded_runs(store)] == [theirs.run_id]


def test_cli_refuses_another_run_in_one_line_and_replace_clears_the_store(tmp_path):
    args = ["run", "--data-dir", str(tmp_path), "--hours", "1", "--rate", "1", "--quiet", "--train-split", "0"]
    tapeflow(*args)
    n = sql_json(tmp_path, "SELECT count() AS n FROM equity")[0]["n"]
    assert n > 0
    res = tapeflow(*args, "--seed", "8", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and f"--data-dir {tmp_path}" in res.stderr and "--replace" in res.stderr, res.stderr
    assert sql_json(tmp_path, "SELECT count() AS n FROM equity")[0]["n"] == n  # nothing written
    tapeflow(*args, "--seed", "8", "--replace")
    ran = sql_json(tmp_path, "SELECT run_id, replaced FROM runs FINAL")
    assert len(ran) == 1 and ran[0]["replaced"] == 1
    assert sql_json(tmp_path, "SELECT count() AS n FROM events FINAL WHERE kind = 'store_replaced'")[0]["n"] == 1
