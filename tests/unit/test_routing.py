"""Routing keys: ``worker_of`` is the worker bytewax itself picks, and ``balanced_keys`` spreads
instruments evenly over workers."""

import threading

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main

from dataflows.synthetic_source import SyntheticSource
from operators.records import MINUTE_MS
from operators.routing import balanced_keys, kafka_partition, key_on_worker, murmur2, partition_reader, worker_of

T0 = 1_704_067_200_000
BENCH_16 = [f"synthetic:S{i:02d}/USDT:USDT" for i in range(16)]  # bench/kafka_throughput.py's instruments


def _workers_seen(keys: list[str], workers: int) -> list[set]:
    """Run a keyed stateful step on ``workers`` worker threads; the keys each thread handled."""
    seen: dict[int, set] = {}
    lock = threading.Lock()

    def mapper(state, key):
        with lock:
            seen.setdefault(threading.get_ident(), set()).add(key)
        return None, key

    flow = Dataflow("routing_probe")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(keys)), lambda k: k)
    op.inspect("out", op.stateful_map("where", keyed, mapper), lambda *_: None)
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return list(seen.values())


def test_worker_of_is_the_worker_bytewax_routes_a_key_to():
    keys = BENCH_16 + ["portfolio"] + [f"{k}#{n}" for k in BENCH_16[:4] for n in range(1, 4)]
    for workers in (2, 3):
        expected = {}
        for k in keys:
            expected.setdefault(worker_of(k, workers), set()).add(k)
        got = _workers_seen(keys, workers)
        assert sorted(map(sorted, got)) == sorted(map(sorted, expected.values()))
        assert len(expected) == workers  # every worker had keys: the comparison says something


def test_the_instruments_own_keys_are_uneven_and_balanced_keys_are_not():
    own = [worker_of(k, 2) for k in BENCH_16]
    assert sorted([own.count(0), own.count(1)]) == [5, 11]  # what the bench saw before: one worker did 11
    keys = balanced_keys(BENCH_16, 2)
    placed = [worker_of(keys[k], 2) for k in BENCH_16]
    assert placed.count(0) == placed.count(1) == 8
    assert len(set(keys.values())) == 16
    for name, key in keys.items():
        assert key == name or (key.startswith(name + "#") and key[len(name) + 1:].isdigit())


def test_balanced_keys_depend_only_on_the_set_and_the_worker_count():
    assert balanced_keys(reversed(BENCH_16), 3) == balanced_keys(BENCH_16 + BENCH_16[:2], 3)
    three = balanced_keys(BENCH_16, 3)
    assert sorted(sum(worker_of(k, 3) == w for k in three.values()) for w in range(3)) == [5, 5, 6]
    odd = balanced_keys(BENCH_16[:3], 2)  # the odd one out goes to the lowest worker
    assert [worker_of(k, 2) for k in odd.values()].count(0) == 2
    assert balanced_keys(BENCH_16, 1) == {k: k for k in BENCH_16}


def test_a_key_can_be_put_on_any_worker():
    for workers in (2, 3, 4):
        for w in range(workers):
            key = key_on_worker("portfolio", w, workers)
            assert worker_of(key, workers) == w and (key == "portfolio" or key.startswith("portfolio#"))
    assert key_on_worker("portfolio", worker_of("portfolio", 2), 2) == "portfolio"  # its own name when it lands


def test_an_instrument_stays_on_the_worker_that_reads_it_where_the_source_knows_it():
    symbols = [f"S{i:02d}/USDT:USDT" for i in range(6)]
    src = SyntheticSource(symbols, T0, T0 + 2 * MINUTE_MS, perp=False)
    read_by: dict[int, set] = {}
    lock = threading.Lock()

    def note(_step, batch):
        with lock:
            read_by.setdefault(threading.get_ident(), set()).update(f"synthetic:{s}" for s in batch.frame["symbol"])

    flow = Dataflow("home_probe")
    op.inspect("read", op.input("in", flow, src), note)
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    keys = balanced_keys(src.instruments(), 2, src.home_worker)
    routed = {}
    for inst, key in keys.items():
        routed.setdefault(worker_of(key, 2), set()).add(inst)
    assert sorted(map(sorted, read_by.values())) == sorted(map(sorted, routed.values()))  # no trade changes worker
    assert len(read_by) == 2 and all(len(v) == 3 for v in read_by.values())


def test_two_instruments_never_share_a_routing_key_even_named_like_each_others_keys():
    # instruments whose names are other instruments' candidate keys (name#n): 2 000 small sets
    for i in range(500):
        base = f"x:S{i}"
        names = [base, f"{base}#1", f"{base}#2", f"{base}#1#1"]
        for workers in (2, 3, 4, 5):
            keys = balanced_keys(names, workers)
            assert len(set(keys.values())) == len(names), (names, workers, keys)


def test_murmur2_is_kafka_s():
    # the vectors of Kafka's own UtilsTest.testMurmur2 (the Java client's partitioner hash)
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    assert {k: murmur2(k) for k in cases} == cases
    assert all(0 <= kafka_partition(k.decode(), 7) < 7 for k in cases)


def test_partitions_are_read_round_robin_over_their_sorted_names():
    parts = [f"{i}-trades" for i in range(12)]  # sorted as text: 0, 1, 10, 11, 2, ...
    assert [partition_reader(p, parts, 3) for p in ("0-trades", "1-trades", "10-trades", "11-trades", "2-trades")] \
        == [0, 1, 2, 0, 1]


def test_a_worker_keeps_no_more_than_its_even_share_of_the_instruments_it_reads():
    names = [f"x:S{i}" for i in range(7)]
    keys = balanced_keys(names, 2, lambda name, workers: 0)  # worker 0 reads them all
    placed = {n: worker_of(k, 2) for n, k in keys.items()}
    assert [placed[n] for n in sorted(names)] == [0, 0, 0, 0, 1, 1, 1]  # the first 4 (its share) stay
    keys = balanced_keys(names, 2, lambda name, workers: int(name[-1]) % 2)  # already even: all stay home
    assert all(worker_of(k, 2) == int(n[-1]) % 2 for n, k in keys.items())


def test_a_kafka_source_asks_the_broker_for_its_partitions_once_even_when_it_does_not_answer(monkeypatch):
    from dataflows.kafka_source import KafkaBatchSource
    from dataflows.kafka_topic import KafkaUnavailable

    calls = []

    def down(self):  # test seam: a broker that times out (10 s each in a real run)
        calls.append(1)
        raise KafkaUnavailable("down")

    monkeypatch.setattr(KafkaBatchSource, "list_parts", down)
    src = KafkaBatchSource("127.0.0.1:9", "t")
    assert [src.home_worker(f"x:S{i}", 2) for i in range(5)] == [None] * 5 and len(calls) == 1
    up = KafkaBatchSource("127.0.0.1:9", "t")
    monkeypatch.setattr(KafkaBatchSource, "list_parts", lambda self: (calls.append(1), ["0-t", "1-t"])[1])
    assert {up.home_worker(f"x:S{i}", 2) for i in range(8)} == {0, 1} and len(calls) == 2


def test_worker_0_which_writes_the_store_takes_a_smaller_share_when_asked():
    # worker 0 also turns every record into rows and writes the embedded store: at an even split
    # (64 instruments, 2 processes) process 0 used 22.2 s of CPU and process 1 17.0 s; at 0.5 they
    # were even (bench/throughput.py). Each count: r * n / (r + workers - 1) for worker 0, rounded.
    names = [f"x:S{i:02d}" for i in range(64)]
    placed = [worker_of(k, 2) for k in balanced_keys(names, 2, first_share=0.5).values()]
    assert (placed.count(0), placed.count(1)) == (21, 43)
    placed = [worker_of(k, 3) for k in balanced_keys(names, 3, first_share=0.5).values()]
    assert [placed.count(w) for w in range(3)] == [13, 26, 25]  # 0.5 * 64 / 2.5 = 12.8; the rest 51 = 26 + 25
    # homes are kept up to each worker's share: worker 0 reads them all and keeps only its 21
    keys = balanced_keys(names, 2, lambda name, workers: 0, first_share=0.5)
    assert [n for n, k in keys.items() if worker_of(k, 2) == 0] == sorted(names)[:21]
    # the default (1) is the even split
    assert balanced_keys(names, 2) == balanced_keys(names, 2, first_share=1.0)
    placed = [worker_of(k, 2) for k in balanced_keys(names, 2).values()]
    assert placed.count(0) == placed.count(1) == 32
