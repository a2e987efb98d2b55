"""Kafka outside the dataflow: client config and errors, broker and topic checks, topic admin,
the trade producer and publishing a tape.

The data path uses confluent-kafka (measured: ~470k msg/s consumed with
``fetch.queue.backoff.ms=10``, ~900k/s produced); kafka-python only creates topics. The pipeline's
batch source is ``dataflows.kafka_source``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import msgspec
import polars as pl
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from dataflows.logs import librdkafka_logger
from operators.perp import PerpUpdate, encode as _encode_perp
from operators.tape_order import load_tape

TRADES_TOPIC = "trades"


class KafkaUnavailable(RuntimeError):
    pass


def client_conf(brokers: str, extra: Optional[dict] = None) -> dict:
    """Client config. librdkafka's own log lines (one per failed connection attempt while a broker
    is down) go to the ``tapeflow.librdkafka`` logger at DEBUG instead of stderr: ``--debug``
    shows them, otherwise the caller's one clear error is what the user sees."""
    return {"bootstrap.servers": brokers, "logger": librdkafka_logger(), **(extra or {})}


def preflight(brokers: str, topic: Optional[str] = None, timeout_s: float = 10.0) -> int:
    """Check the brokers answer (and the topic exists); returns the topic's partition count."""
    admin = AdminClient(client_conf(brokers))
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


class TradeProducer:
    """Idempotent, acks=all producer keyed ``exchange:symbol`` with the Java-compatible partitioner.

    Delivery failures are collected and raised by ``flush`` (nothing is dropped silently).
    """

    def __init__(self, brokers: str, topic: str = TRADES_TOPIC, extra: Optional[dict] = None):
        self.topic = topic
        self.errors: list[str] = []
        self.sent = 0
        self.producer = Producer(client_conf(brokers, {
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


def _interleave(offsets: list, perps: list[PerpUpdate]) -> list[tuple[int, PerpUpdate]]:
    """Each perp update with the number of rows before it: it comes after the rows whose offset is
    below its ``seq`` (``seq`` None: after them all), in ``seq`` order."""
    out, end = [], 0
    for u in sorted(perps, key=lambda u: float("inf") if u.seq is None else u.seq):
        while end < len(offsets) and (u.seq is None or offsets[end] < u.seq):
            end += 1
        out.append((end, u))
    return out


def with_perp(frame: pl.DataFrame, perps: list[PerpUpdate]) -> list[tuple[str, bytes]]:
    """The frame's trades with the perp updates in between, each after the trades whose ``offset``
    is below its ``seq`` (in order with the trades of its key; ``seq`` None: after them all)."""
    if not perps:
        return tape_messages(frame)
    offsets = frame["offset"].to_list() if "offset" in frame.columns else list(range(frame.height))
    out, start = [], 0
    for end, u in _interleave(offsets, perps):
        out += tape_messages(frame.slice(start, end - start))
        out.append(_encode_perp(u))
        start = end
    return out + tape_messages(frame.slice(start))


def publish_tape(path, producer: TradeProducer, *, exchange: Optional[str] = None, symbol: Optional[str] = None,
                 speed: Optional[float] = None, batch_size: int = 50_000,
                 progress: Optional[Callable[[int, int], None]] = None, tape=None) -> int:
    """Publish recorded tape file(s) to Kafka in the replay's order; ``speed`` paces event time
    (k x real time). Returns the number of messages sent (delivery is confirmed by ``producer.flush``).

    ``path`` is one file or a list of files. They are read exactly as ``--source replay`` reads
    them (``operators.tape_order.load_tape``: whole files, sorted by (ts, id) across all files, time
    unit converted to ms, Kraken/Binance columns mapped, missing ids derived and sides inferred),
    so the topic carries the same trades in the same order as a file replay. Pass ``tape`` (a
    ``load_tape`` result, e.g. from the CLI's check before connecting) to avoid reading twice.
    """
    if tape is None:
        tape = load_tape([path] if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__") else list(path),
                         exchange, symbol)
    frame, total = tape.frame, tape.frame.height
    sent, t0, ev0 = 0, None, None
    for start in range(0, total, batch_size):
        part = frame.slice(start, batch_size)
        last = start + part.height >= total
        # perp rows (funding, open interest, liquidations) in between, each after the trades before it
        perps = [u for u in getattr(tape, "perp", []) if start <= u.seq < start + part.height or (last and u.seq >= total)]
        msgs = with_perp(part, perps)
        if speed:
            ts = _message_ts(part, perps)
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


def _message_ts(part, perps: list) -> list:
    """Event times of ``with_perp(part, perps)``'s messages, in its order (for pacing)."""
    ts = part["ts"].cast(pl.Int64, strict=False).to_list()
    out, start = [], 0
    for end, u in _interleave(part["offset"].to_list(), perps):
        out += ts[start:end] + [u.ts]
        start = end
    return out + ts[start:]
