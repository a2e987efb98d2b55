"""Kafka in and out: the pipeline's batch source, the trade producer, topic admin.

The data path uses confluent-kafka (measured: ~470k msg/s consumed with
``fetch.queue.backoff.ms=10``, ~900k/s produced); kafka-python only creates topics.

``KafkaBatchSource`` is bytewax's ``KafkaSource`` reshaped for this pipeline: each Kafka
partition is a bytewax partition (named ``{idx}-{topic}``, read by one worker), partitions are
assigned directly (no consumer group, no rebalancing), the position is the next offset and lives
in bytewax's recovery snapshots; but a poll hands over ONE item, a ``RawBatch`` of up to
``batch_size`` messages with their offsets, instead of one item per message. It also fails fast
with a clear message when the brokers are unreachable (bytewax's source waits forever).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Optional

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from operators.trades import RawBatch

log = logging.getLogger(__name__)

TRADES_TOPIC = "trades"


class KafkaUnavailable(RuntimeError):
    pass


def _conf(brokers: str, extra: Optional[dict] = None) -> dict:
    """Client config. librdkafka's own log lines (one per failed connection attempt while a broker
    is down) go to the ``tapeflow.librdkafka`` logger at DEBUG instead of stderr: ``--debug``
    shows them, otherwise the caller's one clear error is what the user sees."""
    from dataflows.logs import librdkafka_logger

    return {"bootstrap.servers": brokers, "logger": librdkafka_logger(), **(extra or {})}


def preflight(brokers: str, topic: Optional[str] = None, timeout_s: float = 10.0) -> int:
    """Check the brokers answer (and the topic exists); returns the topic's partition count."""
    admin = AdminClient(_conf(brokers))
    try:
        md = admin.list_topics(timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - librdkafka raises KafkaException
        admin.poll(0)  # hand librdkafka's log lines (why it failed) to the debug log
        raise KafkaUnavailable(f"Kafka brokers {brokers} did not answer within {timeout_s:.0f} s: {err}. "
                               "Check TAPEFLOW_KAFKA_BROKERS and that the broker is up.") from None
    if topic is None:
        return 0
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise KafkaUnavailable(f"Kafka topic {topic!r} does not exist on {brokers} "
                               f"(create it with `tapeflow topic create {topic}`)")
    return len(t.partitions)


def ensure_topic(brokers: str, topic: str, partitions: int, replication: int = 1) -> bool:
    """Create ``topic`` if missing (kafka-python admin). Returns True if it was created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=brokers.split(","), client_id="tapeflow-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=replication)])
        return True
    except TopicAlreadyExistsError:
        return False
    finally:
        admin.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Partition(StatefulSourcePartition[RawBatch, int]):
    def __init__(self, conf: dict, topic: str, idx: int, offset: int, batch_size: int, idle_ms: int,
                 progress: Optional[Callable] = None):
        self.topic, self.idx, self.offset, self.batch_size = topic, idx, offset, batch_size
        self.progress = progress
        self.idle = timedelta(milliseconds=idle_ms)
        self.consumer = Consumer(conf)
        self.consumer.assign([TopicPartition(topic, idx, offset)])
        self.eof = False
        self.awake: Optional[datetime] = None

    def next_batch(self) -> list[RawBatch]:
        if self.eof:
            raise StopIteration
        msgs = self.consumer.consume(self.batch_size, 0.0)
        for i, m in enumerate(msgs):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"Kafka error on {self.topic}[{self.idx}]: {err}")
                self.eof = True  # emit what we have; stop on the next call
                msgs = msgs[:i]
                break
        offsets = [m.offset() for m in msgs]
        payloads = [m.value() or b"" for m in msgs]
        keys = [m.key() for m in msgs]  # checked against each trade's exchange:symbol (key_mismatch)
        if not offsets:
            self.awake = datetime.now(timezone.utc) + self.idle  # nothing waiting: don't spin
            return []
        self.awake = None
        self.offset = offsets[-1] + 1
        if self.progress:
            self.progress(f"{self.idx}-{self.topic}", 0, 0, len(offsets))
        return [RawBatch(self.topic, str(self.idx), offsets, payloads, now_ms(), keys)]

    def next_awake(self) -> Optional[datetime]:
        return self.awake

    def snapshot(self) -> int:
        return self.offset

    def close(self) -> None:
        self.consumer.close()


@dataclass
class KafkaBatchSource(FixedPartitionedSource[RawBatch, int]):
    """Every partition of ``topic``; ``tail=False`` stops at the end of each partition."""

    brokers: str
    topic: str = TRADES_TOPIC
    tail: bool = True
    batch_size: int = 10_000
    idle_ms: int = 5
    add_config: dict = field(default_factory=dict)
    progress: Optional[Callable] = None  # (partition, done, total, rows released now)

    def list_parts(self) -> list[str]:
        n = preflight(self.brokers, self.topic)
        return [f"{i}-{self.topic}" for i in range(n)]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _Partition:
        idx, topic = for_part.split("-", 1)
        if topic != self.topic:
            raise ValueError(f"recovery state is for topic {topic!r}, this run reads {self.topic!r}")
        conf = _conf(self.brokers, {
            "group.id": "tapeflow-unused",  # partitions are assigned; offsets live in recovery
            "enable.auto.commit": "false",
            "enable.partition.eof": str(not self.tail).lower(),
            "fetch.queue.backoff.ms": 10,  # librdkafka's 1000 ms default halves a fast consumer
            **self.add_config,
        })
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        return _Partition(conf, topic, int(idx), offset, self.batch_size, self.idle_ms, self.progress)


class TradeProducer:
    """Idempotent, acks=all producer keyed ``exchange:symbol`` with the Java-compatible partitioner.

    Delivery failures are collected and raised by ``flush`` (nothing is dropped silently).
    """

    def __init__(self, brokers: str, topic: str = TRADES_TOPIC, extra: Optional[dict] = None):
        self.topic = topic
        self.errors: list[str] = []
        self.sent = 0
        self.producer = Producer(_conf(brokers, {
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",  # same partition as a Java producer for the same key
            "linger.ms": 5,
            "compression.type": "lz4",
            **(extra or {}),
        }))

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def send(self, key: str, payload: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, payload, key.encode(), on_delivery=self._delivered)
                break
            except BufferError:  # local queue full: let it drain
                self.producer.poll(0.05)
        self.sent += 1
        if self.sent % 10_000 == 0:
            self.producer.poll(0)

    def send_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        for k, p in items:
            self.send(k, p)
        self.producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self.producer.flush(timeout_s)
        if left:
            raise KafkaUnavailable(f"{left} messages not delivered within {timeout_s:.0f} s")
        if self.errors:
            errs, self.errors = self.errors, []
            raise KafkaUnavailable(f"{len(errs)} messages failed delivery, first: {errs[0]}")


def tape_messages(frame, exchange_col: str = "exchange", symbol_col: str = "symbol") -> list[tuple[str, bytes]]:
    """Rows of a normalised tape frame -> (key, contract JSON) messages, in frame order.

    Rows are encoded as they are (values as read), so a bad row reaches the pipeline and becomes a
    dead letter there, with its Kafka offset, like any other bad message.
    """
    import msgspec

    enc = msgspec.json.Encoder()
    out = []
    cols = [c for c in frame.columns if c != "offset"]
    for row in frame.select(cols).iter_rows(named=True):
        msg = {k: v for k, v in row.items() if v is not None}
        for num in ("ts", "recv_ts"):
            if isinstance(msg.get(num), str) and msg[num].strip().lstrip("-").isdigit():
                msg[num] = int(msg[num])
        for num in ("price", "amount"):
            v = msg.get(num)
            if isinstance(v, str):
                try:
                    msg[num] = float(v)
                except ValueError:
                    pass  # stays text: the pipeline will say wrong_type
        out.append((f"{row.get(exchange_col)}:{row.get(symbol_col)}", enc.encode(msg)))
    return out


def publish_tape(path, producer: TradeProducer, *, exchange: Optional[str] = None, symbol: Optional[str] = None,
                 speed: Optional[float] = None, batch_size: int = 50_000,
                 progress: Optional[Callable[[int, int], None]] = None, tape=None) -> int:
    """Publish recorded tape file(s) to Kafka in the replay's order; ``speed`` paces event time
    (k x real time). Returns the number of messages sent (delivery is confirmed by ``producer.flush``).

    ``path`` is one file or a list of files. They are read exactly as ``--source replay`` reads
    them (``dataflows.sources.load_tape``: whole files, sorted by (ts, id) across all files, time
    unit converted to ms, Kraken/Binance columns mapped, missing ids derived and sides inferred),
    so the topic carries the same trades in the same order as a file replay. Pass ``tape`` (a
    ``load_tape`` result, e.g. from the CLI's check before connecting) to avoid reading twice.
    """
    import polars as pl

    from dataflows.sources import load_tape

    if tape is None:
        tape = load_tape([path] if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__") else list(path),
                         exchange, symbol)
    frame, total = tape.frame, tape.frame.height
    sent, t0, ev0 = 0, None, None
    for start in range(0, total, batch_size):
        part = frame.slice(start, batch_size)
        msgs = tape_messages(part)
        if speed:
            ts = part["ts"].cast(pl.Int64, strict=False).to_list()
            for (k, m), t in zip(msgs, ts):
                if t is not None:
                    if t0 is None:
                        t0, ev0 = time.time(), t
                    delay = t0 + (t - ev0) / 1000 / speed - time.time()
                    if delay > 0:
                        producer.producer.poll(0)
                        time.sleep(delay)
                producer.send(k, m)
        else:
            producer.send_many(msgs)
        sent += len(msgs)
        if progress:
            progress(sent, total)
    producer.flush()
    return sent
