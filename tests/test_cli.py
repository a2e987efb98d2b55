"""The `tapeflow` command as a user runs it (subprocesses, embedded store under a data dir)."""

import json
import subprocess
import sys



def tapeflow(*args, env=None, check=True):
    cmd = [sys.executable, "-m", "cli.main", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def sql_json(data_dir, query):
    return json.loads(tapeflow("sql", "--data-dir", str(data_dir), "--format", "json", query).stdout)


QUERY = ("SELECT symbol, tf, start, trades, open, close, volume, delta, min_delta, max_delta, pros_gross, "
         "amateurs_gross, s_mood, poc, vah, val FROM bars FINAL ORDER BY symbol, tf, start")


def test_run_synthetic_then_sql_shows_every_timeframe_with_cohorts_and_profile(tmp_path):
    res = tapeflow("run", "--data-dir", str(tmp_path), "--hours", "6", "--rate", "1", "--quiet", "--train-split", "0")
    assert "trades in" in res.stdout and "bars 1d" in res.stdout
    rows = sql_json(tmp_path, "SELECT tf, count() AS n, uniqExact(symbol) AS symbols, min(pros_gross) AS pg, "
                              "min(amateurs_gross) AS ag, countIf(poc = 0 OR vah < val) AS bad_profile "
                              "FROM bars FINAL GROUP BY tf")
    by_tf = {r["tf"]: r for r in rows}
    assert set(by_tf) == {"1m", "5m", "15m", "1h", "4h", "1d"}
    assert by_tf["1m"]["n"] == 3 * 6 * 60 and by_tf["1h"]["n"] == 3 * 6 and by_tf["1d"]["n"] == 3
    for r in rows:
        assert r["symbols"] == 3
        assert r["ag"] > 0 and r["bad_profile"] == 0
    assert by_tf["1h"]["pg"] > 0
    table = tapeflow("sql", "--data-dir", str(tmp_path), "SELECT tf, count() FROM bars FINAL GROUP BY tf")
    assert "1d" in table.stdout and "6 row(s)" in table.stderr


def test_two_processes_store_the_same_bars_as_one(tmp_path):
    args = ["run", "--hours", "2", "--rate", "2", "--quiet", "--train-split", "0", "--symbols",
            "BTC/USDT:USDT,ETH/USDT:USDT,SOL/USDT:USDT,XRP/USDT:USDT"]
    tapeflow(*args, "--data-dir", str(tmp_path / "one"))
    two = tapeflow(*args, "--data-dir", str(tmp_path / "two"), "--processes", "2",
                   "--summary-json", str(tmp_path / "two.json"))
    assert "trades in" in two.stdout
    summary = json.loads((tmp_path / "two.json").read_text())
    assert len(summary["peak_rss_mb"]) == len(summary["cpu_s_by_process"]) == 2  # what each process used
    assert all(s > 0.5 for s in summary["cpu_s_by_process"])  # each ran a share of the pipeline (and its imports)
    a, b = sql_json(tmp_path / "one", QUERY), sql_json(tmp_path / "two", QUERY)
    assert len(a) > 4 * 120 and a == b


def test_no_store_counts_every_trade_and_says_nothing_was_kept(tmp_path):
    res = tapeflow("run", "--data-dir", str(tmp_path), "--hours", "1", "--rate", "1", "--quiet", "--no-store",
                   "--summary-json", str(tmp_path / "s.json"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["trades_in"] > 0 and summary["sink"]["trades_in_bars"] == summary["trades_in"]
    assert "none (--no-store" in res.stdout and "chdb://" not in res.stdout  # not a store it never wrote to
    assert not (tmp_path / "clickhouse").exists()


def test_rerunning_the_same_input_leaves_the_same_rows(tmp_path):
    args = ["run", "--data-dir", str(tmp_path), "--hours", "1", "--rate", "1", "--quiet", "--train-split", "0"]
    tapeflow(*args)
    first = sql_json(tmp_path, QUERY)
    tapeflow(*args)
    assert sql_json(tmp_path, QUERY) == first
    assert sql_json(tmp_path, "SELECT count() AS n FROM bars FINAL")[0]["n"] == len(first)


def test_clear_errors(tmp_path):
    res = tapeflow("run", "--source", "replay", "--data-dir", str(tmp_path), check=False)
    assert res.returncode != 0 and "needs at least one --file" in res.stderr
    res = tapeflow("sql", "--data-dir", str(tmp_path), "SELECT * FROM no_such_table", check=False)
    assert res.returncode != 0 and "query failed" in res.stderr and "Traceback" not in res.stderr
    env = {**__import__("os").environ, "TAPEFLOW_LATENESS_MS": "-5"}
    res = tapeflow("run", "--data-dir", str(tmp_path), env=env, check=False)
    assert res.returncode != 0 and "lateness_ms" in res.stderr and "Traceback" not in res.stderr


def test_optimizer_status_prints_the_leaderboard_from_the_store(tmp_path):
    env = {**__import__("os").environ, "TAPEFLOW_OPTIMIZER": '{"enabled": true, "max_variants": 3, "metrics_every_bars": 6}',
           "TAPEFLOW_STRATEGY": '{"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": false}'}
    tapeflow("run", "--data-dir", str(tmp_path), "--hours", "8", "--rate", "0.5", "--quiet", "--train-split", "0",
             env=env)
    out = tapeflow("optimizer", "status", "--data-dir", str(tmp_path)).stdout
    assert "optimizer leaderboard" in out and "production" in out
    variants = sql_json(tmp_path, "SELECT DISTINCT variant_id FROM variant_metrics FINAL WHERE origin = 'experimental'")
    assert len(variants) == 3 and all(v["variant_id"] in out for v in variants)
    empty = tapeflow("optimizer", "status", "--data-dir", str(tmp_path), "--database", "no_optimizer").stdout
    assert "no optimizer metrics yet" in empty
