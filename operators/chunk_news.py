"""What rides in an instrument's window chunks besides its trades: late counts, data-gap events and
perp updates, each placed in the window that lets the portfolio apply it without lookahead
(``carry_news``, ``place_perp``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl

from operators.admit_state import AdmitConfig, AdmitState, Admitted, remember
from operators.decode import TRADE_SCHEMA
from operators.perp import PerpUpdate
from operators.records import CHUNK_COLUMNS, MINUTE_MS, Chunk, Event, LateCount

_EMPTY_CHUNK = pl.DataFrame(schema={c: TRADE_SCHEMA[c] for c in CHUNK_COLUMNS})


def carry_news(state: AdmitState, got: Admitted, events: tuple, frontier_before: int | None,
               cfg: AdmitConfig, perps: tuple = ()) -> Admitted:
    """Put what the data-quality gate must learn into the instrument's own chunks, so it reaches
    the portfolio with the instrument's bars, in their order (the order it is applied in then does
    not depend on how partitions and processes interleave, issue 11).

    - late trades (``behind_watermark``): per trade, a count for its own minute, carried by the
      window of the frontier it was judged by (``watermark + lateness``): a window with an accepted
      trade, still open, and the same whatever the batch cuts;
    - data-gap events: carried by the window of the frontier before this slice (the gap's trades
      come after it), or by the first chunk ever when there is no frontier yet.
    - perp updates (``operators.perp``): by the window ``place_perp`` gives them.
    Ts outliers are not counted: their ts says nothing about which bar they belong to."""
    news: dict[int, list] = {}  # window start -> items
    events_of = events  # for _instrument_of when the slice has no trade
    if perps or getattr(state, "perp", ()):
        for w, u in place_perp(state, got, perps, frontier_before, cfg):
            news.setdefault(w, []).append(u)
            events_of = (*events_of, u)
    if got.late is not None:
        df = got.late.trades
        carrier = (pl.col("watermark") + cfg.lateness_ms)
        counts = df.group_by((carrier - carrier % cfg.window_ms).alias("_w"),
                             (pl.col("ts") - pl.col("ts") % MINUTE_MS).alias("_m")).len().sort("_w", "_m")
        for w, m, n in counts.iter_rows():
            news.setdefault(int(w), []).append(LateCount(int(m), int(n)))
    if events:
        if frontier_before is None:
            state.news = (*getattr(state, "news", ()), *events)
        else:
            news.setdefault(frontier_before - frontier_before % cfg.window_ms, []).extend(events)
    held = getattr(state, "news", ())
    if held and got.chunks:
        news.setdefault(got.chunks[0].window_start, [])[:0] = list(held)
        state.news = ()
    if not news:
        return got
    chunks = {c.window_start: c for c in got.chunks}
    first = got.chunks[0] if got.chunks else None
    for w, items in news.items():
        c = chunks.get(w)
        if c is not None:
            chunks[w] = replace(c, news=c.news + tuple(items))
        else:  # no on-time trade of that window in this slice: an empty chunk carries it
            ex, sym = (first.exchange, first.symbol) if first else _instrument_of(got, events_of)
            chunks[w] = Chunk(ex, sym, w, min(w + cfg.window_ms - 1, state.max_ts or w), _EMPTY_CHUNK, tuple(items))
    got.chunks = sorted(chunks.values(), key=lambda c: c.window_start)
    return got


def _instrument_of(got: Admitted, events: tuple) -> tuple[str, str]:
    for x in (got.late, got.outliers):
        if x is not None:
            return x.exchange, x.symbol
    return events[0].exchange, events[0].symbol


def place_perp(state: AdmitState, got: Admitted, perps: tuple, frontier_before: int | None,
               cfg: AdmitConfig) -> list[tuple[int, PerpUpdate]]:
    """(window start, update) for the perp updates that can be placed now (``operators.perp``).

    An update's frontier is the newest accepted trade ts before its position (``seq``). Behind that
    frontier's watermark it rides the frontier's window (like a late trade's count); otherwise its
    own window, at once if the frontier has reached its ts, else when a later trade does (held in
    ``state.perp``). Repeated updates (same content) are dropped. Every rule reads the data, not the
    batch cuts."""
    w = cfg.window_ms
    fresh = []
    for u in perps:
        key = u.dedup_key()
        if key not in state.seen:
            fresh.append(u)
            remember(state, [key], state.max_ts if state.max_ts is not None else u.ts, cfg)
    if fresh and got.chunks:
        seqs = np.concatenate([c.trades["seq"].to_numpy() for c in got.chunks])
        order = np.argsort(seqs, kind="stable")
        seqs = seqs[order]
        run_max = np.maximum.accumulate(np.concatenate([c.trades["ts"].to_numpy() for c in got.chunks])[order])
    else:
        seqs = run_max = None
    out: list[tuple[int, PerpUpdate]] = []
    held = list(getattr(state, "perp", ()))
    for u in fresh:
        front = frontier_before
        if seqs is not None and len(seqs):
            k = len(seqs) if u.seq is None else int(np.searchsorted(seqs, u.seq))
            if k:
                front = int(run_max[k - 1]) if front is None else max(front, int(run_max[k - 1]))
        if front is None or u.ts > front:
            held.append(u)
        else:
            at = u.ts if u.ts >= front - cfg.lateness_ms else front
            out.append((at - at % w, u))
    keep = []
    for u in held:
        if state.max_ts is not None and u.ts <= state.max_ts:
            out.append((u.ts - u.ts % w, u))
        else:
            keep.append(u)
    state.perp = tuple(keep)
    return out


def unplaced_perps(state: AdmitState, got: Admitted) -> Admitted:
    """At the end of the input, perp updates still ahead of every trade of their instrument are
    reported (an ``Event`` added to ``got``), not silently dropped."""
    held = getattr(state, "perp", ())
    if not held:
        return got
    state.perp = ()
    u = held[0]
    ev = Event(kind="perp_unplaced", ts=max(x.ts for x in held), exchange=u.exchange, symbol=u.symbol,
               from_ts=min(x.ts for x in held), to_ts=max(x.ts for x in held),
               reason=f"{len(held)} perp update(s) later than the instrument's last trade at the end of the input",
               source="pipeline")
    got.extra.append(ev)
    return got
