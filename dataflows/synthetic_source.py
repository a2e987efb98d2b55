"""The synthetic source: seeded synthetic trades (and perp updates) as a bytewax source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import polars as pl
from bytewax.inputs import FixedPartitionedSource

from dataflows.frame_partition import FramePartition, Pacer, Progress
from operators import synthetic as syn
from operators.records import MINUTE_MS
from operators.records import FrameBatch
from operators.routing import partition_reader


class _SyntheticPartition(FramePartition):
    """Several symbols generated in lockstep, minute by minute, merged in time order (like a Kafka
    partition carrying several keys), ``batch_minutes`` minutes a batch. Snapshot: per symbol,
    (generator state at the start of what is not fully emitted, next offset to emit)."""

    def __init__(self, src: "SyntheticSource", part: str, specs: list[syn.InstrumentSpec],
                 resume: Optional[dict]):
        super().__init__(src.source_name, part, src.speed)
        self.pacer = src.pacer()  # one wall clock for every partition, like a live feed
        self.src, self.specs = src, specs
        self.at = {sp.symbol: resume[sp.symbol][0] if resume else syn.initial_state(sp) for sp in specs}
        self.emitted = {sp.symbol: resume[sp.symbol][1] if resume else 0 for sp in specs}
        self.base = dict(self.at)
        self.total_minutes = (src.end_ms - src.start_ms) // MINUTE_MS
        self.batch_minutes = src.batch_minutes()
        self.perp_wait: list = []  # perp updates generated, not yet released (after the trades before them)

    def _minute(self) -> int:
        return min(st.minute for st in self.at.values())

    def _load(self) -> Optional[pl.DataFrame]:
        while self._minute() < self.total_minutes:
            self.base = dict(self.at)
            parts, codes, minutes = [], [], 0
            while minutes < self.batch_minutes and self._minute() < self.total_minutes:
                minutes += 1
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

    def batch_minutes(self) -> int:
        """Minutes of event time in one batch, the same in every partition: ``batch_size`` trades in
        the busiest partition in calm minutes (``syn.TRADES_PER_ORDER``; up to about twice as many
        when busy), fewer in the others.

        bytewax polls each partition once a round, so batches of equal event-time spans keep the
        partitions level in event time. Batches of ``batch_size`` trades did not: a partition of
        slower symbols ran ahead (the main job's SOL, 4 orders/s, twice as fast as BTC's 8), and
        the portfolio, which takes the instruments' bars in event-time order
        (``operators.portfolio.Sequencer``), held every bar of the faster ones until the slowest
        caught up: memory that grew with the length of the run."""
        n = self._n_parts()
        rates = [sum(syn.spec_for(s, self.rate).rate for k, s in enumerate(self.symbols) if k % n == i)
                 for i in range(n)]
        per_minute = max(max(rates) * 60 * syn.TRADES_PER_ORDER, 1.0)
        return max(1, int(self.batch_size // per_minute))

    def instruments(self) -> list[str]:
        return [f"{self.exchange}:{s}" for s in self.symbols]

    def home_worker(self, instrument: str, workers: int) -> Optional[int]:
        """The worker that generates ``instrument``: symbol ``k`` is in partition ``k % n``
        (``operators.routing.partition_reader``)."""
        ex, _, sym = instrument.partition(":")
        if ex != self.exchange or sym not in self.symbols:
            return None
        return partition_reader(f"synthetic-{self.symbols.index(sym) % self._n_parts()}", self.list_parts(), workers)

    def pacer(self) -> Pacer:
        """The partitions' shared pacer (this process): anchored once, at ``start_ms``, so paced
        partitions do not drift apart by when each was first polled."""
        if getattr(self, "_pacer", None) is None:
            self._pacer = Pacer(self.speed, anchor_event_ms=self.start_ms)
        return self._pacer

    def list_parts(self) -> list[str]:
        return [f"synthetic-{i}" for i in range(self._n_parts())]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[dict]):
        i, n = int(for_part.rsplit("-", 1)[1]), self._n_parts()
        specs = [syn.spec_for(sym, self.rate) for k, sym in enumerate(self.symbols) if k % n == i]
        return _SyntheticPartition(self, for_part, specs, resume_state)
