"""Where a Kafka instrument's trades are read, on a real broker (tansu on loopback): the murmur2
partitioner puts each key where ``kafka_partition`` says, and bytewax's workers read the partitions
as ``partition_reader`` says, so ``KafkaBatchSource.home_worker`` keeps an instrument on the worker
that reads it, up to its even share of the instruments (operators/routing.py; issue 16: a trade
then never crosses processes)."""
import threading

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main
from confluent_kafka import Consumer, TopicPartition

from dataflows.kafka_source import KafkaBatchSource
from dataflows.kafka_topic import TradeProducer, client_conf, ensure_topic
from operators.routing import balanced_keys, kafka_partition, worker_of

INSTRUMENTS = [f"{ex}:{s}/USDT:USDT" for ex in ("binanceusdm", "bybit") for s in ("BTC", "ETH", "SOL", "XRP", "DOGE",
                                                                                 "ADA", "AVAX", "LINK", "TRX")]


def _publish(brokers: str, topic: str, partitions: int) -> None:
    ensure_topic(brokers, topic, partitions)
    prod = TradeProducer(brokers, topic)
    for i in range(3):
        for inst in INSTRUMENTS:
            prod.send(inst, b'{"n": %d}' % i)  # the payload does not matter here: only where the key goes
    prod.flush()


def test_the_broker_puts_each_key_in_the_partition_kafka_partition_names(kafka_broker):
    topic, parts = "routing-keys", 5
    _publish(kafka_broker, topic, parts)
    found: dict[str, set] = {}
    for p in range(parts):
        c = Consumer(client_conf(kafka_broker, {"group.id": "routing-probe", "enable.auto.commit": "false",
                                                "enable.partition.eof": "true"}))
        c.assign([TopicPartition(topic, p, 0)])
        while True:
            m = c.poll(10)
            assert m is not None, f"partition {p}: no end-of-partition within 10 s"
            if m.error():
                break
            found.setdefault(m.key().decode(), set()).add(p)
        c.close()
    assert sorted(found) == sorted(INSTRUMENTS)
    assert found == {inst: {kafka_partition(inst, parts)} for inst in INSTRUMENTS}
    assert len({kafka_partition(inst, parts) for inst in INSTRUMENTS}) > 2  # a spread, not one partition


@pytest.mark.parametrize("partitions,workers", [(4, 2), (5, 3), (12, 3)])  # 12 on 3: sorted as text (10 before 2) matters
def test_every_instrument_is_routed_to_the_worker_that_reads_it(kafka_broker, partitions, workers):
    topic = f"routing-read-{partitions}-{workers}"
    _publish(kafka_broker, topic, partitions)
    src = KafkaBatchSource(kafka_broker, topic, tail=False, batch_size=100, start="earliest")
    read_by: dict[int, set] = {}
    lock = threading.Lock()

    def note(_step, batch):
        with lock:
            read_by.setdefault(threading.get_ident(), set()).update(k.decode() for k in batch.keys)

    flow = Dataflow("kafka_home_probe")
    op.inspect("read", op.input("in", flow, src), note)
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    assert len(read_by) == min(partitions, workers)
    home = {inst: src.home_worker(inst, workers) for inst in INSTRUMENTS}
    for seen in read_by.values():  # each thread read exactly the instruments home_worker gives one worker
        assert len({home[inst] for inst in seen}) == 1
    assert sorted(map(sorted, read_by.values())) == sorted(
        sorted(i for i in INSTRUMENTS if home[i] == w) for w in set(home.values()))
    routed = {inst: worker_of(key, workers) for inst, key in balanced_keys(INSTRUMENTS, workers, src.home_worker).items()}
    share = -(-len(INSTRUMENTS) // workers)
    at_home = {w: sum(h == w for h in home.values()) for w in range(workers)}
    # every instrument stays where it is read, but for those beyond a worker's even share
    assert sum(routed[i] == home[i] for i in INSTRUMENTS) == sum(min(n, share) for n in at_home.values())
    load = [sum(w == v for v in routed.values()) for w in range(workers)]
    assert max(load) - min(load) <= 1
