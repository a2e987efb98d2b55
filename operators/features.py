"""Streaming features: ``FeatureRow`` per closed bar (``update``), multi-timeframe alignment
(``align``, ``OverlayBook``) and ``FeatureStage``, the per-instrument state the dataflow keeps.
Pure logic, no bytewax.

Each row's values come from one ``FeatureState`` per timeframe (``operators.feature_state``); the
batch form (``operators.feature_batch.compute_features``) steps the same state over a frame, so
streaming equals batch by construction.

Multi-timeframe: ``align`` / ``OverlayBook`` attach the latest CLOSED overlay rows (default 15m and
1h) to a primary row (default 5m), prefixed like ``15m_rsi``; an overlay that ends after the
primary bar, or is older than two of its intervals, is missing (None values, overlay_ok False).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import msgspec

from operators.bars import TIMEFRAMES, Bar
from operators.feature_catalog import FEATURE_NAMES, REGIME_UNKNOWN, WARM_BARS, regime_of
from operators.feature_state import FeatureState
from operators.labels import LabelState
from operators.labels import update as update_labels
from operators.perp import NAMES as PERP_NAMES


class FeatureRow(msgspec.Struct, kw_only=True):
    exchange: str
    symbol: str
    tf: str
    start: int
    end: int
    close: float
    warm: bool
    regime: str
    values: dict[str, Optional[float]]


def update(state: FeatureState, bar: Bar) -> Optional[FeatureRow]:
    """Feed a closed ``bar`` and return its features. A bar that is not newer than the last one
    (a duplicate or an out-of-order bar) changes nothing and returns None."""
    if state.last_start is not None and bar.start <= state.last_start:
        return None
    state.last_start = bar.start
    values = state.step(bar, bar.end - bar.start)
    return FeatureRow(
        exchange=bar.exchange, symbol=bar.symbol, tf=bar.tf, start=bar.start, end=bar.end,
        close=bar.close, warm=state.count >= WARM_BARS,
        regime=regime_of(values["adx"], values["atr_pct"]) or REGIME_UNKNOWN, values=values,
    )


# ------------------------------------------------------------------------ multi-timeframe


class AlignedRow(msgspec.Struct, kw_only=True):
    exchange: str
    symbol: str
    tf: str
    start: int
    end: int
    close: float
    warm: bool  # the primary row's warm flag; overlays report through overlay_ok
    regime: str
    features: dict[str, Optional[float]]
    overlay_ok: dict[str, bool]
    closed_at: int = 0  # wall ms when the bar's last 1m window closed (latency accounting)


_PREFIXED: dict[str, tuple[str, ...]] = {}


def _prefixed(tf: str) -> tuple[str, ...]:
    """``15m_rsi`` ... for every feature of an overlay timeframe (built once per timeframe)."""
    names = _PREFIXED.get(tf)
    if names is None:
        names = _PREFIXED[tf] = tuple(f"{tf}_{f}" for f in FEATURE_NAMES)
    return names


def aligned_feature_names(overlay_tfs: list[str] | tuple[str, ...]) -> list[str]:
    """Key order of ``AlignedRow.features``: the primary's features, its perp features
    (``operators.perp.NAMES``), then each overlay's features."""
    return list(FEATURE_NAMES) + PERP_NAMES + [f"{tf}_{f}" for tf in overlay_tfs for f in FEATURE_NAMES]


def overlay_usable(primary_end: int, overlay: Optional[FeatureRow], interval_ms: int,
                   now_end: Optional[int] = None) -> bool:
    """An overlay row may be used for a primary bar ending at ``primary_end`` iff it is CLOSED by
    then (overlay.end <= primary_end, and <= now_end) and FRESH (now - overlay.end <= 2 intervals)."""
    if overlay is None:
        return False
    now = primary_end if now_end is None else now_end
    return overlay.end <= min(primary_end, now) and now - overlay.end <= 2 * interval_ms


def align(primary: FeatureRow, overlays: dict[str, Optional[FeatureRow]], now_end: int,
          tf_ms: Optional[dict[str, int]] = None) -> AlignedRow:
    """The primary row with the overlays' features prefixed by their timeframe (``15m_rsi``).

    ``now_end`` is the time the row is judged at, normally ``primary.end``. An overlay is used
    only if ``overlay_usable``; otherwise its values are None and ``overlay_ok[tf]`` is False."""
    intervals = TIMEFRAMES if tf_ms is None else tf_ms
    features: dict[str, Optional[float]] = dict(primary.values)
    ok: dict[str, bool] = {}
    for tf, row in overlays.items():
        try:
            interval = intervals[tf]
        except KeyError:
            raise ValueError(f"no interval for overlay timeframe {tf!r}; known: {', '.join(intervals)}") from None
        usable = overlay_usable(primary.end, row, interval, now_end)
        ok[tf] = usable
        names = _prefixed(tf)
        if usable:
            features.update(zip(names, map(row.values.get, FEATURE_NAMES)))
        else:
            features.update(dict.fromkeys(names))
    return AlignedRow(
        exchange=primary.exchange, symbol=primary.symbol, tf=primary.tf, start=primary.start,
        end=primary.end, close=primary.close, warm=primary.warm, regime=primary.regime,
        features=features, overlay_ok=ok,
    )


@dataclass
class OverlayBook:
    """Per instrument: the recent FeatureRows of each overlay timeframe (the last ``keep``, oldest
    first; plain, picklable). A primary row gets, per overlay, the newest row that is closed by
    its end — kept rows that end later are skipped, never used — subject to ``align``'s rules."""

    primary: str = "5m"
    overlays: tuple = ("15m", "1h")
    tf_ms: dict = field(default_factory=lambda: dict(TIMEFRAMES))
    keep: int = 4
    recent: dict = field(default_factory=dict)  # tf -> list[FeatureRow], ascending end

    def offer(self, row: FeatureRow) -> Optional[AlignedRow]:
        """Store an overlay row; return the aligned row for a primary row; ignore other tfs."""
        if row.tf in self.overlays:
            rows = [r for r in self.recent.get(row.tf, []) if r.end != row.end] + [row]
            rows.sort(key=lambda r: r.end)
            self.recent[row.tf] = rows[-self.keep:]
            return None
        if row.tf == self.primary:
            return self.aligned(row)
        return None

    def latest_closed(self, tf: str, at: int) -> Optional[FeatureRow]:
        """The newest kept ``tf`` row ending at or before ``at``."""
        for r in reversed(self.recent.get(tf, [])):
            if r.end <= at:
                return r
        return None

    def aligned(self, primary: FeatureRow, now_end: Optional[int] = None) -> AlignedRow:
        now = primary.end if now_end is None else now_end
        at = min(primary.end, now)
        return align(primary, {tf: self.latest_closed(tf, at) for tf in self.overlays}, now, self.tf_ms)

    def feed(self, rows: list[FeatureRow]) -> list[AlignedRow]:
        """Rows closed by the same input (e.g. one roll-up step): overlays are stored first, so a
        15m bar ending together with a 5m bar is used for it; then primaries are aligned in order."""
        for r in rows:
            if r.tf in self.overlays:
                self.offer(r)
        return [self.aligned(r) for r in sorted(rows, key=lambda r: r.end) if r.tf == self.primary]


@dataclass
class FeatureStage:
    """Per instrument: features of the primary and overlay timeframes, closed-overlay alignment and
    matured labels. ``on_bars`` takes the bars one closed 1m bar produced (that minute and the
    higher periods it closed) and returns, in order, the labels that matured and the aligned
    primary row(s). Partial bars (emitted at end of input) are ignored: features use closed bars."""

    primary: str = "5m"
    overlays: tuple = ("15m", "1h")
    horizon: int = 3
    band_k: float = 0.5
    states: dict = field(default_factory=dict)  # tf -> FeatureState
    book: Optional[OverlayBook] = None
    labels: Optional[LabelState] = None

    def __post_init__(self) -> None:
        if self.book is None:
            self.book = OverlayBook(primary=self.primary, overlays=tuple(self.overlays))
        if self.labels is None:
            self.labels = LabelState(horizon=self.horizon, k=self.band_k)

    def on_bars(self, bars: list[Bar]) -> list:
        rows = []
        for bar in bars:
            if bar.partial or (bar.tf != self.primary and bar.tf not in self.overlays):
                continue
            st = self.states.get(bar.tf)
            if st is None:
                st = self.states[bar.tf] = FeatureState()
            row = update(st, bar)
            if row is not None:
                rows.append(row)
        out: list = []
        closed_at = max((b.closed_at for b in bars), default=0)
        for aligned in self.book.feed(rows):
            out.extend(update_labels(self.labels, aligned))
            out.append(msgspec.structs.replace(aligned, closed_at=closed_at) if closed_at else aligned)
        return out
