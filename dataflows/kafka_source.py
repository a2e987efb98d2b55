"""The pipeline's Kafka batch source (``KafkaBatchSource``) and the committer of its offsets.

``KafkaBatchSource`` is bytewax's ``KafkaSource`` reshaped for this pipeline: each Kafka
partition is a bytewax partition (named ``{idx}-{topic}``, read by one worker), partitions are
assigned directly (no group membership, no rebalancing), the position is the next offset and lives
in bytewax's recovery snapshots; but a poll hands over ONE item, a ``RawBatch`` of up to
``batch_size`` messages with their offsets, instead of one item per message. It also fails fast
with a clear message when the brokers are unreachable (bytewax's source waits forever).

Where a partition starts (issue 11): from the recovery snapshot when there is one; otherwise from
``start``: ``committed`` (the default: the consumer group's committed offset, or the beginning for
a group that never committed), ``earliest`` or ``latest``. Offsets are committed to the group
(``group_id``, by default one per store: ``default_group``) by the ClickHouse sink, through an
``OffsetCommitter``, after each completed epoch: the pipeline passes a ``SourcePosition`` per batch
to the sink, which commits the positions it has seen once the epoch's rows are flushed, so a
committed offset never covers a message whose rows are not stored. A run without
``--recovery-dir`` thus resumes where the last one stopped; its in-memory state (open windows,
models, portfolio) starts empty, so only a recovery directory gives rows equal to an uninterrupted
run. A saved position past the end of its partition (a broker that came back with less data, a
re-created topic) stops the run with ``KafkaPositionError`` instead of waiting for data that will
never come, or skipping what comes.

Partitions read by one process stay level in event time (``max_skew_ms``): a poll hands over only
the messages up to ``max_skew_ms`` past the slowest other partition of the process and holds the rest
(at most one batch) for the next polls. Without it a backlog read at ``batch_size`` messages a poll
let a partition of quieter instruments run hours ahead of a busier one, and the portfolio's
``Sequencer``, which hands bars over in event time, held every bar in between: memory grew with the
backlog (``bench/kafka_backlog_memory.py``). The bound only cuts batches, at message boundaries and in
offset order, so it never changes a row. What does not hold a partition back:

- a partition that has read all there is (librdkafka's end-of-partition event); one that has more to
  read but has handed over nothing yet (at the start, before its first fetch) does hold the others;
- while tailing, a partition at the live edge is not held back either: what comes in comes at
  wall-clock pace (levelling is for backlogs);
- a ``ts`` that cannot be read or believed (junk, before 2010, over a day ahead) counts as no bound;
- a partition that has waited ``max_hold_s`` hands over what it holds anyway (liveness over memory).

Processes are not levelled with each other.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Callable, Optional

import msgspec
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from dataflows.frame_partition import now_ms
from dataflows.kafka_topic import TRADES_TOPIC, KafkaUnavailable, client_conf, preflight
from operators.records import DAY_MS, MIN_TS_MS, RawBatch
from operators.routing import kafka_partition, partition_reader
from sinks.rows import SourcePosition
from sinks.store import redact_dsn

log = logging.getLogger(__name__)


class KafkaPositionError(KafkaUnavailable):
    """A saved position (recovery snapshot or committed offset) the partition does not have."""


STARTS = ("committed", "earliest", "latest")


def default_group(dsn: str, database: str) -> str:
    """The consumer group of a pipeline writing into this store: its committed offsets say how far
    this store's rows go, so another store (another --data-dir) reads the topic from its own start.
    The DSN's password is left out (changing it does not change the store)."""
    return f"tapeflow-{database}-{hashlib.sha256(redact_dsn(dsn).encode()).hexdigest()[:10]}"


MAX_SKEW_MS = 60 * 60_000  # event time a partition may run ahead of the slowest other of its process
MAX_HOLD_S = 10.0  # wall time a partition holds messages waiting for the others, at most
UNKNOWN = 0  # the frontier of a partition that has more to read and has read nothing yet


class _Ts(msgspec.Struct):
    ts: int


_TS = msgspec.json.Decoder(_Ts)


def message_ts(payload: Optional[bytes], newest: int) -> Optional[int]:
    """A message's ``ts`` for levelling partitions; None if unreadable or not believable (before
    2010, after ``newest``): such a message never holds its partition back, and decoding judges it."""
    try:
        ts = _TS.decode(payload or b"").ts
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return ts if MIN_TS_MS <= ts <= newest else None


class Frontiers:
    """Where each partition of one process stands in event time: the ``ts`` of the first message it
    has not handed over yet (or of the last one it did), ``UNKNOWN`` before it has handed over any;
    absent once it has read all there is. Partitions of one process may run on several worker
    threads: hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at: dict[int, int] = {}

    def set(self, idx: int, ts: Optional[int]) -> None:
        with self._lock:
            if ts is None:
                self._at.pop(idx, None)
            else:
                self._at[idx] = ts

    def lowest_other(self, idx: int) -> Optional[int]:
        with self._lock:
            return min((ts for i, ts in self._at.items() if i != idx), default=None)


class _Partition(StatefulSourcePartition[RawBatch, int]):
    """One Kafka partition. ``origin``: where ``offset`` comes from (for the past-the-end message).
    ``frontiers``: shared by the partitions of this process (see the module docstring)."""

    def __init__(self, conf: dict, topic: str, idx: int, offset: Optional[int], batch_size: int, idle_ms: int,
                 progress: Optional[Callable] = None, start: str = "earliest", origin: str = "",
                 frontiers: Optional[Frontiers] = None, max_skew_ms: int = MAX_SKEW_MS,
                 max_hold_s: float = MAX_HOLD_S, tail: bool = False):
        self.topic, self.idx, self.batch_size, self.tail = topic, idx, batch_size, tail
        self.frontiers, self.max_skew_ms, self.max_hold_s = frontiers or Frontiers(), max_skew_ms, max_hold_s
        self.held: list = []  # consumed, not handed over yet (offset order)
        self.last_ts: Optional[int] = None  # ts of the last message handed over
        self.caught_up = False  # at the end of the partition (librdkafka's end-of-partition event)
        self.handed = False  # has handed over a message (one without a readable ts never holds others)
        self.waiting_since: Optional[float] = None  # monotonic time the partition began to hold back
        self.progress = progress
        self.idle = timedelta(milliseconds=idle_ms)
        self.consumer = Consumer(conf)
        self.group = conf.get("group.id", "")
        if offset is None:
            offset, origin = self._start(start)
        self.offset, self.origin = offset, origin
        self.consumer.assign([TopicPartition(topic, idx, offset)])
        self.eof = False
        self.awake: Optional[datetime] = None

    def _start(self, start: str) -> tuple[int, str]:
        """The first offset without a recovery snapshot (see the module docstring)."""
        if start == "latest":
            return OFFSET_END, ""
        if start == "committed":
            try:
                (tp,) = self.consumer.committed([TopicPartition(self.topic, self.idx)], timeout=10)
            except Exception as err:  # noqa: BLE001 - librdkafka's KafkaException
                raise KafkaUnavailable(f"Kafka: cannot read the committed offsets of group {self.group} for "
                                       f"{self.topic}[{self.idx}]: {err}") from None
            if tp.error is None and tp.offset >= 0:
                return tp.offset, f"the offset committed by consumer group {self.group}"
        return OFFSET_BEGINNING, ""

    def _past_the_end(self, detail: str = "") -> KafkaPositionError:
        fix = ("use a new --recovery-dir (with --from earliest to read the topic from its beginning)"
               if self.origin.startswith("from the recovery") else "read it from its beginning with --from earliest")
        return KafkaPositionError(
            f"Kafka topic {self.topic} partition {self.idx}: the saved position, offset {self.offset} "
            f"({self.origin or 'saved'}), is past the end of the partition{detail}: the topic holds less than when "
            f"it was saved (a broker that lost its data, or a re-created topic); {fix}")

    def _check_position(self) -> None:
        """Nothing came: is our position beyond the partition's end? A broker answers a fetch there
        with nothing (tansu) or an out-of-range error (Kafka, ``auto.offset.reset=error``); its
        high watermark comes with every fetch response."""
        if self.offset < 0 or not self.origin:
            return
        _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, self.idx), cached=True)
        if high is not None and high >= 0 and self.offset > high:
            raise self._past_the_end(f" (it ends at offset {high})")

    def _consume(self) -> None:
        """Up to a batch more into ``held``. librdkafka marks the end of the partition with an event
        among the messages, and messages produced meanwhile can follow it in the same call: a partition
        that ends (``tail=False``) stops there (``eof``; what follows is read by the next run, from its
        position); a tail keeps every message and is ``caught_up`` when the last thing read is the end."""
        msgs = self.consumer.consume(self.batch_size - len(self.held), 0.0)
        kept = []
        for m in msgs:
            err = m.error()
            if err is None:
                kept.append(m)
                continue
            if err.code() == KafkaError._AUTO_OFFSET_RESET:  # out of range, with auto.offset.reset=error
                raise self._past_the_end(f" or before its start ({err.str()})")
            if err.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"Kafka error on {self.topic}[{self.idx}]: {err}")
            if not self.tail:
                self.eof = True  # hand over what we have; stop once it is handed over
                break
        if msgs:
            self.caught_up = self.eof or msgs[-1].error() is not None
        self.held += kept

    def _mark(self, newest: int) -> None:
        """Tell the other partitions where this one stands (see ``Frontiers``): the lower of its first
        held message's ts and the last handed over, so that one odd ts does not make it look ahead;
        absent when it has read all there is; ``UNKNOWN`` (the others wait, at most ``max_hold_s``)
        when there is more to read but it has handed over nothing yet (at the start, before its first
        fetch)."""
        if not self.held and self.caught_up:
            self.frontiers.set(self.idx, None)
            return
        head = message_ts(self.held[0].value(), newest) if self.held else None
        known = [ts for ts in (head, self.last_ts) if ts is not None]
        self.frontiers.set(self.idx, min(known) if known else None if self.handed else UNKNOWN)

    def _cut(self, newest: int) -> int:
        """How many held messages to hand over now: those before ``max_skew_ms`` past the slowest
        other partition of the process (all when there is none, when held too long, or when this one
        tails the live edge); at least one when this partition is the slowest."""
        self._mark(newest)
        lowest = self.frontiers.lowest_other(self.idx)
        if lowest is None or (self.tail and self.caught_up):  # a tail at the live edge flows: what comes
            return len(self.held)  # in comes at wall-clock pace, while a partition behind catches up
        bound = lowest + self.max_skew_ms
        cut = bisect.bisect_left(self.held, bound, key=lambda m: message_ts(m.value(), newest) or 0)
        if cut == 0:
            if self.waiting_since is None:
                self.waiting_since = time.monotonic()
            elif time.monotonic() - self.waiting_since > self.max_hold_s:
                log.info("Kafka %s[%d]: held %d messages %.0f s waiting for the other partitions; handing them "
                         "over", self.topic, self.idx, len(self.held), self.max_hold_s)
                return len(self.held)
        return cut

    def next_batch(self) -> list[RawBatch]:
        if self.eof and not self.held:
            self.frontiers.set(self.idx, None)
            raise StopIteration
        if not self.eof and len(self.held) < self.batch_size:
            self._consume()
        newest = now_ms() + DAY_MS  # the newest ts believed (message_ts)
        if not self.held:
            self._mark(newest)  # read all there is: holds no one back; else where it stands
            if not self.eof:
                self._check_position()
            self.awake = datetime.now(timezone.utc) + self.idle  # nothing waiting: don't spin
            return []
        cut = self._cut(newest)
        if cut == 0:  # ahead of the others: wait for them
            self.awake = datetime.now(timezone.utc) + self.idle
            return []
        msgs, self.held = self.held[:cut], self.held[cut:]
        self.awake, self.waiting_since, self.handed = None, None, True
        offsets = [m.offset() for m in msgs]
        payloads = [m.value() or b"" for m in msgs]
        keys = [m.key() for m in msgs]  # checked against each trade's exchange:symbol (key_mismatch)
        self.offset = offsets[-1] + 1
        self.last_ts = message_ts(payloads[-1], newest) or self.last_ts
        self._mark(newest)
        if self.progress:
            self.progress(f"{self.idx}-{self.topic}", 0, 0, len(offsets))
        return [RawBatch(self.topic, str(self.idx), offsets, payloads, now_ms(), keys)]

    def next_awake(self) -> Optional[datetime]:
        return self.awake

    def snapshot(self) -> int:
        return self.offset

    def close(self) -> None:
        self.frontiers.set(self.idx, None)
        self.consumer.close()


@dataclass
class KafkaBatchSource(FixedPartitionedSource[RawBatch, int]):
    """Every partition of ``topic``; ``tail=False`` stops at the end of each partition. ``start``
    and ``group_id``: see the module docstring (``group_id`` None: ``tapeflow-unused``, nothing
    committed, ``committed`` means ``earliest``)."""

    brokers: str
    topic: str = TRADES_TOPIC
    tail: bool = True
    batch_size: int = 10_000
    idle_ms: int = 5
    add_config: dict = field(default_factory=dict)
    progress: Optional[Callable] = None  # (partition, done, total, rows released now)
    start: str = "committed"
    group_id: Optional[str] = None
    universe: tuple = ()  # exchange:symbol of every instrument on the topic (the portfolio waits for each)
    max_skew_ms: int = MAX_SKEW_MS  # see the module docstring
    max_hold_s: float = MAX_HOLD_S

    commit_positions = True  # the pipeline passes each batch's SourcePosition on to the sink

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        self._frontiers = Frontiers()  # the partitions built in this process share it

    def instruments(self) -> tuple:
        return self.universe

    def offset_committer(self) -> "OffsetCommitter":
        """What the sink uses to commit this source's positions (None group: commits nothing)."""
        return OffsetCommitter(self.brokers, self.group_id, self.add_config)

    def list_parts(self) -> list[str]:
        n = preflight(self.brokers, self.topic)
        return [f"{i}-{self.topic}" for i in range(n)]

    def home_worker(self, instrument: str, workers: int) -> Optional[int]:
        """The worker that reads ``instrument``'s partition, where the topic was written with the
        murmur2 partitioner on the ``exchange:symbol`` key (``tapeflow ingest`` / ``replay``, and Java
        clients by default). A topic partitioned otherwise only costs speed (trades then cross to
        their instrument's worker); None if the broker did not answer (asked once: the run then says so)."""
        parts = self._known_parts
        if not parts:
            return None
        return partition_reader(f"{kafka_partition(instrument, len(parts))}-{self.topic}", parts, workers)

    @cached_property
    def _known_parts(self) -> Optional[list[str]]:
        """``list_parts()``, asked once: None if the broker did not answer (not asked again for every
        instrument, each time with its own timeout)."""
        try:
            return self.list_parts()
        except KafkaUnavailable:
            return None

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _Partition:
        idx, topic = for_part.split("-", 1)
        if topic != self.topic:
            raise ValueError(f"recovery state is for topic {topic!r}, this run reads {self.topic!r}")
        conf = client_conf(self.brokers, {
            "group.id": self.group_id or "tapeflow-unused",  # assigned, never subscribed: no rebalancing
            "enable.auto.commit": "false",  # the sink commits what is stored (OffsetCommitter)
            "enable.partition.eof": "true",  # the end of a partition: stop (tail=False) or caught up (levelling)
            "auto.offset.reset": "error",  # a saved offset out of range is an error, not a silent jump
            "fetch.queue.backoff.ms": 10,  # librdkafka's 1000 ms default halves a fast consumer
            # prefetch about one batch per partition, not librdkafka's 100k messages / 64 MB: with one
            # consumer per partition the defaults held ~70 MB each, and were no faster (bench/kafka_throughput.py)
            "queued.min.messages": self.batch_size,
            "queued.max.messages.kbytes": 8192,
            "fetch.max.bytes": 2 * 1024 * 1024,
            **self.add_config,
        })
        start = self.start if self.group_id or self.start != "committed" else "earliest"
        return _Partition(conf, topic, int(idx), resume_state, self.batch_size, self.idle_ms, self.progress,
                          start=start, origin="from the recovery snapshot" if resume_state is not None else "",
                          frontiers=self._frontiers, max_skew_ms=self.max_skew_ms, max_hold_s=self.max_hold_s,
                          tail=self.tail)


class OffsetCommitter:
    """Commits the sources' positions to the consumer group once their rows are stored: the sink
    calls ``observe`` with every batch of records it receives and ``commit`` when an epoch's rows
    are flushed (``sinks.clickhouse``). Only ``SourcePosition`` records count; a position is the
    next offset to read of (topic, partition). A failed commit is logged and retried at the next
    epoch: until then a restart without recovery re-reads a little more (the rows replace
    themselves), nothing is lost."""

    def __init__(self, brokers: str, group_id: Optional[str], add_config: Optional[dict] = None):
        self.brokers, self.group_id, self.add_config = brokers, group_id, dict(add_config or {})
        self.pending: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.consumer: Optional[Consumer] = None

    def observe(self, records: list) -> None:
        for rec in records:
            if isinstance(rec, tuple) and len(rec) == 2 and isinstance(rec[0], str):
                rec = rec[1]
            if isinstance(rec, SourcePosition):
                key = (rec.source, int(rec.partition))
                self.pending[key] = max(self.pending.get(key, rec.next_offset), rec.next_offset)

    def commit(self) -> None:
        if not self.pending or not self.group_id:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in sorted(self.pending.items())]
        try:
            if self.consumer is None:
                self.consumer = Consumer(client_conf(self.brokers, {"group.id": self.group_id, "enable.auto.commit": "false",
                                                              **self.add_config}))
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as err:  # noqa: BLE001 - librdkafka's KafkaException: try again next epoch
            log.warning("Kafka: committing offsets of group %s failed (retried at the next epoch): %s",
                        self.group_id, err)
            return
        self.committed.update(self.pending)
        self.pending = {}

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None

