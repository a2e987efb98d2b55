"""The sink's writer thread (``sinks.clickhouse._Partition``): the worker hands its rows over and runs
on while the store inserts them; a snapshot returns only once they are stored; a buffer grown past
its bound waits for the store (back-pressure); an insert that failed ends the run at the next batch.

Real embedded store. The seam is ``Store(insert_hook=...)``: here it holds every insert until the
test opens a gate, and writes down the order in which things happened, so each test asserts an
order of events, never a duration. Every step the test waits for runs in a thread joined with a
bound, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import threading
from concurrent.futures import wait

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from operators.records import DeadLetter
from sinks.clickhouse import ClickHouseSink, SinkStats
from sinks.store import StoreError

BOUND_S = 30  # only stops a hang from stalling the suite


def _letters(first: int, n: int) -> list[DeadLetter]:
    return [DeadLetter("test", "0", offset, "x", "bad_json", "not JSON", 1_704_067_200_000)
            for offset in range(first, first + n)]


class Gate:
    """Insert hook: each insert waits until ``opened``; ``log`` gets "insert" as each one ends."""

    def __init__(self, log: list):
        self.log, self.opened, self.began = log, threading.Event(), threading.Event()

    def __call__(self, table: str, rows) -> None:
        self.began.set()
        assert self.opened.wait(BOUND_S)
        self.log.append("insert")


def _part(store, hook, stats: SinkStats, flush_rows: int = 10):
    # flush by rows only (60 s: never by time here), so a test knows which call hands rows over
    sink = ClickHouseSink(store.dsn, store.database, stats, flush_rows=flush_rows, flush_ms=60_000, insert_hook=hook)
    return sink.build_part("sink", "clickhouse", None)


def _in_thread(log: list, name: str, fn, *args) -> threading.Thread:
    def run():
        fn(*args)
        log.append(name)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _stored(store) -> int:
    _, rows = store.query("SELECT count() FROM dead_letters FINAL WHERE source = 'test'")
    return rows[0][0]


def test_the_worker_runs_on_while_the_store_inserts_and_a_snapshot_waits_for_the_rows(store):
    log: list = []
    gate, stats = Gate(log), SinkStats()
    part = _part(store, gate, stats)
    try:
        part.write_batch(_letters(0, 10))  # a flush comes due: handed to the writer, whose insert is held
        assert gate.began.wait(BOUND_S)
        more = _in_thread(log, "write", part.write_batch, _letters(10, 10))
        more.join(BOUND_S)
        assert log == ["write"], "write_batch waited for the store's insert"
        snap = _in_thread(log, "snapshot", part.snapshot)
        gate.opened.set()
        snap.join(BOUND_S)
        # the snapshot handed over the second batch and returned only after both inserts
        assert log == ["write", "insert", "insert", "snapshot"]
        assert stats.rows == {"dead_letters": 20} and _stored(store) == 20
    finally:
        gate.opened.set()
        part.close()


def test_a_buffer_past_its_bound_waits_for_the_store(store):
    log: list = []
    gate, stats = Gate(log), SinkStats()
    part = _part(store, gate, stats)
    try:
        part.write_batch(_letters(0, 10))
        assert gate.began.wait(BOUND_S)
        part.write_batch(_letters(10, 30))  # 30 rows buffered behind the held insert: under the bound (40)
        assert log == []
        full = _in_thread(log, "write", part.write_batch, _letters(40, 10))  # 40: waits for the insert
        full.join(0.5)
        gate.opened.set()
        full.join(BOUND_S)
        assert log[:2] == ["insert", "write"], "write_batch went past the buffer's bound without the store"
    finally:
        gate.opened.set()
        part.close()  # stores what is left
    assert stats.rows == {"dead_letters": 50} and stats.store_error == "" and _stored(store) == 50


def test_a_failed_insert_is_raised_by_the_next_batch_and_nothing_after_it_is_written(store):
    calls: list = []

    def fail(table, rows):
        calls.append(table)
        raise DatabaseError("Code: 53. DB::Exception: Type mismatch. (TYPE_MISMATCH)", code=53)

    stats = SinkStats()
    part = _part(store, fail, stats)
    try:
        part.write_batch(_letters(0, 10))
        assert part.inflight is not None
        wait([part.inflight], timeout=BOUND_S)
        with pytest.raises(StoreError, match="insert into dead_letters failed: Code: 53"):
            part.write_batch(_letters(10, 5))
    finally:
        part.close()  # after a failure: releases the client, retries nothing, never raises
    assert calls == ["dead_letters"] and stats.rows == {} and _stored(store) == 0
