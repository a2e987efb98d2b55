"""The ingest's heartbeat: a small JSON file, ``<data_dir>/heartbeat/ingest.json``, replaced
atomically, that says how far the ingest has come.

The ingest writes to Kafka, not ClickHouse, so its progress cannot be read from the store. The
heartbeat lists every configured venue and instrument with the exchange time of its newest trade
and the wall time it was received; ``tapeflow health --ingest`` fails when a venue has received no
trade for longer than a bound (a dead websocket keeps the process alive but the file stops
moving), and ``tapeflow status`` shows it. Reachability of Kafka says nothing of this.

A file per worker (``ingest.json`` for worker 0, ``ingest-w<i>.json`` for the others); readers
merge them. Written at start, then within ``every_s`` (0.2 s) of every batch, and at close: a
file that stops changing means no batch has come since.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import polars as pl
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from operators.perp import PerpUpdate
from operators.records import FrameBatch

HEARTBEAT_DIR = "heartbeat"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def heartbeat_dir(data_dir: Path) -> Path:
    return Path(data_dir) / HEARTBEAT_DIR


def write_atomic(path: Path, obj: dict) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


class IngestProgress:
    """What the ingest has seen, per venue (the source partition: one websocket per exchange) and
    per instrument. Pure state; ``observe`` takes one batch."""

    def __init__(self, feeds: dict[str, list[str]], now_ms: Optional[int] = None):
        self.started_ms = now_ms if now_ms is not None else wall_ms()
        self.updated_ms = self.started_ms
        self.trades_total = 0
        self.venues: dict[str, dict] = {v: self._venue(syms) for v, syms in feeds.items()}
        self.feeds: dict[str, dict] = {f"{v}:{s}": self._feed() for v, syms in feeds.items() for s in syms}

    @staticmethod
    def _venue(symbols: list[str]) -> dict:
        return {"symbols": list(symbols), "trades": 0, "last_trade_ts": None, "last_recv_ms": None,
                "last_batch_ms": None, "events": {}, "last_event": None}

    @staticmethod
    def _feed() -> dict:
        return {"trades": 0, "last_trade_ts": None, "last_recv_ms": None}

    def observe(self, batch: FrameBatch, now_ms: Optional[int] = None) -> None:
        now = now_ms if now_ms is not None else wall_ms()
        self.updated_ms = now
        venue = self.venues.setdefault(batch.partition, self._venue([]))
        venue["last_batch_ms"] = now
        for ev in batch.events:
            if isinstance(ev, PerpUpdate):  # data, not an event of the feed
                venue["perp_updates"] = venue.get("perp_updates", 0) + 1
                continue
            kind = getattr(ev, "kind", type(ev).__name__)
            venue["events"][kind] = venue["events"].get(kind, 0) + 1
            venue["last_event"] = {"kind": kind, "at_ms": now, "reason": str(getattr(ev, "reason", ""))[:200]}
        frame = batch.frame
        if frame is None or frame.height == 0:
            return
        recv = pl.col("recv_ts").max() if "recv_ts" in frame.columns else pl.lit(batch.recv_ts)
        per = frame.group_by("exchange", "symbol").agg(pl.len().alias("n"), pl.col("ts").max().alias("ts"),
                                                       recv.alias("recv"))
        for ex, sym, n, ts, rcv in per.iter_rows():
            rcv = int(rcv) if rcv is not None else batch.recv_ts
            f = self.feeds.setdefault(f"{ex}:{sym}", self._feed())
            f["trades"] += n
            f["last_trade_ts"] = ts if f["last_trade_ts"] is None else max(f["last_trade_ts"], ts)
            f["last_recv_ms"] = rcv if f["last_recv_ms"] is None else max(f["last_recv_ms"], rcv)
            venue["trades"] += n
            venue["last_trade_ts"] = ts if venue["last_trade_ts"] is None else max(venue["last_trade_ts"], ts)
            venue["last_recv_ms"] = rcv if venue["last_recv_ms"] is None else max(venue["last_recv_ms"], rcv)
            self.trades_total += n

    def to_dict(self) -> dict:
        return {"kind": "ingest", "pid": os.getpid(), "host": socket.gethostname(), "started_ms": self.started_ms,
                "updated_ms": self.updated_ms, "trades_total": self.trades_total, "venues": self.venues,
                "feeds": self.feeds}


class _HeartbeatPart(StatelessSinkPartition[FrameBatch]):
    """Writes at most every ``every_s``; a batch that comes sooner is written by a timer when the
    interval is up, so the file never misses the last batches before a silence (which is what a
    reader is looking for)."""

    def __init__(self, path: Path, feeds: dict[str, list[str]], every_s: float):
        self.path, self.every_s = path, every_s
        self.progress = IngestProgress(feeds)
        self.lock = threading.Lock()
        self.timer: Optional[threading.Timer] = None
        self.written = 0.0
        with self.lock:
            self._write()

    def _write(self) -> None:  # with the lock held
        write_atomic(self.path, self.progress.to_dict())
        self.written = time.monotonic()

    def _flush(self) -> None:
        with self.lock:
            self.timer = None
            self._write()

    def write_batch(self, items: list[FrameBatch]) -> None:
        with self.lock:
            for b in items:
                self.progress.observe(b)
            wait = self.every_s - (time.monotonic() - self.written)
            if wait <= 0:
                self._write()
            elif self.timer is None:
                self.timer = threading.Timer(wait, self._flush)
                self.timer.daemon = True
                self.timer.start()

    def close(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._write()


class HeartbeatSink(DynamicSink[FrameBatch]):
    """Writes the ingest heartbeat file(s) into ``directory``; ``feeds`` = configured
    {venue: [symbols]} so a venue that never delivers a trade is listed too."""

    def __init__(self, directory: Path, feeds: Optional[dict[str, list[str]]] = None, every_s: float = 0.2):
        self.directory, self.feeds, self.every_s = Path(directory), dict(feeds or {}), every_s

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _HeartbeatPart:
        name = "ingest.json" if worker_index == 0 else f"ingest-w{worker_index}.json"
        return _HeartbeatPart(self.directory / name, self.feeds, self.every_s)


def read_ingest(directory: Path) -> Optional[dict]:
    """The ingest heartbeat files of ``directory`` merged into one view (None if there is none):
    per venue and feed the newest times and summed trade counts; ``updated_ms`` the newest file's."""
    files = sorted(Path(directory).glob("ingest*.json"))
    beats: list[dict[str, Any]] = []
    for f in files:
        try:
            beats.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue  # replaced while we read it: the next look sees the new one
    if not beats:
        return None

    def newest(a, b):
        return b if a is None else a if b is None else max(a, b)

    out: dict[str, Any] = {"files": [str(f) for f in files], "started_ms": min(b["started_ms"] for b in beats),
                           "updated_ms": max(b["updated_ms"] for b in beats),
                           "trades_total": sum(b.get("trades_total", 0) for b in beats), "venues": {}, "feeds": {}}
    for b in beats:
        for name, v in b.get("venues", {}).items():
            m = out["venues"].setdefault(name, {"symbols": [], "trades": 0, "last_trade_ts": None,
                                                "last_recv_ms": None, "last_batch_ms": None, "last_event": None})
            m["symbols"] = sorted(set(m["symbols"]) | set(v.get("symbols", [])))
            m["trades"] += v.get("trades", 0)
            for k in ("last_trade_ts", "last_recv_ms", "last_batch_ms"):
                m[k] = newest(m[k], v.get(k))
            ev = v.get("last_event")
            if ev and (m["last_event"] is None or ev["at_ms"] > m["last_event"]["at_ms"]):
                m["last_event"] = ev
        for name, f in b.get("feeds", {}).items():
            m = out["feeds"].setdefault(name, {"trades": 0, "last_trade_ts": None, "last_recv_ms": None})
            m["trades"] += f.get("trades", 0)
            for k in ("last_trade_ts", "last_recv_ms"):
                m[k] = newest(m[k], f.get(k))
    return out
