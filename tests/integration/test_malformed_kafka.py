"""No message can stop the pipeline: a Kafka topic holding valid trades interleaved with every kind of
malformed message seen in real use runs to the end, each bad message is one dead letter with its
offset and reason, every valid trade is in a bar, and a run killed at any point resumes past them.

The broker is a real Kafka-protocol broker on loopback (tansu); the pipeline runs as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import msgspec
import numpy as np

from dataflows.kafka_topic import TradeProducer, ensure_topic, tape_messages
from tests.helpers import synthetic_tape
from tests.integration.test_kafka_pipeline import _snapshotted_offsets, cli, sql, topic_contents

SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT", "XRP/USDT:USDT"]
T0 = 1_704_067_200_000
BARS = ("SELECT symbol, tf, start, trades, open, high, low, close, volume, delta, poc, vah, val "
        "FROM bars FINAL ORDER BY symbol, tf, start")


def _trade(sym: str, n: int, **kw) -> dict:
    return {"exchange": "x", "symbol": sym, "id": f"bad-{n}", "ts": T0 + 60_000, "price": 100.0, "amount": 1.0,
            "side": "buy", **kw}


def malformed_corpus(symbol: str) -> list[tuple[str, bytes, str]]:
    """(key, payload, expected dead-letter reason) for every kind of bad message in the issue, all
    sent under ``symbol``'s key (so they travel in that instrument's partition, among its trades)."""
    enc = msgspec.json.encode
    key = f"x:{symbol}"
    whole = enc(_trade(symbol, 1))
    cut = whole.index(b',"id"')
    other = "ETH/USDT:USDT" if symbol != "ETH/USDT:USDT" else "BTC/USDT:USDT"
    return [
        (key, b"[" * 5_000, "bad_json"),  # deep nesting: was a RecursionError and a crash loop
        (key, b'{"a":' * 3_000, "bad_json"),
        (key, b"\x00\xff\xfe binary \x80", "bad_json"),
        (key, enc(_trade(symbol, 2)) + b"," + enc(_trade(symbol, 3)), "bad_json"),  # two objects joined
        (key, whole[:cut], "bad_json"),  # one object split over two messages
        (key, whole[cut + 1:], "bad_json"),
        (key, enc(_trade(symbol, 4, symbol="S" * 100_000)), "too_large"),  # 100,000-character symbol
        (key, b'{"pad": "' + b"x" * 2_000_000 + b'"}', "too_large"),  # a 2 MB message
        (key, enc(_trade(symbol, 5, id="i" * 500)), "field_too_long"),
        (key, enc(_trade(other, 6)), "key_mismatch"),  # another instrument's trade under this key
        (key, b"", "bad_json"),
        (key, b"{not json", "bad_json"),
        (key, enc({k: v for k, v in _trade(symbol, 7).items() if k != "price"}), "missing_field"),
        (key, enc(_trade(symbol, 8, price="abc")), "wrong_type"),
        (key, json.dumps(_trade(symbol, 9, price=float("nan"))).encode(), "non_finite"),
        (key, enc(_trade(symbol, 10, amount=-1.0)), "non_positive"),
        (key, enc(_trade(symbol, 11, side="long")), "unknown_side"),
        (key, enc(_trade(symbol, 12, ts=T0 // 1000)), "ts_out_of_range"),
        (key, enc(_trade(symbol, 13, ts=10**30)), "wrong_type"),
    ]


def publish_with_corpus(brokers: str, topic: str, tape, seed: int = 1) -> list[tuple[bytes, str]]:
    """The tape in order, with every corpus message inserted at a random place among the trades of
    the corpus's instrument. Returns (payload, reason) of what was sent."""
    rng = np.random.default_rng(seed)
    msgs = tape_messages(tape)
    corpus = [c for s in SYMBOLS[:2] for c in malformed_corpus(s)]
    at = sorted(rng.choice(np.arange(10, len(msgs) - 10), len(corpus), replace=False).tolist())
    prod = TradeProducer(brokers, topic, extra={"message.max.bytes": 8_000_000})
    sent, j = [], 0
    for i, (k, m) in enumerate(msgs):
        while j < len(at) and at[j] == i:
            key, payload, reason = corpus[j]
            prod.send(key, payload)
            sent.append((payload, reason))
            j += 1
        prod.send(k, m)
    prod.flush()
    return sent


def test_every_malformed_message_is_one_dead_letter_and_every_valid_trade_is_in_a_bar(kafka_broker, tmp_path):
    topic = f"bad-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker, topic, 2)
    tape = synthetic_tape(SYMBOLS, minutes=30, rate=1.0)
    sent = publish_with_corpus(kafka_broker, topic, tape)
    assert len(sent) == 2 * len(malformed_corpus(SYMBOLS[0]))

    res = cli("run", "--source", "kafka", "--brokers", kafka_broker, "--topic", topic, "--eof",
              "--data-dir", str(tmp_path), "--quiet")
    assert "Traceback" not in res.stderr
    by_payload = {p: r for p, r in sent}
    contents = topic_contents(kafka_broker, topic, 2)
    expected = sorted((str(p), o, by_payload[v]) for p, o, v in contents if v in by_payload)
    dead = sql(tmp_path, "SELECT partition, offset, reason FROM dead_letters FINAL ORDER BY partition, offset")
    assert [(d["partition"], d["offset"], d["reason"]) for d in dead] == expected
    n = sql(tmp_path, "SELECT sum(trades) AS n FROM bars FINAL WHERE tf = '1m'")[0]["n"]
    assert n == tape.height
    assert sql(tmp_path, "SELECT count() AS n FROM late_trades")[0]["n"] == 0


def test_a_run_killed_anywhere_resumes_past_every_malformed_message(kafka_broker, tmp_path):
    topic = f"bad-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker, topic, 2)
    tape = synthetic_tape(SYMBOLS, minutes=60, rate=1.0)
    sent = publish_with_corpus(kafka_broker, topic, tape, seed=2)
    base = ["run", "--source", "kafka", "--brokers", kafka_broker, "--topic", topic, "--eof", "--quiet",
            "--batch-size", "500"]
    env = {**os.environ, "TAPEFLOW_EPOCH_INTERVAL_S": "0.2", "TAPEFLOW_KAFKA_BATCH_SIZE": "500"}
    rec, crashed = tmp_path / "recovery", tmp_path / "crashed"
    total = tape.height + len(sent)
    kills = 0
    for fraction in (0.2, 0.5, 0.8):  # kill at three moments, resuming each time
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", *base, "--recovery-dir", str(rec),
                                 "--data-dir", str(crashed)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while _snapshotted_offsets(rec) < fraction * total and proc.poll() is None:
            assert time.time() < deadline, "the pipeline made no progress"
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the runs ended before they could be killed: make the tape longer"
    cli(*base, "--recovery-dir", str(rec), "--data-dir", str(crashed), env=env)
    cli(*base, "--data-dir", str(tmp_path / "clean"), env=env)

    assert sql(crashed, BARS) == sql(tmp_path / "clean", BARS)
    n = sql(crashed, "SELECT sum(trades) AS n FROM bars FINAL WHERE tf = '1m'")[0]["n"]
    assert n == tape.height
    reasons = sorted(d["reason"] for d in sql(crashed, "SELECT reason FROM dead_letters FINAL"))
    assert reasons == sorted(r for _, r in sent)
