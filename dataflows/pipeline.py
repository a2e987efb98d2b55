"""The pipeline dataflow: trade batches -> validated frames -> 1m windows -> bars -> roll-ups ->
features -> scores -> sink.

Wiring only; the logic lives in ``operators/`` and ``models/``. Read it top to bottom:

    trades_in      batches from a source (Kafka messages, file rows, generator columns)
    decode         one Polars frame of valid trades per batch + dead letters + in-band events
    by_instrument  (instrument, that instrument's trades) — everything after is per instrument
    admit          drop duplicates, split off late trades and timestamp outliers, one chunk per 1m window
    window_1m      bytewax event-time tumbling windows over chunks (closes quiet keys on the clock)
    bar_1m         the bar of the closed window, cohorts from the rolling order history
    rollup         5m / 15m / 1h / 4h / 1d from closed 1m bars (a group per closed minute)
    features       primary + overlay features, closed-overlay alignment, matured labels
    score          River models (learn on matured labels) + the ONNX ensemble
    portfolio      one key: every instrument's 1m bars and scored rows in one event-time order
                   (Sequencer), decisions of the production strategy, paper fills at the next 1m
                   open, stops on 1m bars, risk guards, bandit rewards, data-quality gate
    clickhouse     bars, features, labels, predictions, metrics, decisions, fills, equity, late
                   trades, dead letters, events
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic, StatefulLogic
from bytewax.outputs import Sink

from dataflows.clock import PacedEventClock, utc_now
from dataflows.config import Settings
from dataflows.control import ControlInbox
from dataflows.routes import run_routes
from dataflows.snapshots import Snapshot, snapshotter, stateful_flat_map
from operators.bars import Bar, BarConfig, BarState, make_bar
from operators.rollups import BarGroup, RollupState, close_until, open_periods, rollup
from operators.features import FeatureStage
from operators.labels import Label
from operators.portfolio import BatchQuality, News, PORTFOLIO_KEY, Portfolio, Sequencer, upgrade_sequencer
from operators.signals import ScoredRow, metrics_rows, scored
from operators.admission import admit, chunk_late, concat_chunks, flush
from operators.admit_state import AdmitConfig, AdmitState
from operators.by_instrument import split_instruments
from operators.decode import decode_batch
from operators.records import MINUTE_MS, Chunk, Event, LateTrades
from operators.perp import PerpUpdate, absorb, levels_only
from dataflows.model_io import open_ensemble
from sinks.rows import SourcePosition

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
FAR_FUTURE_MS = 2**62


def _ms_dt(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


class AdmitLogic(StatefulLogic):
    """Per instrument: dedup, lateness and the jump rule (``operators.admission.admit``); at the end of
    the input, what a held jump becomes (``operators.admission.flush``)."""

    def __init__(self, resume: Optional[AdmitState], cfg: AdmitConfig, snap: Snapshot = copy.deepcopy):
        self.state, self.cfg, self.snap = resume or AdmitState(), cfg, snap

    def on_item(self, trades) -> tuple[list, bool]:
        return admit(self.state, trades, self.cfg).records(), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list, bool]:
        return flush(self.state, self.cfg).records(), StatefulLogic.RETAIN

    def snapshot(self) -> AdmitState:
        return self.snap(self.state)


def _bar_1m(cfg: BarConfig):
    def step(state: Optional[BarState], window: tuple[int, list[Chunk]]) -> tuple[BarState, list]:
        state = state or BarState()
        _, chunks = window
        first = chunks[0]
        news = [x for c in chunks for x in c.news]
        perps = [x for x in news if isinstance(x, PerpUpdate)]
        if perps:  # perp data: into the instrument's levels; a window without trades passes them on
            news = [x for x in news if not isinstance(x, PerpUpdate)]
            state.perp = absorb(getattr(state, "perp", None), perps)
        trades = chunks[0].trades if len(chunks) == 1 else concat_chunks(chunks)
        if trades.height == 0:  # only news carriers: perp data of a quiet minute, or live, where the wall
            return state, []  # clock closed the window of their trades first (rare)
        bar = make_bar(trades, first.exchange, first.symbol, first.window_start, MINUTE_MS, state, cfg)
        bar.closed_at = _wall_ms()
        bar.news = tuple(news)  # to the portfolio, with the bar
        bar.perp = getattr(state, "perp", None)
        state.perp = levels_only(bar.perp)
        return state, [bar]

    return step


class RollupLogic(StatefulLogic):
    """Passes 1m bars through and emits the higher-timeframe bars they close.

    With a paced clock (live), a period whose last minutes had no trades still closes on the
    wall clock: the estimated watermark advances ``pace`` event-ms per system-ms after the
    newest 1m bar, like ``PacedEventClock``. At EOF, open periods are emitted as they stand but
    kept, so a continued run re-emits them complete (same key: the row is replaced).
    """

    def __init__(self, state: Optional[RollupState], timeframes: list[str], va: float,
                 pace: Optional[float], grace_ms: int, now_getter: Callable[[], datetime],
                 snap: Snapshot = copy.deepcopy):
        self.state, self.snap = state or RollupState(), snap
        self.timeframes, self.va, self.pace, self.grace_ms = timeframes, va, pace, grace_ms
        self.now_getter = now_getter
        self.seen_at = now_getter()  # system time when the newest 1m bar came in

    def on_item(self, bar: Bar) -> tuple[Iterable[BarGroup], bool]:
        self.seen_at = self.now_getter()
        return [BarGroup([bar, *rollup(self.state, bar, self.timeframes, self.va)])], StatefulLogic.RETAIN

    def _watermark(self) -> int:
        elapsed = (self.now_getter() - self.seen_at) / timedelta(milliseconds=1)
        return int((self.state.last_end or 0) + elapsed * (self.pace or 0) - self.grace_ms)

    def on_notify(self) -> tuple[Iterable[BarGroup], bool]:
        return _group(close_until(self.state, self._watermark(), self.va)), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[BarGroup], bool]:
        return _group(open_periods(self.state, self.va)), StatefulLogic.RETAIN

    def notify_at(self) -> Optional[datetime]:
        if self.pace is None or not self.state.open or self.state.last_end is None:
            return None
        first_end = min(b.end for b in self.state.open.values())
        wait_ms = (first_end + self.grace_ms - self.state.last_end) / self.pace
        return self.seen_at + timedelta(milliseconds=max(wait_ms, 0))

    def snapshot(self) -> RollupState:
        return self.snap(self.state)


def _group(bars: list[Bar]) -> list[BarGroup]:
    return [BarGroup(bars)] if bars else []


def _features(settings: Settings):
    def step(state: Optional[FeatureStage], group: BarGroup) -> tuple[FeatureStage, list]:
        state = state or FeatureStage(settings.primary_tf, tuple(settings.overlay_tfs),
                                        settings.label_horizon, settings.label_band_k)
        # the group's 1m bar goes last, on to the portfolio behind every row of its minute (on this
        # path an instrument's items keep their order: the Sequencer's progress; not to the sink)
        return state, [*state.on_bars(group.bars), *(b for b in group.bars if b.tf == "1m")]

    return step


def _score(settings: Settings, ensemble):
    """River per instrument (state) + the shared ONNX ensemble (closure: sessions do not pickle)."""
    from models.online import OnlineConfig, OnlineModels  # here: River costs ~1 s of start-up, a bench without models skips it

    cfg = OnlineConfig(seed=settings.seed, arf_models=settings.arf_models, arf_max_depth=settings.arf_max_depth,
                       warmup_labels=settings.online_warmup_labels, features=tuple(settings.online_features))

    def step(state, item) -> tuple[Any, list]:
        if state is None:
            state = OnlineModels(cfg) if settings.online_models else False
        if isinstance(item, Bar):  # a 1m bar on its way to the portfolio
            return state, [item]
        if isinstance(item, Label):
            if not state:
                return state, [item]
            state.learn(item)
            return state, [item, *metrics_rows(item, state.metrics())]
        preds = state.predict(item) if state else {}
        refusals = []
        if ensemble is not None:  # per bar: it may not score instruments or bars it was not meant for
            preds.update(ensemble.score(item.features, instrument=f"{item.exchange}:{item.symbol}", start=item.start))
            refusals = ensemble.take_events()  # model_refused events -> the events table
        return state, [item, scored(item, preds, _wall_ms(), item.closed_at), *refusals]

    return step


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class PortfolioLogic(StatefulBatchLogic):
    """The one ``"portfolio"`` key: production strategy (+ variants) over every instrument's scored
    rows and 1m bars, with the data-quality gate and operator commands (kill-switch resets).

    Market items go through a ``Sequencer`` (``operators.portfolio``): the book sees them in one
    event-time order whatever order the partitions and processes deliver them in. Each batch
    applies its data-quality news (gap events, late trades, dead-letter counts) before the market
    items it releases, so a gap reported in band ahead of the trades after it gates every bar those
    trades close.

    Operator requests are applied once per state: their ids are part of it (``applied``), and the
    inbox offers again every request this run's lineage took, so one taken just before a crash is
    applied again to the state restored from the snapshot before it (``dataflows.control``)."""

    def __init__(self, state: Optional[tuple], make: Callable[[], Portfolio], inbox,
                 make_seq: Callable[[], Optional[Sequencer]] = Sequencer, snap: Snapshot = copy.deepcopy):
        if state is None:
            state = (make(), make_seq(), {})
        self.p, self.seq, self.applied = state
        if self.seq is not None and not hasattr(self.seq, "progress"):  # a snapshot of the previous release
            self.seq = upgrade_sequencer(self.seq, make_seq())
        self.inbox, self.snap = inbox, snap

    def on_batch(self, items: list) -> tuple[list, bool]:
        out: list = []
        now = _wall_ms()
        for req in self.inbox.take() if self.inbox else []:
            if req["id"] in self.applied:
                continue
            at = int(req.get("requested_at_ms") or now)  # the audit event's time: the same if replayed
            self.applied[req["id"]] = at
            out.extend(self.p.reset_kill_switch(at, req.get("by", "operator"), req.get("strategy", "production")))
        market = []
        for item in items:
            if isinstance(item, (ScoredRow, Bar)):
                market.append(item)
            elif isinstance(item, LateTrades):
                self.p.quality.on_late(f"{item.exchange}:{item.symbol}", item.trades["ts"].to_list())
            elif isinstance(item, News):
                self.p.quality.on_news(item.instrument, item.items)
            elif isinstance(item, Event):
                self.p.quality.on_event(item)
            elif isinstance(item, BatchQuality):
                self.p.quality.on_batch(item)
        if self.seq is None:
            for item in market:
                out.extend(self._market(item))
            return out, StatefulBatchLogic.RETAIN
        for item in market:
            out.extend(self.seq.push(item, now))
        return out + self._release(now), StatefulBatchLogic.RETAIN

    def _release(self, now: int) -> list:
        out: list = []
        for x in self.seq.release(now):
            out.extend([x] if isinstance(x, Event) else self._market(x))
        return out

    def _market(self, item) -> list:
        if isinstance(item, Bar):
            return self.p.on_bar(item)
        return self.p.on_scored(item, _wall_ms())

    def on_notify(self) -> tuple[list, bool]:
        return (self._release(_wall_ms()) if self.seq is not None else []), StatefulBatchLogic.RETAIN

    def notify_at(self) -> Optional[datetime]:
        at = self.seq.next_check() if self.seq is not None else None
        return None if at is None else _ms_dt(at)

    def on_eof(self) -> tuple[list, bool]:
        out: list = []
        if self.seq is not None:
            for x in self.seq.flush():
                out.extend(self._market(x))
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> tuple:
        return self.snap((self.p, self.seq, self.applied))


def _position(batch) -> Optional[SourcePosition]:
    offsets = getattr(batch, "offsets", None)
    return SourcePosition(batch.source, batch.partition, offsets[-1] + 1) if offsets else None


def _late_chunk(key_window_chunk: tuple[int, Chunk]) -> list:
    """A chunk that reached a window closed by the wall clock (live): its trades are late rows, and
    the news it carried goes to the portfolio on its own (``News``), as it can no longer ride a bar."""
    _, chunk = key_window_chunk
    out: list = [chunk_late(chunk, "window_closed")] if chunk.trades.height else []
    news = tuple(x for x in chunk.news if not isinstance(x, PerpUpdate))
    perps = [x for x in chunk.news if isinstance(x, PerpUpdate)]
    if perps:  # stored (raw tables) but too late for any bar: say so
        out.append(Event(kind="perp_late", ts=max(u.ts for u in perps), exchange=chunk.exchange, symbol=chunk.symbol,
                         from_ts=min(u.ts for u in perps), to_ts=max(u.ts for u in perps), source="pipeline",
                         reason=f"{len(perps)} perp update(s) reached a 1m window the wall clock had closed"))
    return out + ([News(f"{chunk.exchange}:{chunk.symbol}", news)] if news else [])


def build_flow(
    settings: Settings,
    source: Source,
    sink: Sink,
    *,
    pace: Optional[float] = None,
    now_getter: Callable[[], datetime] = utc_now,
    flow_id: str = "tapeflow",
    ensemble: Any = "auto",
    control_lineage: Optional[str] = None,
    instruments: Optional[Iterable[str]] = None,
    snapshots: bool = True,
    balance_workers: int = 1,
    recovery_dir: Optional[Path] = None,
    resuming: bool = False,
) -> Dataflow:
    """The whole pipeline. ``pace``: None for replay/backfill (event time only), 1.0 for live.
    ``ensemble``: the ONNX ensemble scorer ("auto": ``dataflows.model_io.open_ensemble``; None: off).
    ``control_lineage``: whose operator requests these are (``dataflows.control.lineage_of`` the
    recovery directory; None: this flow's own). ``instruments``: the universe the portfolio waits
    for (``exchange:symbol``; None: the source's ``instruments()``, if it has one). ``snapshots``:
    False when no recovery directory keeps them (``dataflows.snapshots``). ``balance_workers``: spread the
    universe's instruments over that many workers (``operators.routing``; 1: their own keys), or keep
    the keys chosen by the first run of ``recovery_dir`` (``dataflows.routes``; ``resuming``: it
    held state before this run)."""
    snap = snapshotter(snapshots)
    strategy_cfg, quality_cfg, optimizer_cfg = (settings.strategy_config(), settings.quality_config(),
                                                settings.optimizer_config())

    def make_portfolio() -> Portfolio:
        return Portfolio.create(strategy_cfg, quality_cfg, optimizer=optimizer_cfg, primary_tf=settings.primary_tf,
                                  overlay_tfs=tuple(settings.overlay_tfs))

    if instruments is None:  # the source's universe (synthetic symbols, a tape's instruments, ccxt feeds)
        instruments = getattr(source, "instruments", lambda: ())()
    universe = tuple(sorted(instruments))
    home = getattr(source, "home_worker", None)  # the worker that reads an instrument, where the source knows it
    route = run_routes(universe, balance_workers, home, recovery_dir, resuming, settings.store_worker_share)
    wait_ms = settings.portfolio_wait_ms if pace is not None else None

    def make_sequencer() -> Sequencer:
        return Sequencer(universe, wait_ms)

    inbox = ControlInbox(settings.data_dir, lineage=control_lineage)
    if ensemble == "auto":  # the named one (TAPEFLOW_MODEL) or one trained on this store
        ensemble = open_ensemble(settings)
    admit_cfg, bar_cfg = settings.admit_config(), settings.bar_config()
    higher = [tf for tf in settings.timeframes if tf != "1m"]
    max_future = settings.max_future_ms

    flow = Dataflow(flow_id)
    batches = op.input("trades_in", flow, source)
    # Kafka: each batch's position goes to the sink, which commits it once the epoch is stored
    positions = [op.filter_map("positions", batches, _position)] if getattr(source, "commit_positions", False) else []
    limits = settings.decode_limits()
    decoded = op.map("decode", batches, lambda b: decode_batch(b, b.recv_ts, max_future, limits))
    dead = op.flat_map("dead_letters", decoded, lambda d: d.dead)
    events = op.flat_map("events", decoded, lambda d: d.events)
    batch_quality = op.map("batch_quality", decoded, lambda d: BatchQuality(d.frame.height, len(d.dead)))
    per_instrument = op.flat_map("by_instrument", decoded, lambda d: split_instruments(d.frame, d.events, route))
    admitted = op.stateful("admit", per_instrument, lambda resume: AdmitLogic(resume, admit_cfg, snap))
    is_chunk = op.branch("chunks", admitted, lambda kv: isinstance(kv[1], Chunk))

    clock = PacedEventClock(
        ts_getter=lambda c: _ms_dt(c.max_ts),
        wait=timedelta(milliseconds=settings.lateness_ms),
        pace=pace,
        now_getter=now_getter,
    )
    windows = win.collect_window(
        "window_1m", is_chunk.trues, clock,
        win.TumblingWindower(length=timedelta(minutes=1), align_to=EPOCH), ordered=False,
    )
    late_chunks = op.flat_map_value("late_chunks", windows.late, _late_chunk)
    bars_1m = stateful_flat_map("bar_1m", windows.down, _bar_1m(bar_cfg), snap)
    groups = op.stateful(
        "rollup", bars_1m,
        lambda resume: RollupLogic(resume, higher, bar_cfg.value_area, pace, settings.lateness_ms, now_getter, snap),
    )
    all_bars = op.flat_map_value("bars", groups, lambda g: g.bars)
    featured = stateful_flat_map("features", groups, _features(settings), snap)
    scored_rows = stateful_flat_map("score", featured, _score(settings, ensemble), snap)

    # late counts and data-gap events ride the instruments' bars (trades.carry_news); what the
    # window refused (live: closed on the wall clock) comes on its own
    portfolio_in = op.merge(
        "portfolio_in",
        op.filter("market", op.key_rm("scored_out", scored_rows), lambda x: isinstance(x, (ScoredRow, Bar))),
        op.key_rm("window_late", late_chunks),
        batch_quality,
    )
    trading = op.stateful_batch(
        "portfolio", op.key_on("to_portfolio", portfolio_in, lambda _: PORTFOLIO_KEY),
        lambda resume: PortfolioLogic(resume, make_portfolio, inbox, make_sequencer, snap))

    records = op.merge(
        "records",
        op.key_rm("bars_out", all_bars),
        op.filter("scores_out", op.key_rm("scores", scored_rows), lambda x: not isinstance(x, Bar)),  # bars: above
        op.key_rm("trading_out", trading),
        op.key_rm("admit_out", is_chunk.falses),
        op.filter("late_out", op.key_rm("late_rows", late_chunks), lambda x: isinstance(x, (LateTrades, Event))),
        dead,
        events,
        *positions,
    )
    op.output("clickhouse", op.key_on("to_sink", records, lambda r: type(r).__name__), sink)
    return flow
