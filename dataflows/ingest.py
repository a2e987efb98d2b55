"""The ingest dataflow: exchanges -> ccxt.pro -> Kafka topic ``trades`` (and optionally Parquet).

    ccxt      live feeds (dataflows.venue_source), one partition per exchange (reconnect, gap
              detection, REST backfill)
    kafka     every trade as contract JSON keyed exchange:symbol, events, refused trades and perp
              data (funding, open interest, liquidations) in band on the same key; idempotent
              producer, acks=all
    record    (optional) the normalised tape as Parquet files, replayable with --source replay: trades,
              and perp data in perp files beside them
    heartbeat <data_dir>/heartbeat/ingest.json: per venue and instrument the newest trade (liveness)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import polars as pl
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import DynamicSink, StatelessSinkPartition
import bytewax.operators as op

from dataflows.config import load_settings
from dataflows.heartbeat import HeartbeatSink, heartbeat_dir as default_dir
from dataflows.kafka_topic import TradeProducer, with_perp
from operators.events import encode_in_band
from operators.perp import PerpUpdate
from operators.records import FrameBatch


class _KafkaPart(StatelessSinkPartition[FrameBatch]):
    def __init__(self, brokers: str, topic: str):
        self.producer = TradeProducer(brokers, topic)

    def write_batch(self, items: list[FrameBatch]) -> None:
        for b in items:
            self.producer.send_many(with_perp(b.frame, [e for e in b.events if isinstance(e, PerpUpdate)]))
            self.producer.send_many(encode_in_band(e) for e in b.events if not isinstance(e, PerpUpdate))
        if self.producer.errors:  # a broken broker is an infrastructure failure: stop loudly
            self.producer.flush(10)

    def close(self) -> None:
        self.producer.flush()


class KafkaTapeSink(DynamicSink[FrameBatch]):
    def __init__(self, brokers: str, topic: str):
        self.brokers, self.topic = brokers, topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaPart:
        return _KafkaPart(self.brokers, self.topic)


class _ParquetPart(StatelessSinkPartition[FrameBatch]):
    def __init__(self, directory: Path, rows: int, worker: int):
        self.dir, self.rows, self.worker = directory, rows, worker
        self.dir.mkdir(parents=True, exist_ok=True)
        self.frames: list[pl.DataFrame] = []
        self.perps: list[PerpUpdate] = []
        self.n = 0

    def write_batch(self, items: list[FrameBatch]) -> None:
        for b in items:
            if b.frame.height:
                self.frames.append(b.frame.drop("offset"))
                self.n += b.frame.height
            self.perps += [e for e in b.events if isinstance(e, PerpUpdate)]
        if self.n + len(self.perps) >= self.rows:
            self._write()

    def _write(self) -> None:
        stamp = int(time.time() * 1000)
        if self.frames:
            df = pl.concat(self.frames)
            self._file(f"tape-{int(df['ts'].min())}-{stamp}-w{self.worker}.parquet", df)
        if self.perps:  # funding, open interest, liquidations: a perp file (operators.tape_files.perp_updates)
            df = perp_frame(self.perps)
            self._file(f"perp-{int(df['ts'].min())}-{stamp}-w{self.worker}.parquet", df)
        self.frames, self.perps, self.n = [], [], 0

    def _file(self, name: str, df: pl.DataFrame) -> None:
        tmp = self.dir / (name + ".part")
        df.write_parquet(tmp)
        tmp.rename(self.dir / name)  # readers never see half a file

    def close(self) -> None:
        self._write()


def perp_frame(updates: list[PerpUpdate]) -> pl.DataFrame:
    """Perp updates as the rows of a perp file: a ``perp`` column naming the kind and the update's
    fields (its position among the trades, ``seq``, is the live reader's and is not kept: a replay
    places each update by its ts)."""
    fields = [f for f in PerpUpdate.__struct_fields__ if f not in ("kind", "seq")]
    schema = {"perp": pl.String, "exchange": pl.String, "symbol": pl.String, "ts": pl.Int64, "rate": pl.Float64,
              "funding_time": pl.Int64, "mark_price": pl.Float64, "index_price": pl.Float64,
              "open_interest": pl.Float64, "oi_value": pl.Float64, "side": pl.String, "price": pl.Float64,
              "amount": pl.Float64, "source": pl.String}
    return pl.DataFrame([{"perp": u.kind, **{f: getattr(u, f) for f in fields}} for u in updates], schema=schema)


class ParquetTapeSink(DynamicSink[FrameBatch]):
    """The normalised tape as Parquet files of about ``rows`` trades (contract columns), and the
    perp updates that came with them as perp files beside them (``perp-*.parquet``)."""

    def __init__(self, directory: Path, rows: int = 200_000):
        self.directory, self.rows = Path(directory), rows

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ParquetPart:
        return _ParquetPart(self.directory, self.rows, worker_index)


def build_ingest_flow(source: Source, kafka: Any, record: Optional[Any] = None,
                      heartbeat_dir: Optional[Path] = None) -> Dataflow:
    """``heartbeat_dir``: where the liveness file goes (dataflows/heartbeat.py); default
    ``<data_dir>/heartbeat`` of the environment's settings (TAPEFLOW_DATA_DIR)."""
    if heartbeat_dir is None:
        heartbeat_dir = default_dir(load_settings().data_dir)
    flow = Dataflow("tapeflow_ingest")
    batches = op.input("ccxt", flow, source)
    op.output("kafka", batches, kafka)
    if record is not None:
        op.output("record", batches, record)
    op.output("heartbeat", batches, HeartbeatSink(heartbeat_dir, getattr(source, "symbols", None)))
    return flow
