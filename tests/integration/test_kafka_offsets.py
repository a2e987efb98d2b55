"""Kafka positions without a recovery directory (issue 11): the sink commits each epoch's source
positions to the store's consumer group once the epoch's rows are stored, a run resumes from them
(``--from committed``, the default), and a saved position past the end of the topic stops the run
with one line instead of hanging. On a real Kafka-protocol broker (tansu) and the embedded store."""

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest
from bytewax.testing import run_main
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_source import KafkaBatchSource, KafkaPositionError, default_group
from dataflows.kafka_topic import TradeProducer, ensure_topic
from dataflows.pipeline import build_flow
from sinks.clickhouse import ClickHouseSink, SinkStats
from tests.helpers import settings

PARTS = 3


def _topic(brokers) -> str:
    topic = f"offsets-{uuid.uuid4().hex[:8]}"
    ensure_topic(brokers, topic, PARTS)
    return topic


def _publish(brokers, topic, n, start=0, one_per_batch=False) -> None:
    """``n`` undecodable messages over every partition: each becomes a dead letter stored with its
    partition and offset, so what the store holds can be compared offset by offset."""
    prod = TradeProducer(brokers, topic)
    for i in range(start, start + n):
        prod.send(f"k{i % 7}", b"not json %d" % i)
        if one_per_batch:
            prod.flush()
    prod.flush()


def _committed(brokers, topic, group) -> dict:
    c = Consumer({"bootstrap.servers": brokers, "group.id": group})
    try:
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(PARTS)],
                                                                timeout=10)}
    finally:
        c.close()


def _high(brokers, topic) -> dict:
    """The end of every partition, read by consuming it (tansu's ListOffsets is off by a batch)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": "probe", "enable.partition.eof": True})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTS)])
    ends, deadline = {}, time.time() + 30
    while len(ends) < PARTS and time.time() < deadline:
        m = c.poll(1)
        if m is not None and m.error() is not None:
            ends[m.partition()] = c.position([TopicPartition(topic, m.partition())])[0].offset
    c.close()
    assert len(ends) == PARTS
    return ends


def _stored_offsets(store, topic) -> dict:
    _, rows = store.query(f"SELECT partition, offset FROM dead_letters FINAL WHERE source = '{topic}'")
    out: dict = {}
    for p, off in rows:
        out.setdefault(int(p), set()).add(int(off))
    return out


class FailAfter:
    """Insert hook: the store takes ``n`` inserts, then refuses every one (a permanent error)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, table, rows) -> None:
        self.n -= 1
        if self.n < 0:
            raise ValueError("store refuses (test)")


def _run(brokers, topic, store, group, tmp_path, hook=None) -> SinkStats:
    src = KafkaBatchSource(brokers, topic, tail=False, batch_size=50, start="committed", group_id=group)
    stats = SinkStats()
    sink = ClickHouseSink(store.dsn, store.database, stats, flush_rows=40, flush_ms=60_000, retry_s=0,
                          insert_hook=hook, committer=src.offset_committer())
    run_main(build_flow(settings(tmp_path, online_models=False), src, sink, ensemble=None),
             epoch_interval=timedelta(milliseconds=20))
    return stats


def test_committed_offsets_cover_only_stored_rows_and_the_next_run_resumes_there(kafka_broker, store, tmp_path):
    topic, group = _topic(kafka_broker), f"g-{uuid.uuid4().hex[:8]}"
    _publish(kafka_broker, topic, 3000)
    ends = _high(kafka_broker, topic)

    with pytest.raises(Exception):  # the store fails part way (flushes inside epochs too)
        _run(kafka_broker, topic, store, group, tmp_path / "a", hook=FailAfter(10))
    committed = _committed(kafka_broker, topic, group)
    stored = _stored_offsets(store, topic)
    assert any(off > 0 for off in committed.values()), "no epoch completed before the failure"
    assert sum(max(off, 0) for off in committed.values()) < sum(ends.values())  # it did fail part way
    for p, off in committed.items():
        assert set(range(max(off, 0))) <= stored.get(p, set()), f"partition {p}: committed past its stored rows"

    stats = _run(kafka_broker, topic, store, group, tmp_path / "b")  # no recovery: from the committed offsets
    assert stats.rows["dead_letters"] == sum(ends[p] - max(committed[p], 0) for p in range(PARTS))
    assert _committed(kafka_broker, topic, group) == ends
    assert _stored_offsets(store, topic) == {p: set(range(ends[p])) for p in range(PARTS) if ends[p]}


def _part(brokers, topic, *, tail, start="earliest", group=None, resume=None):
    src = KafkaBatchSource(brokers, topic, tail=tail, batch_size=500, start=start, group_id=group)
    return src.build_part("in", f"0-{topic}", resume)


def _first_offsets(part, timeout_s=10) -> list:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            batches = part.next_batch()
        except StopIteration:
            return []
        if batches:
            return batches[0].offsets
        time.sleep(0.01)
    raise AssertionError("nothing read and no end of partition")


def test_start_positions_and_a_position_past_the_end_stops_at_once(kafka_broker):
    topic, group = _topic(kafka_broker), f"g-{uuid.uuid4().hex[:8]}"
    _publish(kafka_broker, topic, 300)
    # k0..k6 once more, one message per batch: tansu answers "latest" with the last batch's first
    # offset + 1 (Kafka: the partition's end), so the last batch must hold one message
    _publish(kafka_broker, topic, 7, start=300, one_per_batch=True)
    end = _high(kafka_broker, topic)[0]
    assert end > 20
    assert _first_offsets(_part(kafka_broker, topic, tail=False, start="committed", group=group))[0] == 0  # new group
    c = Consumer({"bootstrap.servers": kafka_broker, "group.id": group})
    c.commit(offsets=[TopicPartition(topic, 0, 7)], asynchronous=False)
    c.close()
    assert _first_offsets(_part(kafka_broker, topic, tail=False, start="committed", group=group))[0] == 7
    assert _first_offsets(_part(kafka_broker, topic, tail=False, start="earliest", group=group))[0] == 0
    assert _first_offsets(_part(kafka_broker, topic, tail=False, start="latest", group=group)) == []
    assert _first_offsets(_part(kafka_broker, topic, tail=False, resume=end - 3))[0] == end - 3  # the snapshot wins

    for tail in (False, True):  # a recovery snapshot of a topic that held more
        part = _part(kafka_broker, topic, tail=tail, resume=end + 1000)
        started = time.time()
        with pytest.raises(KafkaPositionError) as err:
            _first_offsets(part, timeout_s=30)
        assert time.time() - started < 15
        msg = str(err.value)
        assert "\n" not in msg and f"offset {end + 1000}" in msg and "past the end" in msg and "--recovery-dir" in msg


def test_cli_resumes_from_committed_offsets_and_an_eof_run_past_the_end_fails_in_one_line(kafka_broker, tmp_path):
    topic = _topic(kafka_broker)
    _publish(kafka_broker, topic, 400)
    base = ["run", "--source", "kafka", "--brokers", kafka_broker, "--topic", topic, "--eof", "--quiet",
            "--data-dir", str(tmp_path)]

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "cli.main", *base, *extra], capture_output=True, text=True,
                              timeout=120)

    first = run("--summary-json", str(tmp_path / "1.json"))
    assert first.returncode == 0, first.stderr
    _publish(kafka_broker, topic, 250, start=400)
    second = run("--summary-json", str(tmp_path / "2.json"))
    assert second.returncode == 0, second.stderr
    dead = [json.loads((tmp_path / f"{i}.json").read_text())["sink"]["dead_letters"] for i in (1, 2)]
    assert dead == [400, 250]  # the second run read only what came after the first

    group = default_group(f"chdb://{os.path.realpath(tmp_path)}/clickhouse", "tapeflow")
    assert _committed(kafka_broker, topic, group) == _high(kafka_broker, topic)
    c = Consumer({"bootstrap.servers": kafka_broker, "group.id": group})
    c.commit(offsets=[TopicPartition(topic, 1, 10**6)], asynchronous=False)  # a broker that lost data
    c.close()
    started = time.time()
    res = run()
    assert res.returncode == 1 and time.time() - started < 60
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "past the end" in lines[0] and "--from earliest" in lines[0], res.stderr
