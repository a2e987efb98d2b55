"""Admission of one instrument's trades, batch by batch: drop duplicate ids, separate late trades
and timestamp outliers (the jump rule), cut the rest into one chunk per 1-minute window
(``admit``; ``flush`` at the end of the input). Pure logic, no bytewax."""

from __future__ import annotations

import numpy as np
import polars as pl

from operators.admit_state import AdmitConfig, AdmitState, Admitted, remember
from operators.chunk_news import carry_news, unplaced_perps
from operators.by_instrument import InstrumentSlice
from operators.perp import PerpUpdate
from operators.records import CHUNK_COLUMNS, MINUTE_MS, Chunk, LateTrades

#: Every reason a trade can end in ``late_trades`` instead of a bar.
LATE_REASONS = {
    "behind_watermark": "ts below the instrument's newest ts minus the allowed lateness",
    "window_closed": "its 1m window had already closed (wall-clock watermark on live sources)",
    "ts_outlier": "ts jumped more than jump_ms away from its instrument's stream and the stream did not follow",
    "ts_jump_unconfirmed": "ts jumped more than jump_ms ahead and the input ended before the jump was confirmed",
}

_ON_TIME, _LATE, _OUTLIER = 0, 1, 2


def admit(state: AdmitState, trades: pl.DataFrame | InstrumentSlice | None, cfg: AdmitConfig) -> Admitted:
    """``_admit`` the trades, then ``carry_news``: the late counts and data-gap events of this
    slice ride in chunks to the portfolio."""
    events: tuple = ()
    if isinstance(trades, InstrumentSlice):
        trades, events = trades.trades, trades.events
    frontier_before = state.max_ts
    got = _admit(state, trades, cfg) if trades is not None and trades.height else Admitted([], None, 0)
    perps = tuple(e for e in events if isinstance(e, PerpUpdate))
    if perps:
        events = tuple(e for e in events if not isinstance(e, PerpUpdate))
    return carry_news(state, got, events, frontier_before, cfg, perps)


def _admit(state: AdmitState, trades: pl.DataFrame, cfg: AdmitConfig) -> Admitted:
    """Drop duplicate ids, separate late trades and timestamp outliers, cut the rest into window chunks.

    ``trades`` is one instrument's slice of a decoded batch, in arrival order. Mutates ``state``.

    Lateness: a trade is late when its ts is below the watermark at its arrival, the frontier (the
    newest accepted ts before it) minus the allowed lateness. This is bytewax's EventClock rule
    applied trade by trade, so where the batches happen to be cut does not change which trades are late.

    Robust event time: the frontier never leaps on one trade's word. A trade more than ``jump_ms``
    ahead of the frontier (or the instrument's first trades) opens a *jump*: it and the trades that
    follow it are held until ``jump_confirm`` trades in a row agree (each no more than ``jump_ms``
    behind the one before), or one
    of them lies within ``receipt_skew_ms`` of its own receive time (a live feed saying "now").
    Then they are admitted in arrival order and the frontier moves. A trade back near the frontier
    refutes the held ones: they become ``ts_outlier`` rows in ``late_trades``, and no other trade is
    lost. A trade more than ``receipt_skew_ms`` ahead of its own receive time is a ``ts_outlier`` at
    once. A real gap (an instrument quiet for an hour) is a jump that the next trades confirm.
    ``flush`` decides what is still held when the input ends.
    """
    exchange, symbol = trades["exchange"][0], trades["symbol"][0]
    ids = trades["id"].to_list()
    dup_mask = None
    if not state.seen.isdisjoint(ids) or trades["id"].is_duplicated().any():
        seen_now, dup_mask = set(), []
        for i in ids:
            d = i in state.seen or i in seen_now
            dup_mask.append(d)
            seen_now.add(i)
        trades = trades.filter(~pl.Series(dup_mask))
        ids = trades["id"].to_list()
    duplicates = 0 if dup_mask is None else sum(dup_mask)
    if trades.height == 0:
        return Admitted([], None, duplicates)

    if state.pending is None and state.max_ts is not None and not _needs_care(state.max_ts, trades, cfg):
        got = _admit_steady(state, trades, exchange, symbol, cfg)
    else:
        got = _admit_careful(state, trades, exchange, symbol, cfg)
    remember(state, ids, state.max_ts if state.max_ts is not None else int(trades["ts"].max()), cfg)
    got.duplicates = duplicates
    return got


def flush(state: AdmitState, cfg: AdmitConfig) -> Admitted:
    """At the end of the input: held trades that two or more agree on, or that no earlier trade
    contradicts (the instrument's only trades), are admitted; a lone trade that jumped ahead of an
    established stream is a ``ts_jump_unconfirmed`` row (a trailing bad timestamp must not make a bar)."""
    held, state.pending = state.pending, None
    if held is None:
        return unplaced_perps(state, Admitted([], None, 0))
    exchange, symbol = held["exchange"][0], held["symbol"][0]
    if held.height >= 2 or state.max_ts is None:
        labels, marks = _classify_run(held["ts"].to_numpy(), state, cfg)
        got = carry_news(state, _split(held, labels, marks, exchange, symbol, cfg), (), state.max_ts, cfg)
        return unplaced_perps(state, got)
    mark = state.max_ts if state.max_ts is not None else 0
    return unplaced_perps(state, Admitted([], None, 0, LateTrades(exchange, symbol, held.with_columns(
        pl.lit(mark, dtype=pl.Int64).alias("watermark")), "ts_jump_unconfirmed")))


def _needs_care(prev: int, trades: pl.DataFrame, cfg: AdmitConfig) -> bool:
    """Does any trade jump ahead of the running frontier, or lie ahead of its own receipt?"""
    ts = trades["ts"].to_numpy()
    frontier = np.maximum.accumulate(np.concatenate(([prev], ts[:-1])))
    if (ts > frontier + cfg.jump_ms).any():
        return True
    recv = trades["recv_ts"]
    return bool(((trades["ts"] - recv) > cfg.receipt_skew_ms).any())


def _admit_steady(state: AdmitState, trades: pl.DataFrame, exchange: str, symbol: str, cfg: AdmitConfig) -> Admitted:
    """No jump anywhere: the lateness rule, vectorised."""
    prev = state.max_ts
    state.max_ts = max(prev, trades["ts"].max())
    running_max = pl.col("ts").cum_max().shift(1, fill_value=prev)
    marked = trades.with_columns(
        pl.max_horizontal(running_max, pl.lit(prev)).alias("_prev_max")
    ).with_columns((pl.col("ts") < pl.col("_prev_max") - cfg.lateness_ms).alias("_late"))
    late = None
    if marked["_late"].any():
        late_df = marked.filter("_late").with_columns(
            (pl.col("_prev_max") - cfg.lateness_ms).alias("watermark")
        ).drop("_prev_max", "_late")
        late = LateTrades(exchange, symbol, late_df, "behind_watermark")
        marked = marked.filter(~pl.col("_late"))
    on_time = marked.select(CHUNK_COLUMNS)
    return Admitted(window_chunks(exchange, symbol, on_time, cfg.window_ms), late, 0)


def _admit_careful(state: AdmitState, trades: pl.DataFrame, exchange: str, symbol: str, cfg: AdmitConfig) -> Admitted:
    """The jump rule, trade by trade (rare: only batches with a jump, a held jump or a stream's start)."""
    frame = trades if state.pending is None else pl.concat([state.pending, trades], how="vertical")
    ts = frame["ts"].to_numpy()
    recv = frame["recv_ts"].to_numpy()
    labels = np.full(len(ts), _ON_TIME, dtype=np.int8)
    marks = np.zeros(len(ts), dtype=np.int64)  # the watermark each late / outlier row was judged by
    run: list[int] = []

    def frontier_mark() -> int:
        return state.max_ts if state.max_ts is not None else 0

    def refute() -> None:
        for j in run:
            labels[j], marks[j] = _OUTLIER, frontier_mark()
        run.clear()

    def accept(j: int) -> None:
        labels[j], marks[j] = _accept(state, int(ts[j]), cfg)

    for i in range(len(ts)):
        t = int(ts[i])
        if t - recv[i] > cfg.receipt_skew_ms:  # ahead of its own receipt: a clock that is wrong
            labels[i], marks[i] = _OUTLIER, frontier_mark()
            continue
        if state.max_ts is not None and t <= state.max_ts + cfg.jump_ms:
            refute()  # back near the frontier: whatever jumped ahead was wrong
            accept(i)
            continue
        if run and t < int(ts[run[-1]]) - cfg.jump_ms:
            refute()  # far behind the held ones: they do not form one stream with it
        run.append(i)
        if len(run) >= cfg.jump_confirm or abs(t - recv[i]) <= cfg.receipt_skew_ms:
            for j in run:
                accept(j)
            run.clear()
    state.pending = frame[run] if run else None
    keep = np.ones(len(ts), dtype=bool)
    keep[run] = False
    return _split(frame.filter(pl.Series(keep)), labels[keep], marks[keep], exchange, symbol, cfg)


def _accept(state: AdmitState, t: int, cfg: AdmitConfig) -> tuple[int, int]:
    """Admit one trade against the frontier: (label, watermark it was judged by); moves the frontier."""
    f = state.max_ts
    state.max_ts = t if f is None else max(f, t)
    if f is not None and t < f - cfg.lateness_ms:
        return _LATE, f - cfg.lateness_ms
    return _ON_TIME, 0


def _classify_run(ts: np.ndarray, state: AdmitState, cfg: AdmitConfig) -> tuple[np.ndarray, np.ndarray]:
    """Admit held trades in arrival order (``flush``)."""
    got = [_accept(state, t, cfg) for t in ts.tolist()]
    return (np.array([g[0] for g in got], dtype=np.int8).reshape(-1),
            np.array([g[1] for g in got], dtype=np.int64).reshape(-1))


def _split(frame: pl.DataFrame, labels: np.ndarray, marks: np.ndarray, exchange: str, symbol: str,
           cfg: AdmitConfig) -> Admitted:
    tagged = frame.with_columns(pl.Series("_label", labels), pl.Series("watermark", marks, dtype=pl.Int64))

    def rows(label: int, reason: str) -> LateTrades | None:
        part = tagged.filter(pl.col("_label") == label)
        return LateTrades(exchange, symbol, part.drop("_label"), reason) if part.height else None

    on_time = tagged.filter(pl.col("_label") == _ON_TIME).select(CHUNK_COLUMNS)
    return Admitted(window_chunks(exchange, symbol, on_time, cfg.window_ms), rows(_LATE, "behind_watermark"), 0,
                    rows(_OUTLIER, "ts_outlier"))


def window_chunks(exchange: str, symbol: str, trades: pl.DataFrame, window_ms: int) -> list[Chunk]:
    """Cut trades into one chunk per window, oldest window first."""
    if trades.height == 0:
        return []
    lo, hi = trades["ts"].min(), trades["ts"].max()
    if lo // window_ms == hi // window_ms:
        return [Chunk(exchange, symbol, lo - lo % window_ms, hi, trades)]
    keyed = trades.with_columns((pl.col("ts") - pl.col("ts") % window_ms).alias("_w"))
    parts = keyed.partition_by("_w", as_dict=True, maintain_order=True, include_key=False)
    out = [Chunk(exchange, symbol, w, part["ts"].max(), part) for (w,), part in parts.items()]
    out.sort(key=lambda c: c.window_start)
    return out


def concat_chunks(chunks: list[Chunk]) -> pl.DataFrame:
    return pl.concat([c.trades for c in chunks], how="vertical")


def chunk_late(chunk: Chunk, reason: str) -> LateTrades:
    """A chunk that reached its window after the window closed (wall-clock watermark)."""
    df = chunk.trades.with_columns(
        pl.lit(chunk.exchange).alias("exchange"),
        pl.lit(chunk.symbol).alias("symbol"),
        pl.lit(chunk.window_start + MINUTE_MS, dtype=pl.Int64).alias("watermark"),
    )
    return LateTrades(chunk.exchange, chunk.symbol, df, reason)
