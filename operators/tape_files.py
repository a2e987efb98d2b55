"""Reading one recorded tape file: format sniffing, the CSV and Parquet readers, the time column
(epoch unit detection), normalising a trade file to the replay's columns, and perp files.

Pure Polars/numpy (no bytewax): ``operators.tape_order.load_tape`` puts the files together, and
``dataflows.replay_source.ReplaySource`` replays them. Every problem with a file is a
``ReplayFormatError`` with a one-line message.
"""

from __future__ import annotations

import codecs
import csv
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import polars as pl

from operators.perp import KINDS, PerpUpdate

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
    rule, see ``operators.tape_order``). All CSV columns are read as text, so a bad
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
