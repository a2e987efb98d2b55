"""Test helpers: build trade tapes, run the pipeline on them, read stored rows, and compute
reference bars independently (one Polars group_by over all trades)."""

from __future__ import annotations

from datetime import timedelta
from typing import Iterable, Optional

import msgspec
import numpy as np
import polars as pl
from bytewax.testing import TestingSource, run_main

from dataflows.config import load_settings
from dataflows.pipeline import build_flow
from operators import synthetic as syn
from operators.bars import TIMEFRAMES
from operators.records import FrameBatch, RawBatch
from sinks.clickhouse import ClickHouseSink, SinkStats
from sinks.store import Store

T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
RECV = T0 + 10 * 86_400_000  # a fixed "received at" so decode is deterministic
#: columns of wall time, not a function of the input: left out when two runs' rows are compared
WALL = {"decisions": ("decided_at", "latency_ms"), "variant_metrics": ("latency_p50_ms", "latency_p99_ms")}


def trade(id, ts, price=100.0, amount=1.0, side="buy", symbol="A/USDT:USDT", exchange="x", **extra) -> dict:
    return {"exchange": exchange, "symbol": symbol, "id": str(id), "ts": ts, "price": price,
            "amount": amount, "side": side, **extra}


def raw_batches(messages: Iterable, size: int = 1000, start_offset: int = 0, partition: str = "0") -> list:
    """Messages (dicts are JSON-encoded, bytes pass as they are; ``(key, message)`` tuples carry a
    Kafka key, otherwise the key is None) -> RawBatches with offsets."""
    out, batch, offs, keys, off = [], [], [], [], start_offset
    for m in messages:
        key = None
        if isinstance(m, tuple):
            key, m = m
        if not isinstance(m, (bytes, bytearray)) and not _is_sentinel(m):
            m = msgspec.json.encode(m)
        if _is_sentinel(m):
            if batch:
                out.append(RawBatch("test", partition, offs, batch, RECV, keys))
                batch, offs, keys = [], [], []
            out.append(m)
            continue
        batch.append(bytes(m))
        offs.append(off)
        keys.append(key)
        off += 1
        if len(batch) >= size:
            out.append(RawBatch("test", partition, offs, batch, RECV, keys))
            batch, offs, keys = [], [], []
    if batch:
        out.append(RawBatch("test", partition, offs, batch, RECV, keys))
    return out


def _is_sentinel(m) -> bool:
    return type(m).__module__.startswith("bytewax")


def frame_batches(frame: pl.DataFrame, size: int, perp: list = ()) -> list[FrameBatch]:
    """A trade frame (exchange, symbol, id, ts, price, amount, side, offset) cut into batches;
    ``perp`` updates ride the batch of the trade at their ``seq`` (the last batch: any later)."""
    starts = list(range(0, frame.height, size))
    return [FrameBatch("test", "0", frame.slice(i, size), RECV,
                       [u for u in perp if i <= u.seq < i + size or (i == starts[-1] and u.seq >= frame.height)])
            for i in starts]


def perp_updates(frame: pl.DataFrame, seed: int, since_ms: int = 0) -> list:
    """Seeded perp updates for a synthetic tape's instruments (funding every minute, open interest
    every 5, a liquidation in about a fifth of the minutes), from ``since_ms`` on; ``seq`` places
    each after the frame's trades (in its arrival order) up to its ts."""
    from operators.perp import PerpUpdate

    import zlib

    run_max = np.maximum.accumulate(frame["ts"].to_numpy())
    out = []
    for sym in frame["symbol"].unique().sort().to_list():
        price = float(frame.filter(pl.col("symbol") == sym)["price"][0])
        for m in range(max(frame["ts"].min(), since_ms) // 60_000, frame["ts"].max() // 60_000 + 1):
            rng = np.random.default_rng([seed, zlib.crc32(sym.encode()), m])  # the same minute, the same data
            t = m * 60_000 + int(rng.integers(0, 200))  # mostly before the minute's first trade
            out.append(PerpUpdate(kind="funding", exchange="x", symbol=sym, ts=t, rate=float(rng.normal(1e-4, 1e-4)),
                                  funding_time=(t // 28_800_000 + 1) * 28_800_000, mark_price=price * (1 + rng.normal(0, 1e-4)),
                                  index_price=price))
            if m % 5 == 0:
                out.append(PerpUpdate(kind="open_interest", exchange="x", symbol=sym, ts=t + int(rng.integers(0, 59_000)),
                                      open_interest=float(1e4 * np.exp(rng.normal(0, 0.05)))))
            if rng.random() < 0.2:
                out.append(PerpUpdate(kind="liquidation", exchange="x", symbol=sym, ts=t + int(rng.integers(0, 59_000)),
                                      side="buy" if rng.random() < 0.5 else "sell", price=price,
                                      amount=float(rng.uniform(0.1, 5.0))))
    return [msgspec.structs.replace(u, seq=int(np.searchsorted(run_max, u.ts, side="right"))) for u in out]


def synthetic_tape(symbols: list[str], minutes: int, start_ms: int = T0, seed: int = 3,
                   rate: float = 0.5, jitter_ms: int = 0) -> pl.DataFrame:
    """Generator trades of several symbols merged in arrival order (ts, with optional jitter that
    reorders trades by up to ``jitter_ms`` without making any late), exchange "x", numbered by an
    ``offset`` column."""
    df = syn.tape(symbols, seed, start_ms, minutes, rate=rate, exchange="x", jitter_ms=jitter_ms)
    return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("offset"))


def settings(tmp_path=None, **kw):
    """Test settings: a private data dir (no ONNX artefacts or control files from elsewhere)."""
    import tempfile

    return load_settings(data_dir=str(tmp_path) if tmp_path else tempfile.mkdtemp(prefix="tapeflow-test-"),
                         epoch_interval_s=0, **kw)


def run_pipeline(items: list, store: Store, cfg=None, *, pace=None, now_getter=None, recovery=None,
                 epoch_s: float = 0.0, sink=None, instruments=None) -> SinkStats:
    """``instruments``: the portfolio's universe (exchange:symbol; the testing source names none)."""
    cfg = cfg or settings()
    stats = SinkStats()
    sink = sink or ClickHouseSink(store.dsn, store.database, stats, flush_rows=100_000, flush_ms=60_000)
    kw = {"now_getter": now_getter} if now_getter else {}
    if instruments is not None:
        kw["instruments"] = instruments
    flow = build_flow(cfg, TestingSource(items), sink, pace=pace, **kw)
    run_main(flow, epoch_interval=timedelta(seconds=epoch_s), recovery_config=recovery)
    return stats


def stored(store: Store, table: str, order: str, exclude: tuple = ()) -> pl.DataFrame:
    cols, rows = store.query(f"SELECT * FROM {table} FINAL ORDER BY {order}")
    df = pl.DataFrame(rows, schema=cols, orient="row", infer_schema_length=None) if rows else pl.DataFrame(schema=cols)
    return df.drop([c for c in exclude if c in df.columns])


def stored_bars(store: Store) -> pl.DataFrame:
    df = stored(store, "bars", "exchange, symbol, tf, start")
    return df.with_columns(
        (pl.col("start").dt.epoch("ms")).alias("start"), (pl.col("end").dt.epoch("ms")).alias("end"))


def reference_bars(trades: pl.DataFrame, tf: str) -> pl.DataFrame:
    """Bars of one timeframe straight from all trades: one sort, one group_by."""
    ms = TIMEFRAMES[tf]
    signed = pl.when(pl.col("side") == "buy").then(pl.col("amount")).otherwise(-pl.col("amount"))
    return (
        trades.sort("ts", "offset")
        .with_columns((pl.col("ts") - pl.col("ts") % ms).alias("start"))
        .group_by("exchange", "symbol", "start", maintain_order=True)
        .agg(
            pl.col("price").first().alias("open"), pl.col("price").max().alias("high"),
            pl.col("price").min().alias("low"), pl.col("price").last().alias("close"),
            pl.col("amount").sum().alias("volume"), (pl.col("price") * pl.col("amount")).sum().alias("notional"),
            pl.len().alias("trades"),
            pl.col("amount").filter(pl.col("side") == "buy").sum().alias("buy_volume"),
            pl.col("amount").filter(pl.col("side") == "sell").sum().alias("sell_volume"),
            signed.sum().alias("delta"), signed.cum_sum().min().alias("min_delta"),
            signed.cum_sum().max().alias("max_delta"),
        )
        .with_columns((pl.col("notional") / pl.col("volume")).alias("vwap"), pl.lit(tf).alias("tf"))
        .sort("exchange", "symbol", "start")
    )


REF_COLUMNS = ["open", "high", "low", "close", "volume", "notional", "vwap", "trades", "buy_volume",
               "sell_volume", "delta", "min_delta", "max_delta"]


def assert_bars_match_reference(store: Store, trades: pl.DataFrame, timeframes: Optional[list] = None) -> int:
    """Every stored bar of every timeframe equals the reference; returns bars compared."""
    got_all = stored_bars(store)
    n = 0
    for tf in timeframes or list(TIMEFRAMES):
        ref = reference_bars(trades, tf)
        got = got_all.filter(pl.col("tf") == tf).sort("exchange", "symbol", "start")
        assert got.height == ref.height, f"{tf}: {got.height} bars stored, reference has {ref.height}"
        assert got["start"].to_list() == ref["start"].to_list(), f"{tf}: bar starts differ"
        assert got["symbol"].to_list() == ref["symbol"].to_list()
        assert got["trades"].to_list() == ref["trades"].to_list(), f"{tf}: trade counts differ"
        for c in REF_COLUMNS:
            a, b = got[c].to_numpy().astype(float), ref[c].to_numpy().astype(float)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=f"{tf}.{c}")
        n += got.height
    return n
