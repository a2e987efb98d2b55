"""bytewax sources: synthetic and replay (Kafka and ccxt live in their own modules).

Every source is a ``FixedPartitionedSource`` (recovery-safe; see notes/bytewax-0.21.md §5) that
hands over batches: ``FrameBatch`` of columns here. A partition's snapshot is its position, so a
restarted flow continues exactly where the last completed epoch left it.

Pacing: ``speed=None`` (or 0) emits as fast as the pipeline takes it; ``speed=k`` releases
trades when their event time is due at k times real time, sleeping through ``next_awake``
instead of blocking the worker.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import msgspec
import numpy as np
import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from operators import synthetic as syn
from operators.trades import FrameBatch

Progress = Callable[[str, int, int, int], None]  # (partition, done, total, rows released now)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Pacer:
    """Maps event time to wall time at ``speed`` x real time, anchored at the first trade."""

    def __init__(self, speed: Optional[float], anchor_event_ms: Optional[int] = None):
        self.speed = speed or None
        self.anchor_event_ms = anchor_event_ms  # None: the first trade's
        self.anchor: Optional[tuple[float, int]] = None  # (wall seconds, event ms)

    def due_event_ms(self, first_event_ms: int) -> Optional[int]:
        if self.speed is None:
            return None
        if self.anchor is None:
            self.anchor = (time.time(), first_event_ms if self.anchor_event_ms is None else self.anchor_event_ms)
        wall0, ev0 = self.anchor
        return ev0 + int((time.time() - wall0) * 1000 * self.speed)

    def wall_for(self, event_ms: int) -> Optional[datetime]:
        if self.speed is None or self.anchor is None:
            return None
        wall0, ev0 = self.anchor
        return datetime.fromtimestamp(wall0 + (event_ms - ev0) / 1000 / self.speed, tz=timezone.utc)


_NO_ROWS = pl.DataFrame(schema={"exchange": pl.String, "symbol": pl.String, "id": pl.String, "ts": pl.Int64,
                                "price": pl.Float64, "amount": pl.Float64, "side": pl.String, "offset": pl.Int64})


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
                rest = self._take_events(final=True)  # e.g. perp data after the last trade
                if rest:
                    return [FrameBatch(self.source_name, self.part, _NO_ROWS, now_ms(), rest)]
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
        return [FrameBatch(self.source_name, self.part, ready, now_ms(), self._take_events())]

    def _take_events(self, final: bool = False) -> list:
        """Events to attach to the next released batch (none by default); ``final``: the input has
        ended, give everything still held."""
        return []

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
        self.pacer = src.pacer()  # one wall clock for every partition, like a live feed
        self.src, self.specs = src, specs
        self.at = {sp.symbol: resume[sp.symbol][0] if resume else syn.initial_state(sp) for sp in specs}
        self.emitted = {sp.symbol: resume[sp.symbol][1] if resume else 0 for sp in specs}
        self.base = dict(self.at)
        self.total_minutes = (src.end_ms - src.start_ms) // 60_000
        self.perp_wait: list = []  # perp updates generated, not yet released (after the trades before them)

    def _minute(self) -> int:
        return min(st.minute for st in self.at.values())

    def _load(self) -> Optional[pl.DataFrame]:
        while self._minute() < self.total_minutes:
            self.base = dict(self.at)
            parts, codes, n = [], [], 0
            while n < self.src.batch_size and self._minute() < self.total_minutes:
                for code, sp in enumerate(self.specs):
                    before = self.at[sp.symbol]
                    cols, self.at[sp.symbol] = syn.generate_minute(sp, self.src.seed, self.src.start_ms, before)
                    if self.src.perp:  # resumed: what came after the last emitted trade again (deduplicated)
                        self.perp_wait += [u for u in syn.perp_minute(sp, self.src.seed, self.src.start_ms, before,
                                                                      self.at[sp.symbol], cols["ts"], self.src.exchange)
                                           if u.seq >= self.emitted[sp.symbol]]
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

    def _take_events(self, final: bool = False) -> list:
        """Perp updates whose trades before them are all released."""
        if not self.perp_wait:
            return []
        out = [u for u in self.perp_wait if final or u.seq <= self.emitted[u.symbol]]
        if out:
            self.perp_wait = [u for u in self.perp_wait if u.seq > self.emitted[u.symbol]]
        return out

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
    perp: bool = True  # also funding, open interest and liquidations (operators.synthetic.perp_minute)

    def _n_parts(self) -> int:
        return max(1, min(self.partitions or 4, len(self.symbols)))

    def instruments(self) -> list[str]:
        return [f"{self.exchange}:{s}" for s in self.symbols]

    def pacer(self) -> _Pacer:
        """The partitions' shared pacer (this process): anchored once, at ``start_ms``, so paced
        partitions do not drift apart by when each was first polled."""
        if getattr(self, "_pacer", None) is None:
            self._pacer = _Pacer(self.speed, anchor_event_ms=self.start_ms)
        return self._pacer

    def list_parts(self) -> list[str]:
        return [f"synthetic-{i}" for i in range(self._n_parts())]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[dict]):
        i, n = int(for_part.rsplit("-", 1)[1]), self._n_parts()
        specs = [syn.spec_for(sym, self.rate) for k, sym in enumerate(self.symbols) if k % n == i]
        return _SyntheticPartition(self, for_part, specs, resume_state)


# ---------------------------------------------------------------------------------------------
# replay
#
# A replay is not a live stream: a file can be read in any order, so the replay reads every file
# whole (Polars, in memory), normalises it (column mapping, time unit, identity), and releases the
# trades of all files in ONE partition sorted by a total order that does not depend on the file
# order. Memory limit: the whole tape is held as one Polars frame. Measured on a shuffled 2M-trade
# ccxt CSV (78 MB): 2.8 s to load and sort, ~650 MB peak while sorting (~330 bytes a trade), 74 MB
# held during the replay. So ~10M trades need a few GB at load; for bigger tapes, split them by
# time and publish the parts in order with `tapeflow replay PART --to kafka`, then run --source kafka.

CCXT_COLUMNS = ["timestamp", "id", "type", "side", "price", "amount", "cost"]
BINANCE_COLUMNS = ["id", "price", "qty", "quote_qty", "time", "is_buyer_maker", "is_best_match"]
KRAKEN_COLUMNS = ["timestamp", "price", "volume"]  # Kraken's trade-history export: seconds, no id/side

TS_COLUMNS = ("ts", "timestamp", "time", "datetime", "date")  # first present is the event time
AMOUNT_COLUMNS = ("amount", "qty", "quantity", "volume", "size")
ID_COLUMNS = ("id", "trade_id")

#: Epoch seconds of 1990-01-01 and 2100-01-01: a time column's values must fall in this span in
#: exactly one of the units below (the spans of the units are a factor ~150 apart, never overlap).
PLAUSIBLE_S = (631_152_000, 4_102_444_800)
TIME_UNITS = (("s", 1), ("ms", 10**3), ("us", 10**6), ("ns", 10**9))
UNIT_SHARE = 0.9  # the file's unit must hold this share of its numeric times, else refuse


class ReplayFormatError(ValueError):
    """A replay file that cannot be used as it is. The message is one line: the file, what was
    found and what to do (the CLI prints it and exits 2)."""


def _err(path, text: str) -> ReplayFormatError:
    return ReplayFormatError(f"{path}: {' '.join(str(text).split())}")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _few(values: list, n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "") if values else "none"


# --- reading -----------------------------------------------------------------------------------


def _sniff_text(path: Path) -> str:
    """The first 64 KiB of a CSV (decompressed for .gz) as text; binary content is refused."""
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
            head = f.read(1 << 16)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise _err(path, f"cannot be read as gzip ({err}); name it .csv if it is not compressed") from None
    hint = ""
    if head.startswith(b"PAR1"):
        hint = "; it is a Parquet file: name it .parquet"
    elif head.startswith(b"\x1f\x8b"):
        hint = "; it is gzip-compressed: name it .csv.gz"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise _err(path, f"is not a text CSV (binary content){hint or '; a replay CSV is comma-separated text'}")
    return text.lstrip("\ufeff")


def _read_csv(path: Path) -> tuple[pl.DataFrame, str]:
    text = _sniff_text(path)
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise _err(path, "the file is empty (no header, no rows); export trades into it or leave it out")
    import pyarrow as pa  # here: ~50 MB resident that only a CSV replay needs
    import pyarrow.csv as pacsv

    header = [c.strip() for c in next(csv.reader([first]))]
    fmt = "csv"
    if len(header) >= 2 and all(_is_number(h) for h in header[:2]):  # headerless dumps
        if len(header) == 3:
            names, fmt = KRAKEN_COLUMNS, "kraken-csv"
        elif len(header) in (6, 7):
            names, fmt = BINANCE_COLUMNS[: len(header)], "binance-csv"
        else:
            raise _err(path, f"headerless CSV with {len(header)} columns; known headerless layouts are Kraken "
                             f"({','.join(KRAKEN_COLUMNS)}) and Binance public data ({','.join(BINANCE_COLUMNS[:6])}"
                             f"[,is_best_match]); otherwise add a header line with ccxt names {','.join(CCXT_COLUMNS)}")
        read = pacsv.ReadOptions(column_names=names, block_size=1 << 22)
    else:
        names = [h if h else f"_col{i}" for i, h in enumerate(header)]
        read = pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 22)
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
    try:
        table = pacsv.read_csv(path, read_options=read, convert_options=conv)
    except (pa.ArrowInvalid, OSError) as err:
        raise _err(path, f"cannot be read as CSV: {str(err).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise _err(path, "has a header but no trade rows; export trades into it or leave it out")
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    return df, fmt


def _read_parquet(path: Path) -> tuple[pl.DataFrame, str]:
    try:
        df = pl.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - polars raises several kinds for a broken file
        raise _err(path, f"is not a readable Parquet file ({str(err).splitlines()[0]})") from None
    if df.height == 0:
        raise _err(path, "has no rows; export trades into it or leave it out")
    return df, "parquet"


def open_tape(path) -> tuple[pl.DataFrame, str]:
    """The whole file as a frame with its own columns, and its format (``csv``, ``kraken-csv``,
    ``binance-csv``, ``parquet``).

    CSV: with a header (ccxt trade columns, optionally extra columns such as an index or a
    ``date``), or headerless Binance public-data trades (6-7 columns) or Kraken's trade history
    (3 columns: timestamp in seconds, price, volume; ids are derived and sides inferred by the tick
    rule, see ``_sort_tape`` and ``_tick_sides``). All CSV columns are read as text, so a bad
    value becomes a dead letter instead of stopping the replay. Parquet: as stored. An empty,
    binary or header-only file, or an unknown extension, is a ``ReplayFormatError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay file not found: {path}")
    name = path.name.lower()
    if not name.endswith((".csv", ".csv.gz", ".parquet", ".pq")):
        raise _err(path, f"unknown tape format {''.join(path.suffixes) or '(no extension)'!r}; "
                         "use .csv, .csv.gz or .parquet")
    if path.stat().st_size == 0:
        raise _err(path, "the file is empty; export trades into it or leave it out")
    return _read_parquet(path) if name.endswith((".parquet", ".pq")) else _read_csv(path)


# --- time column ---------------------------------------------------------------------------------


def _unit_of(mag: pl.Expr) -> pl.Expr:
    """Per value: the epoch unit whose 1990..2100 span holds it (null: none)."""
    lo, hi = PLAUSIBLE_S
    out = pl.lit(None, dtype=pl.String)
    for unit, per_s in reversed(TIME_UNITS):
        out = pl.when((mag >= lo * per_s) & (mag <= hi * per_s)).then(pl.lit(unit)).otherwise(out)
    return out


def epoch_ms(col: pl.Series, path, name: str) -> tuple[pl.Series, str]:
    """A time column -> (Int64 epoch ms, null where a value cannot be read; the unit found).

    ``Datetime``/``Timestamp`` of any unit and time zone converts exactly. Numbers (or numeric
    text) are integer or decimal epoch seconds, ms, µs or ns; the unit is decided ONCE per file,
    from the median magnitude, and must hold at least 90 % of the values: one stray row is then
    converted with the file's unit and becomes a dead letter (ts out of range) downstream instead
    of being silently re-scaled. Mostly non-numeric text is tried as ISO-8601 (naive = UTC).
    Integers are truncated to the ms, decimals rounded to the µs and then truncated. When the
    unit cannot be decided, a one-line ``ReplayFormatError`` says what was found.
    """
    dt = col.dtype
    if isinstance(dt, pl.Datetime):
        tz = f", {dt.time_zone}" if dt.time_zone else ""
        return col.dt.epoch("ms").rename("_ms"), f"datetime[{dt.time_unit}{tz}]"
    if dt == pl.Date:
        raise _err(path, f"column {name!r} holds dates without a time of day; a trade needs its time "
                         "(epoch s/ms/µs/ns or a datetime)")
    if dt == pl.String:
        text = col.str.strip_chars()
        text = pl.select(pl.when(text.str.len_bytes() > 0).then(text)).to_series()
        ints, floats = text.cast(pl.Int64, strict=False), text.cast(pl.Float64, strict=False)
    elif dt.is_numeric():
        text = None
        ints = col.cast(pl.Int64) if dt.is_integer() else None
        floats = col.cast(pl.Float64)
    else:
        raise _err(path, f"column {name!r} has type {dt}, not a time (need epoch s/ms/µs/ns or a datetime)")
    floats = pl.select(pl.when(floats.is_finite()).then(floats)).to_series()
    present = int((text if text is not None else col).is_not_null().sum())
    numeric = int(floats.is_not_null().sum())
    if present == 0:
        raise _err(path, f"column {name!r} is empty in every row; the time of each trade is needed")
    if numeric * 2 < present:  # mostly not numbers: ISO-8601 text, or junk
        if text is not None:
            iso = text.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
            if int(iso.is_not_null().sum()) * 2 >= present:
                return iso.dt.epoch("ms").rename("_ms"), "iso8601"
        bad = text.filter(floats.is_null() & text.is_not_null()) if text is not None else col
        raise _err(path, f"column {name!r}: {present - numeric} of {present} values are not numbers or ISO-8601 "
                         f"times (e.g. {_few(bad.head(3).to_list(), 3)}); need epoch s/ms/µs/ns or a datetime")
    units = pl.select(_unit_of(floats.drop_nulls().abs())).to_series()
    median = float(floats.abs().median())
    unit = pl.select(_unit_of(pl.lit(median))).item()
    counts = dict(units.value_counts().iter_rows())
    if unit is None or counts.get(unit, 0) < UNIT_SHARE * numeric:
        found = ", ".join(f"{n} in {u or 'no unit'}" for u, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise _err(path, f"cannot tell the time unit of column {name!r}: median {median:.6g}, values look like "
                         f"{found}; every value must be epoch s, ms, µs or ns (1990-2100) in ONE unit")
    per_s = dict(TIME_UNITS)[unit]
    from_float = (floats * (1000 / per_s)).round(3).floor().cast(pl.Int64, strict=False)
    if ints is not None:
        if unit == "s":
            from_int = pl.select(pl.when(ints.abs() < 9 * 10**15).then(ints * 1000)).to_series()
        else:
            from_int = ints // (per_s // 1000)
        ms = pl.select(pl.coalesce(from_int, from_float)).to_series()
    else:
        ms = from_float
    return ms.rename("_ms"), unit


# --- one file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapeFile:
    """What the replay made of one file (``ReplaySource.describe()``, the replay events)."""

    path: str
    format: str  # csv | kraken-csv | binance-csv | parquet
    rows: int
    exchange: str  # the file's one exchange and symbol ("" when it holds several)
    symbol: str
    ts_column: str
    ts_unit: str  # s | ms | us | ns | iso8601 | datetime[unit, tz]
    out_of_order: int  # rows whose ts is below the ts of an earlier row of the file
    reversed: bool  # the file was in reverse time order (read backwards: it has no ids)
    ids_derived: bool  # no id column: ids are "<ts>-<n>" (n-th trade of that ms, in time order)
    side_inferred: bool  # no side column: sides come from the tick rule
    unreadable_ts: int  # rows whose time cannot be read (they become dead letters)
    first_ts: Optional[int]
    last_ts: Optional[int]


def _pick(cols, names) -> Optional[str]:
    return next((n for n in names if n in cols), None)


def normalise_tape(df: pl.DataFrame, exchange: Optional[str], symbol: Optional[str], path,
                   fmt: str = "") -> tuple[pl.DataFrame, TapeFile]:
    """One file's own columns -> the replay's columns: exchange, symbol, id (null when the file
    has none), ``_ms`` (epoch ms, null when unreadable), ``_ts_text`` (the time as written),
    price, amount, side (null when the file has none), optional trader and recv_ts; in file order
    (reversed for a file in reverse time order that has no ids, so its trades of one timestamp
    keep their real order).

    ``exchange``/``symbol`` (``--exchange``/``--symbol``) fill a column the file does not have;
    where the file has it, the option must equal its single value, else ``ReplayFormatError``.
    """
    path = Path(path)
    cols = set(df.columns)
    ts_col, amount_col = _pick(cols, TS_COLUMNS), _pick(cols, AMOUNT_COLUMNS)
    missing = [n for n, c in (("timestamp", ts_col), ("price", "price" if "price" in cols else None),
                              ("amount", amount_col)) if c is None]
    if missing:
        odd = [c for c in df.columns if ";" in c or "\t" in c]
        hint = " (is it comma-separated?)" if odd else ""
        raise _err(path, f"columns {missing} missing; a tape needs timestamp, price and amount, and uses id and side "
                         f"when present (ccxt trade columns {CCXT_COLUMNS}); found {df.columns}{hint}")
    out: dict[str, pl.Expr] = {}
    for name, given in (("exchange", exchange), ("symbol", symbol)):
        found = df[name].cast(pl.String).drop_nulls().unique().sort().to_list() if name in cols else []
        if found and given is not None and found != [given]:
            raise _err(path, f"--{name} {given!r} conflicts with the file's {name} column (values: {_few(found)}); "
                             f"drop --{name}, or replay a file that holds only {given!r}")
        if found:
            out[name] = pl.col(name).cast(pl.String)
            if given is not None:
                out[name] = out[name].fill_null(pl.lit(given))
        elif given is not None:
            out[name] = pl.lit(given, dtype=pl.String)
        else:
            raise _err(path, f"no {name} column; pass --{name}")
    id_col = _pick(cols, ID_COLUMNS)
    out["id"] = pl.col(id_col).cast(pl.String) if id_col else pl.lit(None, dtype=pl.String)
    out["_ts_text"] = pl.col(ts_col).cast(pl.String)
    out["price"], out["amount"] = pl.col("price"), pl.col(amount_col)
    if "side" in cols:
        out["side"] = pl.col("side").cast(pl.String)
    elif "is_buyer_maker" in cols:  # Binance public data: the taker sold when the buyer made
        maker = pl.col("is_buyer_maker").cast(pl.String).str.to_lowercase()
        out["side"] = pl.when(maker == "true").then(pl.lit("sell")).when(maker == "false").then(
            pl.lit("buy")).otherwise(maker)
    else:
        out["side"] = pl.lit(None, dtype=pl.String)
    for opt in ("trader", "recv_ts"):
        if opt in cols:
            out[opt] = pl.col(opt)
    ms, unit = epoch_ms(df[ts_col], path, ts_col)
    frame = df.select(**out).with_columns(ms)
    prev_max = pl.col("_ms").cum_max().shift(1).forward_fill()
    out_of_order = int(frame.select((pl.col("_ms") < prev_max).sum()).item())
    known = frame["_ms"].drop_nulls()
    rev = id_col is None and out_of_order > 0 and known.is_sorted(descending=True)
    if rev:
        frame = frame.reverse()
    pairs = frame.select("exchange", "symbol").unique()
    ex, sym = pairs.row(0) if pairs.height == 1 else ("", "")
    info = TapeFile(path=str(path), format=fmt, rows=frame.height, exchange=ex or "", symbol=sym or "",
                    ts_column=ts_col, ts_unit=unit, out_of_order=out_of_order, reversed=rev,
                    ids_derived=id_col is None, side_inferred="side" not in cols and "is_buyer_maker" not in cols,
                    unreadable_ts=int(frame["_ms"].null_count()),
                    first_ts=known.min() if known.len() else None, last_ts=known.max() if known.len() else None)
    return frame, info


# --- all files -----------------------------------------------------------------------------------


@dataclass
class Tape:
    """Every file of a replay as one frame in replay order (``frame``: exchange, symbol, id, ts,
    price, amount, side, [trader, recv_ts], offset), what was found per file, and the events that
    say what the replay changed (out-of-order files, inferred sides)."""

    frame: pl.DataFrame
    files: list[TapeFile]
    events: list  # operators.events.Event
    perp: list = field(default_factory=list)  # operators.perp.PerpUpdate, seq = their place among the trades

    def describe(self) -> dict:
        """Plain numbers for the CLI: rows, files (each a dict of ``TapeFile``), out_of_order,
        perp updates."""
        return {"rows": self.frame.height, "files": [asdict(f) for f in self.files],
                "out_of_order": sum(f.out_of_order for f in self.files),
                "unreadable_ts": sum(f.unreadable_ts for f in self.files), "perp_updates": len(self.perp)}

    def summary(self) -> str:
        """One line for people, e.g. ``2 files, 12,480 trades; eth.csv: 12,479 rows out of time
        order, replayed sorted; BCHEUR.csv: ts in s -> ms, ids derived, sides by tick rule``."""
        notes = []
        for f in self.files:
            bits = []
            if f.out_of_order:
                bits.append(f"{f.out_of_order:,} rows out of time order, replayed sorted")
            if f.ts_unit != "ms":
                bits.append(f"ts in {f.ts_unit} -> ms")
            if f.ids_derived:
                bits.append("ids derived")
            if f.side_inferred:
                bits.append("sides by tick rule")
            if f.unreadable_ts:
                bits.append(f"{f.unreadable_ts:,} unreadable times (dead letters)")
            if bits:
                notes.append(f"{Path(f.path).name}: {', '.join(bits)}")
        n = len(self.files)
        head = f"{n} file{'s' if n != 1 else ''}, {self.frame.height:,} trades"
        return "; ".join([head, *notes])


def _sort_tape(frame: pl.DataFrame) -> pl.DataFrame:
    """Derive missing ids, then sort every row into the replay's total order.

    Order: ts, then (files without ids) the trade's position within its ms, then id (numeric when
    every id is an integer, else text), then price, amount, side. Only rows equal in all of these
    keep their file order, and such rows are indistinguishable. Unreadable times sort last (by
    their text). Derived ids are ``<ts>-<n>``: the n-th trade of that instrument at that ms in
    time order; for files without ids "time order" within one ms is the file order (a file in
    reverse time order was read backwards), because nothing else records it.
    """
    inst = ["exchange", "symbol"]
    bad_text = pl.when(pl.col("_ms").is_null()).then(pl.col("_ts_text"))  # orders unreadable times only
    if frame["_derive"].any():
        frame = frame.sort([pl.col("_ms"), bad_text, pl.col("_file"), pl.col("_row")], nulls_last=True)
        ts_key = pl.coalesce(pl.col("_ms").cast(pl.String), pl.col("_ts_text"), pl.lit(""))
        k = pl.int_range(pl.len(), dtype=pl.Int64).over([*inst, "_derive", ts_key])
        frame = frame.with_columns(
            pl.when(pl.col("_derive")).then(pl.format("{}-{}", ts_key, k)).otherwise(pl.col("id")).alias("id"),
            pl.when(pl.col("_derive")).then(k).alias("_k"),
        )
    else:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Int64).alias("_k"))
    ids = frame["id"].drop_nulls()
    numeric = ids.len() > 0 and ids.str.strip_chars().cast(pl.Int64, strict=False).null_count() == 0
    id_key = pl.col("id").str.strip_chars().cast(pl.Int64, strict=False) if numeric else pl.col("id")
    frame = _sequence_time(frame, id_key) if numeric else frame.with_columns(pl.col("_ms").alias("_place"))
    return frame.sort([pl.col("_place"), bad_text, pl.col("_k"), id_key, pl.col("price"), pl.col("amount"),
                       pl.col("side"), pl.col("_file"), pl.col("_row")], nulls_last=True).drop("_place")


SEQUENCE_WINDOW = 5  # trades: a lone bad timestamp is out-voted by its neighbours in the exchange's sequence
SEQUENCE_MAX_DISORDER = 0.01  # share of backward steps (> 2 s) above which ids are not a time sequence


def _sequence_time(frame: pl.DataFrame, id_key: pl.Expr) -> pl.DataFrame:
    """Where an instrument's ids are the exchange's trade sequence (integers whose order agrees
    with time), each trade is placed at the median ts of its ``SEQUENCE_WINDOW`` neighbours in id
    order (column ``_place``), not at its own ts. For clean data that is its own ts (the centred
    median of a sorted window is its middle); a trade stamped hours or years off stays where the
    exchange put it, so downstream the jump rule sees it among its neighbours and makes it a
    ``ts_outlier`` instead of it landing, silently, in a bar hours away. Instruments whose ids
    do not follow time (more than 1% of steps, and more than 2, go back by more than 2 s) are
    placed by ts."""
    inst = ["exchange", "symbol"]
    by_id = frame.with_row_index("_pos").sort([*inst, id_key], nulls_last=True)
    back = (pl.col("_ms") < pl.col("_ms").shift(1) - 2_000).over(inst)
    median = pl.col("_ms").rolling_median(SEQUENCE_WINDOW, center=True, min_samples=1).over(inst)
    by_id = by_id.with_columns(back.fill_null(False).alias("_back"), median.alias("_median"))
    allowed = pl.max_horizontal(pl.len() * SEQUENCE_MAX_DISORDER, pl.lit(2.0))  # a lone outlier is one step back
    sequenced = by_id.with_columns((pl.col("_back").sum() <= allowed).over(inst).alias("_sequenced"))
    placed = sequenced.with_columns(
        pl.when(pl.col("_sequenced") & pl.col("_ms").is_not_null()).then(pl.col("_median").round(0).cast(pl.Int64))
        .otherwise(pl.col("_ms")).alias("_place"))
    return placed.sort("_pos").drop("_pos", "_back", "_median", "_sequenced")


def _tick_sides(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, int]]:
    """Fill the side of rows from files without one by the tick rule (the tick test of Lee and
    Ready), per instrument in replay order: price above the previous trade's = buy, below = sell,
    equal = the previous trade's side. The trades before an instrument's first price change have
    no tick to go by and are called buys: a convention, counted per file (``_file`` rank -> rows)
    in the returned dict and in the ``replay_side_inferred`` event."""
    inst = ["exchange", "symbol"]
    p = pl.col("price").cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
    valid = p.is_not_null() & pl.col("_ms").is_not_null()
    last = pl.when(valid).then(p).shift(1).forward_fill().over(inst)
    tick = pl.when(valid & (p > last)).then(pl.lit("buy")).when(valid & (p < last)).then(pl.lit("sell"))
    frame = frame.with_columns(tick.forward_fill().over(inst).alias("_tick"))
    guessed = dict(frame.filter(pl.col("_infer") & pl.col("_tick").is_null())
                   .group_by("_file").len().iter_rows())
    frame = frame.with_columns(
        pl.when(pl.col("_infer")).then(pl.col("_tick").fill_null("buy")).otherwise(pl.col("side")).alias("side"))
    return frame, guessed


def load_tape(paths, exchange: Optional[str] = None, symbol: Optional[str] = None) -> Tape:
    """Read, check and normalise every file, and put all their trades into the replay order.

    The order is total and independent of the file order (see ``_sort_tape``), so a reversed,
    shuffled or split tape gives the same trades, ids, ``offset``s and bars as the sorted one.
    ``offset`` is the position in that order: it becomes ``seq`` (order inside a bar) and is the
    recovery position. Every format problem is raised here, before any dataflow starts.
    """
    from operators.events import Event  # events import operators.trades; keep this module light

    parts, files, perp = [], [], []
    for path in [Path(p) for p in paths]:
        raw, fmt = open_tape(path)
        if is_perp_file(raw):
            perp += perp_updates(raw, exchange, symbol, path)
            continue
        frame, info = normalise_tape(raw, exchange, symbol, path, fmt)
        parts.append(frame.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
                                        pl.lit(info.ids_derived).alias("_derive"),
                                        pl.lit(info.side_inferred).alias("_infer")))
        files.append(info)
    # files without ids keep file order within one ms; order the files by time so that a tape
    # split over several files gives the same order whatever the order of --file
    if not parts:
        raise _err(Path(paths[0]), "only perp files (funding, open interest, liquidations): a replay needs trades too")
    rank = sorted(range(len(files)), key=lambda i: (files[i].first_ts is None, files[i].first_ts or 0, i))
    rank_of = {i: r for r, i in enumerate(rank)}
    parts = [part.with_columns(pl.lit(rank_of[i], dtype=pl.Int64).alias("_file")) for i, part in enumerate(parts)]
    frame = _sort_tape(pl.concat(parts, how="diagonal_relaxed"))
    guessed: dict[int, int] = {}
    if frame["_infer"].any():
        frame, guessed = _tick_sides(frame)
    unreadable = frame["_ms"].is_null() & frame["_ts_text"].is_not_null()
    ts = pl.coalesce(pl.col("_ms").cast(pl.String), pl.col("_ts_text")) if unreadable.any() else pl.col("_ms")
    keep = ["exchange", "symbol", "id", ts.alias("ts"), "price", "amount", "side"]
    keep += [c for c in ("trader", "recv_ts") if c in frame.columns]
    frame = frame.select(*keep, pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))

    events = []  # event time (the file's first trade), not wall time: a rerun writes the same rows
    for i, f in enumerate(files):
        ex, sym = f.exchange, f.symbol
        detail = {"file": f.path, "rows": f.rows, "out_of_order": f.out_of_order, "reversed": f.reversed}
        if f.out_of_order:
            events.append(Event(kind="replay_sorted", ts=f.first_ts or 0, exchange=ex, symbol=sym, from_ts=f.first_ts,
                                to_ts=f.last_ts, reason=f"{f.out_of_order} of {f.rows} rows out of time order in "
                                f"{Path(f.path).name}; replayed sorted by (ts, id)",
                                detail=json.dumps(detail), source="replay"))
        if f.side_inferred:
            events.append(Event(kind="replay_side_inferred", ts=f.first_ts or 0, exchange=ex, symbol=sym, from_ts=f.first_ts,
                                to_ts=f.last_ts, reason=f"{Path(f.path).name} has no side column; sides inferred "
                                "by the tick rule", source="replay",
                                detail=json.dumps({**detail, "ids_derived": f.ids_derived,
                                                   "before_first_tick_called_buy": guessed.get(rank_of[i], 0)})))
    if perp:  # each after the trades at or before its ts, in one total order
        perp.sort(key=lambda u: (u.ts, u.exchange, u.symbol, u.kind, u.dedup_key()))
        ts_sorted = frame["ts"].cast(pl.Int64, strict=False).fill_null(-1).to_numpy()
        at = np.searchsorted(ts_sorted, [u.ts for u in perp], side="right")
        perp = [msgspec.structs.replace(u, seq=int(k)) for u, k in zip(perp, at)]
    return Tape(frame, files, events, perp)


# --- perp files ------------------------------------------------------------------------------------

#: columns that make a file a perp file (besides a ``perp`` column), by the kind they mean
PERP_FILE_COLUMNS = {"funding": ("fundingRate", "funding_rate"),
                     "open_interest": ("openInterestAmount", "openInterestValue", "open_interest")}


def is_perp_file(df: pl.DataFrame) -> bool:
    """Does the file hold perp data (a ``perp`` column, a ``kind`` column without prices, or ccxt's
    funding-rate / open-interest history columns) rather than trades?"""
    cols = set(df.columns)
    return ("perp" in cols or ("kind" in cols and "price" not in cols)
            or any(_pick(cols, names) for names in PERP_FILE_COLUMNS.values()))


def perp_updates(df: pl.DataFrame, exchange: Optional[str], symbol: Optional[str], path) -> list:
    """A perp file's rows as ``PerpUpdate``s (ccxt ``fetch_funding_rate_history`` /
    ``fetch_open_interest_history`` rows, or rows with a ``perp`` column naming the kind and the
    ``PerpUpdate`` field names). Bad values become dead letters downstream (``perp.problem``); a
    file whose times cannot be read is refused here."""
    from operators.perp import KINDS, PerpUpdate

    path = Path(path)
    cols = set(df.columns)
    ts_col = _pick(cols, TS_COLUMNS)
    if ts_col is None:
        raise _err(path, f"a perp file needs a timestamp column (one of {TS_COLUMNS}); found {df.columns}")
    ms, _ = epoch_ms(df[ts_col], path, ts_col)
    if ms.null_count():
        raise _err(path, f"{ms.null_count():,} rows of {path.name} have a time that cannot be read")
    if "perp" in cols or "kind" in cols:
        kinds = df["perp" if "perp" in cols else "kind"].cast(pl.String).to_list()
    else:
        kinds = ["funding" if _pick(cols, PERP_FILE_COLUMNS["funding"]) else "open_interest"] * df.height
    unknown = sorted({k for k in kinds if k not in KINDS}, key=str)
    if unknown:
        raise _err(path, f"perp kinds {unknown} are not one of {', '.join(KINDS)}")
    ren = {"fundingRate": "rate", "funding_rate": "rate", "fundingTimestamp": "funding_time",
           "fundingTime": "funding_time", "markPrice": "mark_price", "indexPrice": "index_price",
           "openInterestAmount": "open_interest", "openInterestValue": "oi_value", "contracts": "amount"}
    fields = set(PerpUpdate.__struct_fields__) - {"kind", "exchange", "symbol", "ts", "seq"}
    rows = df.rename({k: v for k, v in ren.items() if k in cols and v not in cols}).to_dicts()
    out = []
    for kind, t, row in zip(kinds, ms.to_list(), rows):
        ex = row.get("exchange") or exchange
        sym = row.get("symbol") or symbol
        if not ex or not sym:
            raise _err(path, "a perp row needs exchange and symbol (columns, or --exchange/--symbol)")
        vals = {k: row[k] for k in fields if row.get(k) is not None}
        for k in ("rate", "mark_price", "index_price", "open_interest", "oi_value", "price", "amount"):
            if k in vals and isinstance(vals[k], str):
                vals[k] = float(vals[k]) if _is_number(vals[k]) else float("nan")
        if "funding_time" in vals:
            vals["funding_time"] = int(vals["funding_time"])
        out.append(PerpUpdate(kind=kind, exchange=str(ex), symbol=str(sym), ts=int(t),
                              **{**vals, "source": vals.get("source") or f"replay:{path.name}"}))
    return out


class _ReplayPartition(_FramePartition):
    """Every replay file, sorted, in one partition (so the arrival order of an instrument never
    depends on worker scheduling). Snapshot: the offset of the next row to emit."""

    def __init__(self, src: "ReplaySource", tape: Tape, part: str, resume: int):
        super().__init__(src.source_name, part, src.speed)
        self.src, self.tape, self.pos, self.loaded = src, tape, resume, resume
        self.events = list(tape.events) if resume == 0 else []  # with the first batch, once
        # perp updates go out after the trades before them (resumed: from the resume point again; deduplicated)
        self.perp = [u for u in tape.perp if u.seq >= resume]

    def _load(self) -> Optional[pl.DataFrame]:
        if self.loaded >= self.tape.frame.height:
            return None
        frame = self.tape.frame.slice(self.loaded, self.src.batch_size)
        self.loaded += frame.height
        return frame

    def _take_events(self, final: bool = False) -> list:
        events, self.events = self.events, []
        k = len(self.perp) if final else next((i for i, u in enumerate(self.perp) if u.seq > self.pos), len(self.perp))
        if k:
            events += self.perp[:k]
            self.perp = self.perp[k:]
        return events

    def _released(self, frame: pl.DataFrame) -> None:
        self.pos = int(frame["offset"][-1]) + 1
        if self.src.progress:
            self.src.progress(self.part, self.pos, self.tape.frame.height, frame.height)

    def snapshot(self) -> int:
        return self.pos


@dataclass
class ReplaySource(FixedPartitionedSource[FrameBatch, int]):
    """Recorded tapes (ccxt CSV/Parquet, Binance public-data CSV, Kraken trade history), all
    files in ONE partition, released in the order of ``load_tape``: sorted by (ts, id), whatever
    the order of the rows in the files or of the files. The tape is loaded whole into memory.

    Call ``check()`` before building the dataflow: it reads and validates every file (format,
    columns, time unit, --exchange/--symbol) and raises ``ReplayFormatError`` with a one-line
    message, so the CLI can report it without a bytewax panic; the loaded tape is then handed to
    the partition (not read twice; see ``keep``). ``describe()`` gives plain numbers (rows, files,
    out_of_order) and a one-line ``summary``.
    """

    paths: list[Path]
    exchange: Optional[str] = None
    symbol: Optional[str] = None
    batch_size: int = 20_000
    speed: Optional[float] = None
    progress: Optional[Progress] = None
    source_name: str = "replay"
    _tape: Optional[Tape] = field(default=None, init=False, repr=False)
    _info: Optional[dict] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for p in self.paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"replay file not found: {p}")

    def _load(self) -> Tape:
        tape = load_tape(self.paths, self.exchange, self.symbol)
        self._info = {**tape.describe(), "summary": tape.summary(),
                      "instruments": sorted(f"{e}:{s}" for e, s in tape.frame.select("exchange", "symbol").unique()
                                            .iter_rows())}
        return tape

    def check(self, keep: bool = True) -> dict:
        """Read and validate every file now (``ReplayFormatError`` on a problem); returns
        ``describe()``. ``keep``: hold the loaded tape for ``build_part`` (no second read). Pass
        False in a process that may not own the partition (``--processes N``: only one worker of
        one process builds it; the others would hold a copy of the tape for nothing)."""
        if self._tape is None:
            tape = self._load()
            self._tape = tape if keep else None
        return self.describe()

    def describe(self) -> dict:
        """``{"rows", "files": [per-file dicts], "out_of_order", "unreadable_ts", "summary"}``
        (reads the files if nothing has yet, without keeping the tape)."""
        if self._info is None:
            self.check(keep=False)
        assert self._info is not None
        return self._info

    def instruments(self) -> list[str]:
        """Every instrument of the tape (reads the files if nothing has yet)."""
        return self.describe()["instruments"]

    def list_parts(self) -> list[str]:
        names = "+".join(Path(p).name for p in self.paths)
        if len(names) > 200:
            digest = hashlib.blake2b("\n".join(str(p) for p in self.paths).encode(), digest_size=4).hexdigest()
            names = f"{Path(self.paths[0]).name}+{len(self.paths) - 1}-more-{digest}"
        return [f"0:{names}"]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]):
        tape, self._tape = self._tape or self._load(), None  # the partition owns the frame now
        return _ReplayPartition(self, tape, for_part, resume_state or 0)
