"""The partitions one process reads stay level in event time (``dataflows.kafka_source``): on a
backlog, a partition of quieter instruments used to hand over ``batch_size`` messages a poll like
a busy one, so it ran hours ahead and the portfolio's Sequencer held every bar in between (memory
grew with the backlog: ``bench/kafka_backlog_memory.py``). On a real Kafka-protocol broker (tansu).

The partitions are polled in rounds, one poll each, as a bytewax worker polls them. What every test
also checks: each partition hands over every message exactly once, in offset order, and its
snapshot is always the next offset it has not handed over (held messages are read again after a
restart, never skipped)."""

import time
import uuid
from datetime import timedelta

import msgspec
from bytewax.testing import run_main
from confluent_kafka import Producer

from dataflows import pipeline
from dataflows.kafka_source import MAX_HOLD_S, MAX_SKEW_MS, KafkaBatchSource
from dataflows.kafka_topic import ensure_topic
from operators.portfolio import Sequencer
from sinks.clickhouse import SinkStats
from sinks.null import NullSink
from tests.helpers import settings

T0 = 1_704_067_200_000  # 2024-01-01
MIN = 60_000
BATCH = 500


def _trade(ts: int, i: int, symbol: str) -> bytes:
    return msgspec.json.encode({"exchange": "x", "symbol": symbol, "id": str(i), "ts": ts, "price": 100.0,
                                "amount": 1.0, "side": "buy"})


def _topic(brokers, parts: dict[int, list[int]]) -> str:
    """A topic whose partition p holds trades at the event times ``parts[p]`` (ms), in that order."""
    topic = f"level-{uuid.uuid4().hex[:8]}"
    ensure_topic(brokers, topic, len(parts))
    prod = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    for p, times in parts.items():
        for i, ts in enumerate(times):
            prod.produce(topic, _trade(ts, i, f"S{p}/USDT"), partition=p)
            if i % 5000 == 0:
                prod.poll(0)
    assert prod.flush(30) == 0
    return topic


def _every(minutes: int, per_minute: float, start: int = T0) -> list[int]:
    step = int(MIN / per_minute)
    return list(range(start, start + minutes * MIN, step))


class Reader:
    """The partitions of one process, polled round by round; records what each hands over."""

    def __init__(self, brokers, topic, parts, **kw):
        src = KafkaBatchSource(brokers, topic, tail=kw.pop("tail", False), batch_size=BATCH, start="earliest", **kw)
        self.source = src
        self.parts = {p: src.build_part("in", f"{p}-{topic}", None) for p in parts}
        self.offsets = {p: [] for p in parts}
        self.last_ts = {p: None for p in parts}
        self.batches = {p: [] for p in parts}
        self.done: set = set()
        self.rounds = self.last_handed = 0  # rounds polled; the round that last handed something over
        time.sleep(1.5)  # librdkafka prefetches every partition: the first round finds data in each

    def round(self) -> None:
        self.rounds += 1
        for p, part in self.parts.items():
            if p in self.done:
                continue
            before = part.snapshot()
            try:
                got = part.next_batch()
            except StopIteration:
                self.done.add(p)
                continue
            for b in got:
                expect = before if before >= 0 else 0  # before the first batch: OFFSET_BEGINNING
                assert b.offsets[0] == expect, f"partition {p}: skipped or repeated from offset {before}"
                assert b.offsets == list(range(b.offsets[0], b.offsets[0] + len(b.offsets)))
                self.offsets[p] += b.offsets
                self.batches[p].append(len(b.offsets))
                self.last_handed = self.rounds
                self.last_ts[p] = msgspec.json.decode(b.payloads[-1])["ts"]
            assert part.snapshot() == (self.offsets[p][-1] + 1 if self.offsets[p] else before)

    def run(self, max_rounds=2000, each_round=None) -> None:
        """Until every partition ends (its end of partition can come a while after its last message)."""
        for _ in range(max_rounds):
            if len(self.done) == len(self.parts):
                return
            self.round()
            if each_round:
                each_round(self)
            time.sleep(0.002)
        counts = {p: len(o) for p, o in self.offsets.items()}
        raise AssertionError(f"not done after {max_rounds} rounds; handed over per partition: {counts}")

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


def _skews(brokers, topic, **kw) -> tuple[list[int], Reader]:
    r = Reader(brokers, topic, (0, 1), **kw)
    skews: list[int] = []

    def watch(rd):
        if all(rd.last_ts[p] is not None for p in (0, 1)) and not rd.done:
            skews.append(abs(rd.last_ts[0] - rd.last_ts[1]))

    try:
        r.run(each_round=watch)
    finally:
        r.close()
    return skews, r


def test_a_quiet_partition_waits_for_a_busy_one_and_hands_over_everything(kafka_broker):
    # partition 0: 10 trades a minute (a batch of 500 is 50 minutes); partition 1: 1 a minute (500 minutes)
    parts = {0: _every(1200, 10), 1: _every(1200, 1)}
    topic = _topic(kafka_broker, parts)

    skews, r = _skews(kafka_broker, topic)
    for p, times in parts.items():  # everything, once, in offset order
        assert r.offsets[p] == list(range(len(times))), f"partition {p}"
    # level: never further apart than the bound plus the busy partition's batch (50 minutes)
    assert skews and max(skews) <= MAX_SKEW_MS + 50 * MIN, f"{max(skews) / MIN:.0f} minutes apart"
    assert max(r.batches[1]) < BATCH, "the quiet partition should have been cut"

    # the control: the same tape without the bound drifts hours apart (what the bound prevents)
    loose, _ = _skews(kafka_broker, topic, max_skew_ms=10**12)
    assert max(loose) > 5 * 60 * MIN, f"control only {max(loose) / MIN:.0f} minutes apart"


def test_a_partition_alone_in_its_process_is_never_cut(kafka_broker):
    topic = _topic(kafka_broker, {0: _every(1200, 1)})  # a batch of 500 spans 500 minutes
    r = Reader(kafka_broker, topic, (0,))
    try:
        r.run()
    finally:
        r.close()
    assert r.offsets[0] == list(range(1200))
    assert max(r.batches[0]) == BATCH


def test_one_odd_timestamp_or_junk_does_not_stall_the_partitions(kafka_broker):
    """A trade stamped 5 hours ahead and junk in the middle of partition 1, junk and a trade of 2009
    in partition 0: nothing waits on them. ``max_hold_s`` is set out of reach so that a stall would
    show as a run that does not end (not as the liveness fallback)."""
    busy, quiet = _every(600, 10), _every(600, 1)
    quiet[300] += 5 * 60 * MIN
    topic = f"level-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker, topic, 2)
    prod = Producer({"bootstrap.servers": kafka_broker})
    for i, ts in enumerate(busy):
        prod.produce(topic, b"not json" if i == 1000 else _trade(1_230_000_000_000 if i == 2000 else ts, i, "A"),
                     partition=0)
    for i, ts in enumerate(quiet):
        prod.produce(topic, b"[1, 2" if i == 450 else _trade(ts, i, "B"), partition=1)
    assert prod.flush(30) == 0

    r = Reader(kafka_broker, topic, (0, 1), max_hold_s=3600.0)
    try:
        r.run()
    finally:
        r.close()
    assert r.offsets[0] == list(range(len(busy))) and r.offsets[1] == list(range(len(quiet)))
    # 6,000 messages of partition 0 in batches of 500 take 12 rounds; partition 1 keeps pace
    assert r.last_handed <= 14, f"the last message was handed over in round {r.last_handed}"


def test_a_partition_held_back_too_long_hands_over_what_it_holds(kafka_broker):
    """Liveness over memory: the slowest partition of the process stands still (here a phantom one
    registered at T0, as a partition on a worker thread that is stuck would); the other waits
    ``max_hold_s``, then goes on."""
    topic = _topic(kafka_broker, {0: _every(200, 1, start=T0 + 10 * 60 * MIN)})
    r = Reader(kafka_broker, topic, (0,), max_hold_s=0.5)
    r.source._frontiers.set(99, T0)  # test seam: the phantom partition
    try:
        t = time.monotonic()
        while not r.offsets[0] and time.monotonic() - t < 10:
            r.round()
            time.sleep(0.01)
        waited = time.monotonic() - t
        assert r.offsets[0], "never handed over"
        assert 0.5 <= waited < 5, f"handed over after {waited:.2f} s"
        r.run()
    finally:
        r.close()
    assert r.offsets[0] == list(range(200))


class _Measured(Sequencer):
    """The portfolio's Sequencer, counting the most items it ever held waiting for other instruments."""
    most = 0

    def release(self, now_ms: int = 0) -> list:
        _Measured.most = max(_Measured.most, len(self.buffer))
        return super().release(now_ms)


def _held_by_the_book(brokers, topic, tmp_path, monkeypatch, **kw) -> tuple[int, SinkStats]:
    monkeypatch.setattr(pipeline, "Sequencer", _Measured)  # test seam: the class build_flow makes
    _Measured.most = 0
    src = KafkaBatchSource(brokers, topic, tail=False, batch_size=1000, start="earliest", **kw)
    stats = SinkStats()
    flow = pipeline.build_flow(settings(tmp_path, online_models=False), src, NullSink(stats), ensemble=None,
                               instruments=["x:S0/USDT", "x:S1/USDT"])
    run_main(flow, epoch_interval=timedelta(milliseconds=50))
    return _Measured.most, stats


def test_the_book_holds_an_hour_of_bars_not_the_backlog(kafka_broker, tmp_path, monkeypatch):
    """The symptom itself, through the whole pipeline: instrument S1 (partition 1, 1 trade a minute)
    read 1,000 messages a poll covers 1,000 minutes while S0's poll covers 100; the portfolio's
    Sequencer then held S1's bars and scored rows until S0 caught up. Levelled, it holds about the
    bound plus a batch of S0; the control (bound off) holds most of the backlog."""
    topic = _topic(kafka_broker, {0: _every(1200, 10), 1: _every(1200, 1)})

    most, stats = _held_by_the_book(kafka_broker, topic, tmp_path / "a", monkeypatch)
    loose, loose_stats = _held_by_the_book(kafka_broker, topic, tmp_path / "b", monkeypatch, max_skew_ms=10**12)

    assert stats.trades_in_bars == loose_stats.trades_in_bars == 1200 * 11  # every trade, both ways
    assert loose > 1000, f"the control held only {loose} items"  # what the bound prevents
    # an item is a 1m bar or a scored row: at most ~2 a minute of S1, over the bound plus S0's batch
    assert most <= 2 * (MAX_SKEW_MS // MIN + 100) + 20, f"held {most} items"


def test_a_tail_at_the_live_edge_is_not_held_back_by_a_partition_catching_up(kafka_broker):
    """Tailing (``tail=True``): partition 1 has read all there is (50 trades, 10 hours on) while
    partition 0 catches up from 10 hours before: partition 1 hands over at once (live data keeps
    flowing; levelling is for backlogs), partition 0 keeps reading."""
    topic = _topic(kafka_broker, {0: _every(600, 10), 1: _every(50, 1, start=T0 + 10 * 60 * MIN)})
    r = Reader(kafka_broker, topic, (0, 1), tail=True, max_hold_s=3600.0)
    behind_by = None  # how much of partition 0 was read when partition 1 had handed over everything
    try:
        while len(r.offsets[0]) < 6000 and r.rounds < 300:
            r.round()
            if behind_by is None and len(r.offsets[1]) == 50:
                behind_by = len(r.offsets[0])
            time.sleep(0.01)
    finally:
        r.close()
    assert r.offsets[0] == list(range(6000)) and r.offsets[1] == list(range(50))
    # levelled, partition 1 would have waited for partition 0's 9th hour (5,400 messages)
    # (a few batches of slack: librdkafka may report the end a poll or two after the messages)
    assert behind_by is not None and behind_by <= 4 * BATCH, f"partition 1 done after {behind_by} of partition 0"


def test_a_tail_reads_on_across_the_end_of_its_partition(kafka_broker):
    """Tailing, the end of the partition is reached three times and more is produced each time:
    every message is handed over, none skipped (the ``Reader`` checks each batch against the
    snapshot). When librdkafka puts the end-of-partition event and new messages in one call depends
    on its timing; that case is scripted in tests/unit/test_kafka_consume.py."""
    topic = _topic(kafka_broker, {0: _every(100, 1)})
    r = Reader(kafka_broker, topic, (0,), tail=True)
    prod = Producer({"bootstrap.servers": kafka_broker})
    try:
        for n in (100, 110, 120):
            deadline = time.monotonic() + 10
            while len(r.offsets[0]) < n and time.monotonic() < deadline:
                r.round()
                time.sleep(0.01)
            assert len(r.offsets[0]) == n, f"{len(r.offsets[0])} of {n} handed over"
            time.sleep(0.3)  # at the end: librdkafka has reported it before the next messages come
            for i in range(10):
                prod.produce(topic, _trade(T0 + (n + i) * MIN, n + i, "S0/USDT"), partition=0)
            assert prod.flush(10) == 0
    finally:
        r.close()
    assert r.offsets[0] == list(range(120))


def test_the_bound_and_the_hold_are_settings_the_kafka_source_takes(kafka_broker, monkeypatch):
    """``TAPEFLOW_KAFKA_MAX_SKEW_MS`` and ``TAPEFLOW_KAFKA_MAX_HOLD_S`` reach the source a run builds
    (and its partitions); the defaults are the module's."""
    from cli.source_options import build_source
    from dataflows.config import load_settings

    topic = _topic(kafka_broker, {0: _every(60, 1), 1: _every(60, 1)})

    def source(**env: str) -> KafkaBatchSource:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = load_settings(kafka_brokers=kafka_broker, kafka_topic=topic)
        return build_source("kafka", s, None, symbols="", t0=0, end_ms=0, seed=0, rate=None, speed=None, files=(),
                            exchange=None, symbol=None, feeds=None, duration=None, exchange_factory=None, eof=True,
                            group=None)

    default = source()
    assert (default.max_skew_ms, default.max_hold_s) == (MAX_SKEW_MS, MAX_HOLD_S)
    tuned = source(TAPEFLOW_KAFKA_MAX_SKEW_MS="120000", TAPEFLOW_KAFKA_MAX_HOLD_S="2.5")
    assert (tuned.max_skew_ms, tuned.max_hold_s) == (120_000, 2.5)
    part = tuned.build_part("s", f"0-{topic}", None)
    try:
        assert (part.max_skew_ms, part.max_hold_s) == (120_000, 2.5)
    finally:
        part.close()
