"""`tapeflow status` (issue 14) on a populated store: a pipeline run that ends now, an ingest
heartbeat, a tripped kill switch, a scored model and optimizer variants; what it prints comes from
those rows. Also: every section says "none" on an empty store, --watch refreshes until Ctrl-C,
and an embedded store held by another process is refused with one clear line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest
from click.testing import CliRunner

from cli.main import main
from dataflows.heartbeat import IngestProgress, write_atomic
from cli.status import read_status
from operators.records import FrameBatch
from sinks.clickhouse import ClickHouseSink, SinkStats
from sinks.store import Store
from tests.helpers import run_pipeline, settings, synthetic_tape

UTC = timezone.utc
MIN = 60_000
SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT"]


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def insert(store: Store, table: str, rows: list[dict]) -> None:
    cols = list(rows[0])
    store.client.insert(table, [[r[c] for c in cols] for r in rows], column_names=cols)


@pytest.fixture(scope="module")
def populated(chdb_dsn, tmp_path_factory):
    data = tmp_path_factory.mktemp("status")
    store = Store(chdb_dsn, "status_" + uuid.uuid4().hex[:10])
    end = now_ms() // MIN * MIN
    tape = synthetic_tape(SYMBOLS, minutes=90, start_ms=end - 90 * MIN, rate=1.0)
    received = now_ms()
    batches = [FrameBatch("synthetic", "0", tape.slice(i, 3000), received) for i in range(0, tape.height, 3000)]
    sink = ClickHouseSink(store.dsn, store.database, SinkStats(), flush_rows=100_000, flush_ms=60_000,
                          health_every_s=0.2)
    run_pipeline(batches, store, settings(data), sink=sink)

    t = datetime.now(UTC)
    tags = {"origin": "production", "strategy_id": "ensemble", "variant_id": "base", "config_hash": "h"}
    insert(store, "equity", [{**tags, "ts": t, "seq": 10**9, "equity": 8_900.0, "open_positions": 2,
                              "drawdown": 0.11, "halted": 1}])
    insert(store, "events", [{"kind": "kill_switch", "ts": t, "reason": "drawdown 11.0% >= 10.0%",
                              "detail": json.dumps({"origin": "production"}), "source": "strategy:ensemble/base"}])
    # a scored model: 240 matured 5m predictions, right 3 times in 4 at confidence 0.7
    preds, labels = [], []
    for i in range(240):
        s = t - timedelta(hours=22) + timedelta(minutes=5 * i)
        key = {"exchange": "x", "symbol": "BTC/USDT:USDT", "tf": "5m", "start": s, "end": s + timedelta(minutes=5)}
        preds.append({**key, "model": "onnx_ensemble", "version": "20991231T000000-abc", "p_down": 0.2,
                      "p_flat": 0.1, "p_up": 0.7, "confidence": 0.7, "alpha": 0.5, "votes": ""})
        labels.append({**key, "horizon": 3, "fwd_ret": 0.0, "band": 0.0, "label": 2 if i % 4 else 0,
                       "matured_at": s + timedelta(minutes=20)})
    insert(store, "predictions", preds)
    insert(store, "labels", labels)
    vm = ["ts", "origin", "strategy_id", "variant_id", "config_hash", "config", "status", "runtime_ms", "roi",
          "trades", "sharpe", "dsr"]
    store.client.insert("variant_metrics", [
        [t, "experimental", "ensemble", "v1", "h1", "{}", "active", 60_000, 0.03, 12, 1.5, 0.91],
        [t, "experimental", "ensemble", "v2", "h2", "{}", "active", 60_000, -0.01, 9, -0.2, 0.40],
        [t, "production", "ensemble", "base", "h", "{}", "active", 60_000, 0.01, 10, 0.5, None]], column_names=vm)

    beat = IngestProgress({"binanceusdm": ["BTC/USDT:USDT"], "bybit": ["ETH/USDT:USDT"]}, now_ms=received - 60_000)
    frame = pl.DataFrame({"exchange": ["binanceusdm"], "symbol": ["BTC/USDT:USDT"], "ts": [received - 2_500],
                          "recv_ts": [received - 2_000]})
    beat.observe(FrameBatch("ccxt:binanceusdm", "binanceusdm", frame, received - 2_000), now_ms=received - 2_000)
    write_atomic(data / "heartbeat" / "ingest.json", beat.to_dict())
    yield store, data, end
    store.close()


def status(store, data, *extra):
    res = CliRunner().invoke(main, ["status", "--dsn", store.dsn, "--database", store.database,
                                    "--data-dir", str(data), *extra], catch_exceptions=False)
    return res.exit_code, res.output


def test_status_reads_what_the_store_and_heartbeat_hold(populated):
    store, data, end = populated
    st = read_status(store, data / "heartbeat", data, "test")
    (ks,) = [g for g in st.guards if g["guard"] == "kill_switch"]
    assert ks["active"] == 1 and "drawdown 11.0%" in ks["reason"]
    (prod,) = st.strategies
    assert (prod["equity"], prod["open_positions"], prod["halted"]) == (8_900.0, 2, 1)
    assert {f"{r['exchange']}:{r['symbol']}" for r in st.instruments} == {f"x:{s}" for s in SYMBOLS}
    for r in st.instruments:
        assert r["last_end"] == end
        ((n,),) = store.query("SELECT sum(trades) FROM bars FINAL WHERE tf = '1m' AND exchange = 'x' "
                              f"AND symbol = '{r['symbol']}' AND start >= fromUnixTimestamp64Milli({end - 5 * MIN})")[1]
        assert r["trades_per_s"] == pytest.approx(n / 300)  # its last five bar-minutes
    onnx = {m["model"]: m for m in st.models}["onnx_ensemble"]
    assert onnx["version"] == "20991231T000000-abc" and onnx["n"] == 240
    assert onnx["accuracy"] == pytest.approx(0.75) and onnx["ece"] == pytest.approx(0.05)  # |0.75 - 0.7|
    prior = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # the labels: 3 up, 1 down in 4
    assert onnx["prior_log_loss"] == pytest.approx(prior)
    assert [r["variant_id"] for r in st.leaders] == ["v1", "v2"]  # by DSR, production not a "leader"
    assert st.pipeline["watermark_ms"] == end and st.stalls == []
    assert st.ingest["feeds"]["binanceusdm:BTC/USDT:USDT"]["trades"] == 1


def test_status_prints_one_screen(populated):
    store, data, end = populated
    code, out = status(store, data)
    assert code == 0, out
    assert "tapeflow status" in out and "making progress" in out
    wm = datetime.fromtimestamp(end / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f"watermark          {wm} (lag " in out
    for s in SYMBOLS:
        assert f"x:{s}" in out
    assert re.search(r"binanceusdm:BTC/USDT:USDT\s+│\s+\d\.\d s ago\s+│\s+1 ", out), out  # the heartbeat's age
    assert re.search(r"bybit:ETH/USDT:USDT\s+│\s+none yet", out), out
    assert "HALTED (kill switch)" in out and "8,900.00" in out and "11.00%" in out
    assert "kill switch: HALTED strategy:ensemble/base (last kill_switch at" in out
    assert "onnx_ensemble" in out and "20991231T000000-abc" in out and "0.750" in out
    assert "ensemble/v1" in out and "0.910" in out


def test_every_section_says_none_on_an_empty_store(store, tmp_path):
    code, out = status(store, tmp_path)
    assert code == 0, out
    assert "none (no row yet" in out and "ingest heartbeat: none" in out
    assert "kill switch: none (no equity marks)" in out and "none (optimizer off or no metrics yet)" in out
    assert out.count("│ none") >= 3  # feeds, strategies, models


def test_watch_refreshes_until_ctrl_c(populated, monkeypatch):
    store, data, _ = populated
    import cli.status as status_command

    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_command.time, "sleep", sleep)
    code, out = status(store, data, "--watch", "2")
    assert code == 0 and sleeps == [2.0, 2.0, 2.0]
    assert out.count("tapeflow status") == 3  # one screen per refresh (not a terminal: printed in turn)


def test_an_embedded_store_held_by_a_running_process_is_refused_clearly(populated):
    store, data, _ = populated  # this test process holds the embedded store open
    res = subprocess.run([sys.executable, "-m", "cli.main", "status", "--dsn", store.dsn,
                          "--database", store.database], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "is in use by another process" in lines[0] and "--dsn http://" in lines[0], \
        res.stderr
    assert "Traceback" not in res.stderr
