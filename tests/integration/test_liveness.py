"""Liveness, not reachability (issue 14): `tapeflow health` fails when progress stops while the
process lives, and passes while it is made.

1. The production path, in this process: a pipeline tails a Kafka topic (tansu) into the embedded
   store while a producer feeds it trades; `tapeflow health` (the CLI, in-process: the embedded
   store is single-process) exits 0 while trades flow, and exits 1 within the bound after the
   producer stops, the pipeline still running, with one line saying what stalled and since when.
2. The ingest, as compose runs it (a subprocess, scripted venues that go quiet after their
   tape): `tapeflow health --ingest` exits 0 while trades arrive, then names the quiet venue.
3. The liveness rules themselves on hand-made pipeline_health rows: rows that keep coming while
   the watermark stands still are a stall; a run that never closed a minute is one; an empty or
   old-schema store is reported, not crashed on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.testing import run_main
from click.testing import CliRunner

from cli.main import main
from dataflows.heartbeat import IngestProgress, read_ingest
from dataflows.kafka_topic import TradeProducer, ensure_topic, tape_messages
from dataflows.kafka_source import KafkaBatchSource
from dataflows.pipeline import build_flow
from cli.health import pipeline_stalls
from operators.records import FrameBatch
from sinks.clickhouse import ClickHouseSink, SinkStats
from tests.helpers import settings

ROOT = Path(__file__).resolve().parents[2]
MIN = 60_000
BOUND_S = 3.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def health(*args: str):
    res = CliRunner().invoke(main, ["health", *args], catch_exceptions=False)
    return res.exit_code, (res.output or "").strip()


# ============================================================ 1. a pipeline tailing Kafka

class _Stoppable(FixedPartitionedSource):
    """The real Kafka source; ``stop`` ends it (the test's way to finish a tailing run)."""

    def __init__(self, inner: KafkaBatchSource, stop: threading.Event):
        self.inner, self.stop = inner, stop

    def list_parts(self):
        return self.inner.list_parts()

    def build_part(self, step_id, for_part, resume_state):
        return _StopPart(self.inner.build_part(step_id, for_part, resume_state), self.stop)


class _StopPart(StatefulSourcePartition):
    def __init__(self, inner, stop):
        self.inner, self.stop = inner, stop

    def next_batch(self):
        if self.stop.is_set():
            raise StopIteration
        return self.inner.next_batch()

    def next_awake(self):
        return self.inner.next_awake()

    def snapshot(self):
        return self.inner.snapshot()

    def close(self):
        self.inner.close()


def _minute_of_trades(t0: int, minute: int) -> pl.DataFrame:
    """Two symbols, 10 trades each inside one event minute, the last at its final millisecond (so
    the minute closes as soon as the next one starts, or lateness after the last trade)."""
    rows = []
    for s in ("BTC/USDT:USDT", "ETH/USDT:USDT"):
        for k in range(10):
            ts = t0 + minute * MIN + (k * 6_000 if k < 9 else MIN - 1)
            rows.append({"exchange": "x", "symbol": s, "id": f"{minute}-{k}", "ts": ts, "price": 100.0 + k,
                         "amount": 1.0, "side": "buy" if k % 2 else "sell"})
    return pl.DataFrame(rows)


def test_a_pipeline_whose_feed_stops_is_reported_stalled_within_the_bound(kafka_broker, store, tmp_path):
    topic = f"live-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker, topic, 1)
    cfg = settings(tmp_path)
    sink = ClickHouseSink(store.dsn, store.database, SinkStats(), flush_rows=100_000, flush_ms=200,
                          health_every_s=0.3)
    stop = threading.Event()
    src = _Stoppable(KafkaBatchSource(kafka_broker, topic, tail=True, idle_ms=20), stop)
    flow = build_flow(cfg, src, sink, pace=1.0, ensemble=None)  # live: the wall clock closes windows
    errors: list = []

    def pipeline():
        try:
            run_main(flow, epoch_interval=timedelta(seconds=0.5))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    worker = threading.Thread(target=pipeline, daemon=True)
    worker.start()
    args = ["--brokers", kafka_broker, "--dsn", store.dsn, "--database", store.database,
            "--max-stall-s", str(BOUND_S)]
    producer = TradeProducer(kafka_broker, topic)
    t0 = (wall_ms() - 60 * MIN) // MIN * MIN  # an hour of recent event time, one minute per 0.4 s
    try:
        healthy = []
        for minute in range(18):
            producer.send_many(tape_messages(_minute_of_trades(t0, minute)))
            producer.flush(10)
            time.sleep(0.4)
            if minute >= 8:  # the pipeline has been making progress for a while
                healthy.append(health(*args))
        assert not errors, errors
        assert healthy and all(code == 0 for code, _ in healthy[-5:]), healthy  # progress: exit 0
        assert healthy[-1][1].endswith("ok")

        stopped = time.time()  # the feed stops; the pipeline keeps running (tailing, idle)
        code, out = 0, ""
        while code == 0 and time.time() - stopped < BOUND_S + 20:
            time.sleep(0.5)
            code, out = health(*args)
        waited = time.time() - stopped
        assert worker.is_alive() and not errors  # stalled, not dead
        assert code == 1, out
        assert "pipeline stalled:" in out and "since 20" in out and f"bound {BOUND_S:g} s" in out, out
        assert len(out.splitlines()) == 1, out
        # within the bound (plus the last minute closing lateness after its last trade, and polling)
        assert waited <= BOUND_S + 2 + 5, waited
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    ((n,),) = store.query("SELECT count() FROM pipeline_health WHERE watermark IS NOT NULL")[1]
    assert n > 10  # the rows health read carry the watermark


def test_a_pipeline_that_has_ended_is_not_running_however_fresh_its_last_row(tmp_path):
    """The embedded store: a run that ended a moment ago left a pipeline_health row younger than the
    bound, and health said "ok" and status "making progress" for two minutes after it. A running
    pipeline always has its store open (the engine's lock), so a store nobody has open is one no
    pipeline writes to: health exits 1 saying so, and status shows it."""
    data = tmp_path / "data"
    run = subprocess.run([sys.executable, "-m", "cli.main", "run", "--quiet", "--data-dir", str(data), "--hours", "0.2",
                          "--symbols", "BTC/USDT:USDT", "--train-split", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    code, out = health("--no-kafka", "--data-dir", str(data))  # default bound 120 s: the row is seconds old
    assert code == 1, out
    assert len(out.splitlines()) == 1 and "pipeline not running: nothing has the embedded store open" in out, out
    assert re.search(r"newest pipeline_health row is from 20\S+ \S+ UTC \(\d+(\.\d+)? s ago\)", out), out
    res = CliRunner().invoke(main, ["status", "--data-dir", str(data)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "pipeline not running" in res.output and "making progress" not in res.output, res.output


# ============================================================ 2. the ingest heartbeat (subprocess)

def test_an_ingest_whose_venues_go_quiet_is_reported_stalled_while_it_runs(kafka_broker, tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "TAPEFLOW_DATA_DIR": str(data), "TAPEFLOW_KAFKA_BROKERS": kafka_broker,
           "TAPEFLOW_KAFKA_TOPIC": f"ingest-{uuid.uuid4().hex[:8]}", "TAPEFLOW_KAFKA_PARTITIONS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ingest", "--feeds",
                             "binanceusdm:BTC/USDT:USDT;bybit:ETH/USDT:USDT", "--duration", "60",
                             "--exchange-factory", "tests.integration.fake_venues:make"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    args = ["--no-kafka", "--no-clickhouse", "--ingest", "--data-dir", str(data), "--max-stall-s", str(BOUND_S)]
    try:
        deadline = time.time() + 60
        code, out = health(*args)
        while code != 0 and time.time() < deadline and proc.poll() is None:  # until trades have arrived
            time.sleep(0.1)
            code, out = health(*args)
        assert code == 0 and out.endswith("ok"), (out, proc.poll())
        beat = read_ingest(data / "heartbeat")
        assert set(beat["venues"]) == {"binanceusdm", "bybit"}
        assert set(beat["feeds"]) == {"binanceusdm:BTC/USDT:USDT", "bybit:ETH/USDT:USDT"}

        deadline = time.time() + BOUND_S + 30
        while code == 0 and time.time() < deadline:
            time.sleep(0.2)
            code, out = health(*args)
        failed_at = wall_ms()
        assert proc.poll() is None, "the ingest should still be running (quiet venues, not a dead process)"
        assert code == 1 and "ingest stalled:" in out and "no trade received since" in out, out
        beat = read_ingest(data / "heartbeat")
        quiet = [v for v, s in beat["venues"].items() if f"ingest stalled: {v} " in out]
        assert quiet, out
        for v in quiet:  # reported once the bound had passed, not before
            assert failed_at - beat["venues"][v]["last_recv_ms"] >= BOUND_S * 1000 - 50
        # the scripted tapes were delivered in full (minus what the venue dropped and could not refill)
        assert beat["feeds"]["binanceusdm:BTC/USDT:USDT"]["trades"] == 300
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ============================================================ 3. the rules on hand-made rows

HEALTH = ["ts", "process", "worker", "trades_in", "trades_per_s", "bars", "late_trades", "dead_letters",
          "duplicates", "decisions", "rss_mb", "watermark", "trades_total", "started"]


def _rows(store, rows):
    store.client.insert("pipeline_health", [[r.get(c, 0) for c in HEALTH] for r in rows], column_names=HEALTH)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def test_rows_that_keep_coming_with_a_standing_watermark_are_a_stall(store):
    now = wall_ms()
    started = now - 600_000
    wm = now - 400_000 - (now % MIN)
    _rows(store, [{"ts": _at(now - 300_000 + 10_000 * k), "started": _at(started),
                   "watermark": _at(wm if k >= 3 else wm - MIN * (3 - k)), "dead_letters": 5}
                  for k in range(30)])  # every 10 s until now; the watermark last moved 270 s ago
    (msg,) = pipeline_stalls(store, now, 120)
    assert msg.startswith("pipeline stalled: watermark stuck at ") and "since" in msg and "bound 120 s" in msg
    assert datetime.fromtimestamp((now - 270_000) / 1000, timezone.utc).strftime("%H:%M:%S") in msg
    assert pipeline_stalls(store, now, 300) == []  # within a longer bound: fine


def test_a_run_that_never_closed_a_minute_and_an_older_run_are_told_apart(store):
    now = wall_ms()
    old, new = now - 3_600_000, now - 200_000
    _rows(store, [{"ts": _at(old + 60_000), "started": _at(old), "watermark": _at(old)}])  # a previous run
    _rows(store, [{"ts": _at(new + 10_000 * k), "started": _at(new), "watermark": None, "dead_letters": 1}
                  for k in range(20)])
    (msg,) = pipeline_stalls(store, now, 120)
    assert "no minute has closed since the pipeline started at" in msg, msg
    assert pipeline_stalls(store, now, 250) == []


def test_empty_and_silent_stores_are_reported(store, other_store):
    now = wall_ms()
    (msg,) = pipeline_stalls(store, now, 120)
    assert msg.startswith("pipeline: no pipeline_health row at all")
    _rows(other_store, [{"ts": _at(now - 500_000), "started": _at(now - 900_000), "watermark": _at(now - 600_000)}])
    (msg,) = pipeline_stalls(other_store, now, 120)
    assert msg.startswith("pipeline stalled: no pipeline_health row since") and "8.3 min ago" in msg, msg
    other_store.command("ALTER TABLE pipeline_health DROP COLUMN started")  # a store from before 008
    (msg,) = pipeline_stalls(other_store, now, 120)
    assert msg.startswith("pipeline: cannot read pipeline_health") and "008_liveness.sql" in msg


def test_ingest_progress_tracks_venues_feeds_and_events():
    p = IngestProgress({"binanceusdm": ["BTC/USDT:USDT", "ETH/USDT:USDT"], "bybit": ["BTC/USDT:USDT"]}, now_ms=1000)
    frame = pl.DataFrame({"exchange": ["binanceusdm"] * 3, "symbol": ["BTC/USDT:USDT", "BTC/USDT:USDT", "ETH/USDT:USDT"],
                          "ts": [500, 700, 650], "recv_ts": [900, 1500, 1400]})
    p.observe(FrameBatch("ccxt:binanceusdm", "binanceusdm", frame, 1600), now_ms=1600)

    class Ev:
        kind, reason = "reconnect", "socket closed"

    p.observe(FrameBatch("ccxt:bybit", "bybit", frame.clear(), 1700, [Ev()]), now_ms=1700)
    d = p.to_dict()
    assert d["trades_total"] == 3 and d["updated_ms"] == 1700 and d["started_ms"] == 1000
    assert d["feeds"]["binanceusdm:BTC/USDT:USDT"] == {"trades": 2, "last_trade_ts": 700, "last_recv_ms": 1500}
    assert d["feeds"]["bybit:BTC/USDT:USDT"] == {"trades": 0, "last_trade_ts": None, "last_recv_ms": None}
    assert d["venues"]["binanceusdm"]["last_recv_ms"] == 1500 and d["venues"]["binanceusdm"]["trades"] == 3
    assert d["venues"]["bybit"]["last_event"] == {"kind": "reconnect", "at_ms": 1700, "reason": "socket closed"}
    assert d["venues"]["bybit"]["last_recv_ms"] is None
    json.dumps(d)  # what the file holds
