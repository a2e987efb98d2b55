"""Kafka -> pipeline -> embedded ClickHouse on loopback, with a real Kafka-protocol broker (tansu).

The pipeline runs as `tapeflow run --source kafka` in subprocesses (two bytewax processes), exactly
as a user or the compose file starts it; rows are read back with `tapeflow sql`.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import msgspec
import polars as pl
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_topic import TradeProducer, ensure_topic, tape_messages
from tests.helpers import synthetic_tape

BARS = ("SELECT symbol, tf, start, trades, open, high, low, close, volume, notional, delta, min_delta, max_delta, "
        "pro_orders, amateur_orders, s_mood, poc, vah, val FROM bars FINAL ORDER BY symbol, tf, start")
SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT", "XRP/USDT:USDT", "DOGE/USDT:USDT", "ADA/USDT:USDT"]
BAD = [b"{not json", msgspec.json.encode({"exchange": "x", "symbol": "BTC/USDT:USDT", "id": "b1"}),
       msgspec.json.encode({"exchange": "x", "symbol": "ETH/USDT:USDT", "id": "b2", "ts": 1704067200000,
                            "price": -1.0, "amount": 1.0, "side": "buy"}), b""]


def cli(*args, check=True, **kw):
    res = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                         timeout=300, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"tapeflow {args} failed:\n{res.stdout}\n{res.stderr}")
    return res


def sql(data_dir, query):
    return json.loads(cli("sql", "--data-dir", str(data_dir), "--format", "json", query).stdout)


def publish(brokers, topic, tape, bad_every=None):
    """Publish the tape (and malformed messages every ``bad_every`` trades); returns the bad payloads."""
    msgs = tape_messages(tape)
    prod = TradeProducer(brokers, topic)
    bad = []
    for i, (k, m) in enumerate(msgs):
        if bad_every and i % bad_every == 0 and len(bad) < len(BAD):
            bad.append(BAD[len(bad)])
            prod.send(k, bad[-1])
        prod.send(k, m)
    prod.flush()
    return bad


def topic_contents(brokers, topic, partitions):
    """(partition, offset, payload) of every message, read back independently."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": "t", "enable.partition.eof": True,
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out, done = [], set()
    while len(done) < partitions:
        m = c.poll(5)
        assert m is not None, "timed out reading the topic back"
        if m.error():
            done.add(m.partition())
            continue
        out.append((m.partition(), m.offset(), m.value() or b""))
    c.close()
    return out


def _ties_in_id_order(tape: pl.DataFrame) -> pl.DataFrame:
    """Jittered arrival, but trades of one instrument with the same ts arrive in id order (as an
    exchange sends them): a file replay orders ties by id, Kafka keeps arrival order, so only
    then can their bars be compared. Each (symbol, ts) group keeps its arrival slots."""
    pos = tape.with_row_index("_pos")
    slots = pos.sort("symbol", "ts", "_pos").select("_pos")
    rows = pos.sort("symbol", "ts", pl.col("id").cast(pl.Int64)).drop("_pos")
    return pl.concat([slots, rows], how="horizontal").sort("_pos").drop("_pos").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))


def test_kafka_two_processes_count_every_trade_and_match_the_file_replay(kafka_broker, tmp_path):
    topic = f"trades-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker, topic, 3)
    tape = _ties_in_id_order(synthetic_tape(SYMBOLS, minutes=90, rate=1.0, jitter_ms=500))
    bad = publish(kafka_broker, topic, tape, bad_every=997)
    assert len(bad) == len(BAD)

    cli("run", "--source", "kafka", "--brokers", kafka_broker, "--topic", topic, "--eof", "--processes", "2",
        "--data-dir", str(tmp_path / "kafka"), "--quiet")
    counted = sql(tmp_path / "kafka", "SELECT sum(trades) AS n FROM bars FINAL WHERE tf = '1m'")[0]["n"]
    assert counted == tape.height  # N - bad trades counted into bars

    # every bad message is a dead letter with its topic, partition and offset
    contents = topic_contents(kafka_broker, topic, 3)
    assert len({p for p, _, _ in contents}) == 3
    bad_at = sorted((str(p), o) for p, o, v in contents if v in bad)
    dead = sql(tmp_path / "kafka", "SELECT source, partition, offset, reason FROM dead_letters FINAL "
                                   "ORDER BY partition, offset")
    assert sorted((d["partition"], d["offset"]) for d in dead) == bad_at
    assert {d["source"] for d in dead} == {topic}
    assert sorted(d["reason"] for d in dead) == ["bad_json", "bad_json", "missing_field", "non_positive"]

    # the same trades replayed from a file give the same bars
    path = tmp_path / "tape.csv"
    tape.drop("offset").write_csv(path)
    cli("run", "--source", "replay", "--file", str(path), "--data-dir", str(tmp_path / "file"), "--quiet")
    from_kafka, from_file = sql(tmp_path / "kafka", BARS), sql(tmp_path / "file", BARS)
    assert len(from_kafka) > 6 * 90 and from_kafka == from_file


def _snapshotted_offsets(recovery_dir):
    """Source positions in the bytewax recovery store (sum over partitions)."""
    total = 0
    for part in recovery_dir.glob("part-*.sqlite3"):
        with sqlite3.connect(part) as db:
            try:
                rows = db.execute("SELECT state_key, ser_change FROM snaps WHERE step_id LIKE '%trades_in%'").fetchall()
            except sqlite3.OperationalError:
                continue
        import pickle

        latest = {}
        for key, ser in rows:
            if ser is not None:
                latest[key] = max(latest.get(key, 0), pickle.loads(ser))
        total += sum(latest.values())
    return total


def test_a_killed_pipeline_resumes_from_its_recovery_directory_with_nothing_lost_or_doubled(kafka_broker, tmp_path):
    topic = f"trades-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker, topic, 3)
    tape = synthetic_tape(SYMBOLS[:4], minutes=120, rate=1.0, jitter_ms=500)
    first, second = tape.slice(0, tape.height // 2), tape.slice(tape.height // 2)
    base = ["run", "--source", "kafka", "--brokers", kafka_broker, "--topic", topic, "--clock", "event", "--quiet"]

    publish(kafka_broker, topic, first)
    rec = tmp_path / "recovery"
    env = {**os.environ, "TAPEFLOW_EPOCH_INTERVAL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *base, "--recovery-dir", str(rec),
                             "--data-dir", str(tmp_path / "crashed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _snapshotted_offsets(rec) < first.height // 2:  # well into the first half
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the pipeline made no progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # a crash, mid-topic: no clean shutdown
    proc.wait()

    publish(kafka_broker, topic, second)
    cli(*base, "--eof", "--recovery-dir", str(rec), "--data-dir", str(tmp_path / "crashed"), env=env)
    cli(*base, "--eof", "--data-dir", str(tmp_path / "clean"))

    crashed, clean = sql(tmp_path / "crashed", BARS), sql(tmp_path / "clean", BARS)
    assert len(clean) > 4 * 120 and crashed == clean
    n = sql(tmp_path / "crashed", "SELECT sum(trades) AS n FROM bars FINAL WHERE tf = '1m'")[0]["n"]
    assert n == tape.height
