"""Which worker a keyed step runs an instrument on, and keys that spread instruments evenly.

bytewax 0.21 routes every item of a stateful step by its key: worker ``h % workers``, where ``h`` is
Rust's ``DefaultHasher`` (SipHash-1-3 with zero keys) of the key string (its UTF-8 bytes and a
0xFF byte). With few instruments that hash can be uneven (16 instruments on 2 workers: 11 and 5),
and one worker then does most of the per-instrument work. ``balanced_keys`` gives each instrument a
routing key, its own name or ``name#n`` for the smallest ``n`` that lands it on the worker it
should go to: the worker that reads it, where the source knows that (its trades then never cross
processes: the synthetic source, and Kafka topics written with the murmur2 partitioner, whose
partition ``kafka_partition`` computes) up to its share, else the least full one; worker 0, which
also writes the store, can be given a smaller share (``first_share``). Only
the routing changes: records carry their exchange and symbol, and the rows are the same whatever
the keys (the determinism tests).

>>> worker_of("synthetic:S00/USDT:USDT", 1)
0
>>> keys = balanced_keys([f"x:S{i}" for i in range(16)], 2)
>>> sorted(sum(worker_of(k, 2) == w for k in keys.values()) for w in (0, 1))
[8, 8]
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable, Optional

_M = 0xFFFFFFFFFFFFFFFF


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M


def _rounds(v0: int, v1: int, v2: int, v3: int, n: int) -> tuple[int, int, int, int]:
    for _ in range(n):
        v0 = (v0 + v1) & _M
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _M
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _M
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _M
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash13(data: bytes) -> int:
    """SipHash-1-3 with the keys (0, 0): Rust's ``DefaultHasher::new()``."""
    v0, v1, v2, v3 = 0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573
    end = len(data) - len(data) % 8
    for i in range(0, end, 8):
        m = struct.unpack_from("<Q", data, i)[0]
        v3 ^= m
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 1)
        v0 ^= m
    last = (len(data) & 0xFF) << 56
    for j, byte in enumerate(data[end:]):
        last |= byte << (8 * j)
    v3 ^= last
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 1)
    v0 ^= last
    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 3)
    return v0 ^ v1 ^ v2 ^ v3


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (the Java client's ``Utils.murmur2``; librdkafka's ``murmur2`` partitioners),
    as a signed 32-bit integer."""
    m, n = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ n) & 0xFFFFFFFF
    end = n - n % 4
    for i in range(0, end, 4):
        k = (int.from_bytes(data[i:i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = data[end:]
    if rest:
        for j in range(len(rest) - 1, -1, -1):
            h ^= rest[j] << (8 * j)
        h = (h * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: str, partitions: int) -> int:
    """The partition a keyed message goes to with the murmur2 partitioner (the Java client's default;
    ``TradeProducer``'s ``murmur2_random``): the hash's low 31 bits modulo the partition count."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def partition_reader(part: str, parts: Iterable[str], workers: int) -> int:
    """The worker that reads partition ``part`` of a source whose every worker lists all ``parts``:
    bytewax 0.21 makes each partition, in sorted order, primary on the worker with the fewest so far
    (lowest index on a tie; ``calc_primaries`` in its ``src/timely.rs``), which is round-robin."""
    return sorted(parts).index(part) % workers


def worker_of(key: str, workers: int) -> int:
    """The worker (0..workers-1) bytewax 0.21 runs ``key`` on, in a stateful step."""
    return siphash13(key.encode() + b"\xff") % workers


def first_key(name: str, fits: Callable[[str], bool]) -> str:
    """The first of ``name``, ``name#1``, ``name#2``, ... that ``fits``."""
    key, n = name, 0
    while not fits(key):
        n += 1
        key = f"{name}#{n}"
    return key


def key_on_worker(name: str, worker: int, workers: int, taken: frozenset = frozenset()) -> str:
    """``name`` if bytewax routes it to ``worker``, else ``name#n`` for the smallest ``n`` that it does
    and that is not in ``taken`` (another instrument's name or key: two instruments never share one)."""
    return first_key(name, lambda key: worker_of(key, workers) == worker and (key == name or key not in taken))


def balanced_keys(instruments: Iterable[str], workers: int,
                  home: Optional[Callable[[str, int], Optional[int]]] = None,
                  first_share: float = 1.0) -> dict[str, str]:
    """``{instrument: routing key}``: an instrument whose source reads it on a known worker
    (``home(instrument, workers)``) stays there, so its trades never cross processes, while that
    worker has fewer than its share; the others, in sorted order, go to the worker that is least
    full for its share (the lowest index on a tie). With ``first_share`` 1 every share is the even
    one (``ceil(n / workers)``), so no worker holds more, however unevenly the source spreads its
    reading (a Kafka topic's 16 instruments were read 11 / 5 by 2 workers: 8 / 8 here); without
    homes the counts then differ by at most one, with them they can differ more (of 7 instruments
    on 3 workers, 3 read by worker 0 and 3 by worker 1 stay there, and the seventh makes 3 / 3 / 1).
    ``first_share`` < 1: worker 0, which also turns every record into rows and writes the store,
    takes that fraction of what each other worker takes (64 instruments, 2 workers, 0.5: 21 / 43).
    The key is the instrument's own name if that lands there, else ``name#n``. Depends only on the
    set, ``workers``, ``home`` and ``first_share``."""
    names = sorted(set(instruments))
    if workers <= 1:
        return {name: name for name in names}
    share = -(-len(names) // workers)
    cap = [share] * workers
    if first_share < 1:
        cap[0] = round(first_share * len(names) / (first_share + workers - 1))
        cap[1:] = [-(-(len(names) - cap[0]) // (workers - 1))] * (workers - 1)
    load = [0] * workers
    target = {}
    for name in names:
        at = home(name, workers) if home is not None else None
        if at is not None and load[at] < cap[at]:
            target[name] = at
            load[at] += 1
    for name in names:
        if name not in target:
            target[name] = min(range(workers), key=lambda w: (load[w] / cap[w] if cap[w] else float("inf"), w))
            load[target[name]] += 1
    taken = set(names)
    out = {}
    for name in names:
        out[name] = key_on_worker(name, target[name], workers, frozenset(taken))
        taken.add(out[name])
    return out
