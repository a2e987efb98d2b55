"""The replay tape: every file's trades in one total order (``load_tape`` -> ``Tape``).

The order does not depend on the order of the files or of their rows: sorted by (ts, id), with
sequence-time placement for exchange trade ids, derived ids for files without them, sides from the
tick rule for files without a side column, and perp updates placed among the trades.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import msgspec
import numpy as np
import polars as pl

from operators.records import Event
from operators.tape_files import TapeFile, _err, is_perp_file, normalise_tape, open_tape, perp_updates


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
