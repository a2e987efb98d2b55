"""bytewax sources: synthetic and replay (Kafka and ccxt live in their own modules).

Every source is a ``FixedPartitionedSource`` (recovery-safe; see notes/bytewax-0.21.md §5) that
hands over batches: ``FrameBatch`` of columns here. A partition's snapshot is its position, so a
restarted flow continues exactly where the last completed epoch left it.

Pacing: ``speed=None`` (or 0) emits as fast as the pipeline takes it; ``speed=k`` releases
trades when their event time is due at k times real time, sleeping through ``next_awake``
instead of blocking the worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from operators import synthetic as syn
from operators.trades import FrameBatch

Progress = Callable[[str, int, int, int], None]  # (partition, done, total, rows released now)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Pacer:
    """Maps event time to wall time at ``speed`` x real time, anchored at the first trade."""

    def __init__(self, speed: Optional[float]):
        self.speed = speed or None
        self.anchor: Optional[tuple[float, int]] = None  # (wall seconds, event ms)

    def due_event_ms(self, first_event_ms: int) -> Optional[int]:
        if self.speed is None:
            return None
        if self.anchor is None:
            self.anchor = (time.time(), first_event_ms)
        wall0, ev0 = self.anchor
        return ev0 + int((time.time() - wall0) * 1000 * self.speed)

    def wall_for(self, event_ms: int) -> Optional[datetime]:
        if self.speed is None or self.anchor is None:
            return None
        wall0, ev0 = self.anchor
        return datetime.fromtimestamp(wall0 + (event_ms - ev0) / 1000 / self.speed, tz=timezone.utc)


def _event_ts(frame: pl.DataFrame) -> np.ndarray:
    return frame["ts"].cast(pl.Int64, strict=False).fill_null(-1).to_numpy()


class _FramePartition(StatefulSourcePartition):
    """Releases the frames ``_load`` returns (columns ts and offset among them) as FrameBatches,
    paced when a speed is set: rows are released in file order up to the first row not yet due."""

    def __init__(self, source_name: str, part: str, speed: Optional[float]):
        self.source_name, self.part = source_name, part
        self.pacer = _Pacer(speed)
        self.pending: Optional[pl.DataFrame] = None

    def _load(self) -> Optional[pl.DataFrame]:
        raise NotImplementedError

    def _released(self, frame: pl.DataFrame) -> None:
        raise NotImplementedError

    def next_batch(self) -> list[FrameBatch]:
        if self.pending is None:
            self.pending = self._load()
            if self.pending is None:
                raise StopIteration
        frame, ts = self.pending, _event_ts(self.pending)
        n = frame.height
        if n and self.pacer.speed is not None:
            due = self.pacer.due_event_ms(int(ts[0]))
            not_due = ts > due
            n = int(np.argmax(not_due)) if not_due.any() else frame.height
        ready, rest = frame.slice(0, n), frame.slice(n)
        self.pending = rest if rest.height else None
        if ready.height == 0:
            return []
        self._released(ready)
        return [FrameBatch(self.source_name, self.part, ready, now_ms())]

    def next_awake(self) -> Optional[datetime]:
        if self.pending is not None:
            return self.pacer.wall_for(int(_event_ts(self.pending.head(1))[0]))  # only the next row
        return None


# ---------------------------------------------------------------------------------------------
# synthetic


class _SyntheticPartition(_FramePartition):
    """Several symbols generated in lockstep, minute by minute, merged in time order (like a Kafka
    partition carrying several keys). Snapshot: per symbol, (generator state at the start of what is
    not fully emitted, next offset to emit)."""

    def __init__(self, src: "SyntheticSource", part: str, specs: list[syn.InstrumentSpec],
                 resume: Optional[dict]):
        super().__init__(src.source_name, part, src.speed)
        self.src, self.specs = src, specs
        self.at = {sp.symbol: resume[sp.symbol][0] if resume else syn.initial_state(sp) for sp in specs}
        self.emitted = {sp.symbol: resume[sp.symbol][1] if resume else 0 for sp in specs}
        self.base = dict(self.at)
        self.total_minutes = (src.end_ms - src.start_ms) // 60_000

    def _minute(self) -> int:
        return min(st.minute for st in self.at.values())

    def _load(self) -> Optional[pl.DataFrame]:
        while self._minute() < self.total_minutes:
            self.base = dict(self.at)
            parts, codes, n = [], [], 0
            while n < self.src.batch_size and self._minute() < self.total_minutes:
                for code, sp in enumerate(self.specs):
                    cols, self.at[sp.symbol] = syn.generate_minute(sp, self.src.seed, self.src.start_ms,
                                                                   self.at[sp.symbol])
                    if len(cols["ts"]):
                        parts.append(cols)
                        codes.append(np.full(len(cols["ts"]), code, dtype=np.int32))
                        n += len(cols["ts"])
                if self.pacer.speed is not None:
                    break  # paced: a minute at a time
            if not parts:
                continue
            names = {i: sp.symbol for i, sp in enumerate(self.specs)}
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            cols["symbol"] = np.concatenate(codes)
            frame = pl.DataFrame(cols).sort("ts", maintain_order=True).with_columns(
                pl.col("symbol").replace_strict(names, return_dtype=pl.String)
            ).filter(pl.col("offset") >= pl.col("symbol").replace_strict(self.emitted, return_dtype=pl.Int64))
            if frame.height:
                return frame.select(
                    pl.lit(self.src.exchange).alias("exchange"), "symbol",
                    pl.col("id").cast(pl.String), "ts", "price", "amount",
                    pl.when(pl.col("is_buy")).then(pl.lit("buy")).otherwise(pl.lit("sell")).alias("side"),
                    "offset",
                )
        self.base = dict(self.at)
        return None

    def _released(self, frame: pl.DataFrame) -> None:
        last = frame.group_by("symbol").agg(pl.col("offset").max())
        for sym, off in last.iter_rows():
            self.emitted[sym] = int(off) + 1
        if self.pending is None:
            self.base = dict(self.at)
        if self.src.progress:
            self.src.progress(self.part, min(st.minute for st in self.base.values()), self.total_minutes,
                              frame.height)

    def snapshot(self) -> dict:
        return {sym: (self.base[sym], self.emitted[sym]) for sym in self.base}


@dataclass
class SyntheticSource(FixedPartitionedSource[FrameBatch, dict]):
    """Seeded synthetic trades over [start_ms, end_ms). Symbols are spread over ``partitions``
    partitions (symbol i -> partition i mod P; default min(4, symbols)), each a time-ordered mix of
    its symbols, like a Kafka partition carrying several keys."""

    symbols: list[str]
    start_ms: int
    end_ms: int
    seed: int = 7
    exchange: str = "synthetic"
    rate: Optional[float] = None  # parent orders per second per symbol (None: the symbol's default)
    batch_size: int = 20_000
    speed: Optional[float] = None
    progress: Optional[Progress] = None
    source_name: str = "synthetic"
    partitions: Optional[int] = None

    def _n_parts(self) -> int:
        return max(1, min(self.partitions or 4, len(self.symbols)))

    def list_parts(self) -> list[str]:
        return [f"synthetic-{i}" for i in range(self._n_parts())]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[dict]):
        i, n = int(for_part.rsplit("-", 1)[1]), self._n_parts()
        specs = [syn.spec_for(sym, self.rate) for k, sym in enumerate(self.symbols) if k % n == i]
        return _SyntheticPartition(self, for_part, specs, resume_state)


# ---------------------------------------------------------------------------------------------
# replay

CCXT_COLUMNS = ["timestamp", "id", "type", "side", "price", "amount", "cost"]
BINANCE_COLUMNS = ["id", "price", "qty", "quote_qty", "time", "is_buyer_maker", "is_best_match"]


class ReplayFormatError(ValueError):
    pass


def _csv_header(path: Path) -> list[str]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    return [c.strip().strip('"') for c in first.split(",")]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def open_tape(path: Path, batch_size: int):
    """Iterator of pyarrow RecordBatches with the file's own columns, plus its total rows (or None).

    CSV: with a header (ccxt trade columns, optionally extra columns such as an index or a
    ``date``) or headerless Binance public-data trades. All CSV columns are read as text, so a bad
    value becomes a dead letter instead of stopping the replay. Parquet: as stored.
    """
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith(".parquet") or suffix.endswith(".pq"):
        pf = pq.ParquetFile(path)
        return pf.iter_batches(batch_size=batch_size), pf.metadata.num_rows
    if not (suffix.endswith(".csv") or suffix.endswith(".csv.gz")):
        raise ReplayFormatError(f"{path}: unknown tape format (use .csv, .csv.gz or .parquet)")
    header = _csv_header(path)
    if header and all(_is_number(h) for h in header[:2]):
        names = BINANCE_COLUMNS[: len(header)]
        read = pacsv.ReadOptions(column_names=names, block_size=1 << 22)
    else:
        names = [h if h else f"_col{i}" for i, h in enumerate(header)]
        read = pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 22)
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
    reader = pacsv.open_csv(path, read_options=read, convert_options=conv)
    return (b for b in reader), None


def normalise_tape(df: pl.DataFrame, exchange: Optional[str], symbol: Optional[str], path: Path) -> pl.DataFrame:
    """File columns -> FrameBatch columns (exchange, symbol, id, ts, price, amount, side, ...)."""
    cols = set(df.columns)
    out = {}
    if "is_buyer_maker" in cols:  # Binance public data: taker is the seller when the buyer made
        maker = pl.col("is_buyer_maker").cast(pl.String).str.to_lowercase()
        out["side"] = pl.when(maker == "true").then(pl.lit("sell")).when(maker == "false").then(
            pl.lit("buy")).otherwise(maker)
        out["amount"] = pl.col("qty")
        t = pl.col("time").cast(pl.Int64, strict=False)
        out["ts"] = pl.when(t > 10**14).then(t // 1000).otherwise(t).cast(pl.String)  # µs dumps (2025+)
        out["id"] = pl.col("id")
        out["price"] = pl.col("price")
    else:
        ts_col = "ts" if "ts" in cols else "timestamp"
        missing = [c for c in (ts_col, "id", "side", "price", "amount") if c not in cols]
        if missing:
            raise ReplayFormatError(f"{path}: columns {missing} missing; need ccxt trade columns "
                                    f"{CCXT_COLUMNS} (found {sorted(cols)})")
        out.update(ts=pl.col(ts_col), id=pl.col("id"), side=pl.col("side"), price=pl.col("price"),
                   amount=pl.col("amount"))
        for opt in ("trader", "recv_ts"):
            if opt in cols:
                out[opt] = pl.col(opt)
    for name, given in (("exchange", exchange), ("symbol", symbol)):
        if given is not None:
            out[name] = pl.lit(given)
        elif name in cols:
            out[name] = pl.col(name)
        else:
            raise ReplayFormatError(f"{path}: no {name} column; pass --{name}")
    return df.select(**out)


class _ReplayPartition(_FramePartition):
    """Snapshot: the offset (data row index) of the next row to emit."""

    def __init__(self, src: "ReplaySource", path: Path, part: str, resume: int):
        super().__init__(src.source_name, part, src.speed)
        self.src, self.path, self.pos = src, path, resume
        self.batches, self.total = open_tape(path, src.batch_size)
        self.read = 0  # rows read from the file so far

    def _load(self) -> Optional[pl.DataFrame]:
        for rb in self.batches:
            df = pl.from_arrow(rb)
            assert isinstance(df, pl.DataFrame)
            first = self.read
            self.read += df.height
            if self.read <= self.pos:
                continue  # before the resume position
            skip = max(0, self.pos - first)
            df = normalise_tape(df.slice(skip), self.src.exchange, self.src.symbol, self.path)
            return df.with_columns(pl.int_range(first + skip, self.read, dtype=pl.Int64).alias("offset"))
        return None

    def _released(self, frame: pl.DataFrame) -> None:
        self.pos = int(frame["offset"][-1]) + 1
        if self.src.progress:
            self.src.progress(self.part, self.pos, self.total or 0, frame.height)

    def snapshot(self) -> int:
        return self.pos


@dataclass
class ReplaySource(FixedPartitionedSource[FrameBatch, int]):
    """Recorded tapes (ccxt CSV, Parquet, Binance public-data CSV); one partition per file."""

    paths: list[Path]
    exchange: Optional[str] = None
    symbol: Optional[str] = None
    batch_size: int = 20_000
    speed: Optional[float] = None
    progress: Optional[Progress] = None
    source_name: str = "replay"

    def __post_init__(self) -> None:
        for p in self.paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"replay file not found: {p}")

    def list_parts(self) -> list[str]:
        return [f"{i}:{Path(p).name}" for i, p in enumerate(self.paths)]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]):
        idx = int(for_part.split(":", 1)[0])
        return _ReplayPartition(self, Path(self.paths[idx]), for_part, resume_state or 0)
