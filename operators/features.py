"""Features (SPEC §4): per instrument and timeframe, from closed bars only. Pure logic, no bytewax.

``compute_features`` is vectorised Polars over a frame of consecutive bars of ONE instrument and
timeframe (columns named like ``Bar`` fields) and returns a row for every bar. Every value at row
``i`` is computed from rows ``<= i`` only (no lookahead). Rows without enough history hold nulls,
never made-up values, and ``warm`` is False until every feature is defined; ``WARMUP`` gives, per
feature, the number of bars (the current one included) needed for a value, and ``WARM_BARS`` (64,
set by ``atr_pct``) the bars needed for a warm row. Where a ratio has no defined value on valid data
(a constant window, no movement) a neutral value is used and documented below, never a null.

Definitions (n = period; every smoothing is seeded with the simple mean of its first n inputs,
as in TA-Lib, then continues recursively):

- ``ret_k``      log(close / close k bars ago), k = 1, 3, 12.
- ``rv``         realised volatility: sqrt(mean of the last 20 squared 1-bar log returns x bars per
                 year), bars per year = 365 days / timeframe (zero-mean estimator, no demeaning).
- ``atr``        ATR(14), Wilder: true range max(h-l, |h-c_prev|, |l-c_prev|) from the 2nd bar on,
                 average of the first 14, then atr = atr_prev + (tr - atr_prev) / 14.
- ``atr_pct``    mid-rank percentile of the current ATR among the ATR values of the last 500 bars
                 (current included): (#less + (#equal - 1) / 2) / (count - 1), in [0, 1]; needs
                 ``ATR_PCT_MIN`` ATR values. A constant ATR gives 0.5.
- ``rsi``        RSI(14), Wilder averages of gains and losses: 100 * gain / (gain + loss); 50 when
                 there was no movement at all.
- ``ema_gap``    (EMA12 - EMA26) / close (EMA alpha = 2 / (n + 1)).
- ``macd_hist``  (macd - EMA9(macd)) / close, macd = EMA12 - EMA26.
- ``bb_width``   4 * std20 / sma20 (population std, ddof=0).
- ``adx``        ADX(14), Wilder: +DM/-DM and TR smoothed over 14, DI = 100 * DM / TR,
                 DX = 100 * |+DI - -DI| / (+DI + -DI) (0 when both are 0), ADX = Wilder average of
                 DX over 14 (``dmi`` returns +DI, -DI, DX and ADX).
- ``vol_z``, ``delta_z``  (x - mean20) / std20 over the last 20 bars, current included (ddof=0);
                 0 when the window is constant.
- ``cvd_slope``  least-squares slope (per bar) of cumulative delta over the last 10 bars, divided
                 by the mean volume of those bars (0 when that is 0). Cumulative delta's starting
                 point does not matter: the slope only depends on the deltas inside the window.
- ``vwap_dev``   close / vwap - 1 (0 when vwap <= 0).
- ``intensity``  trades per minute / its mean over the last 20 bars, current included (1 when the
                 mean is 0).
- ``s_top``, ``s_bot``, ``s_mood`` the bar's cohort signals; ``*_ema`` their EMA with span 5.
- ``regime``     (string column) VOLATILE if atr_pct >= 0.8; else STRONG_TREND if adx >= 25;
                 else RANGING if adx < 20; else CHOPPY. Null while adx or atr_pct is null.

Streaming: ``FeatureState`` keeps the last H bars (default 600) as plain columns and ``update``
returns the newest bar's features computed with ``compute_features`` over exactly that window.
Because the smoothings are seeded where the window starts, a streaming value equals
``compute_features`` over the same last-H bars — not over the whole history (the difference
decays like (1 - 1/14)^H for Wilder smoothing, i.e. ~1e-19 at H = 600; ``atr_pct`` only ever
sees 500 bars anyway).

Multi-timeframe: ``align`` / ``OverlayBook`` attach the latest CLOSED overlay rows (default 15m and
1h) to a primary row (default 5m), prefixed like ``15m_rsi``; an overlay that ends after the
primary bar, or is older than two of its intervals, is missing (None values, overlay_ok False).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import msgspec
import polars as pl

from operators.bars import TIMEFRAMES, Bar
from operators import labels as L

YEAR_MS = 365 * 86_400_000

RET_LAGS = (1, 3, 12)
RV_N = 20
ATR_N = 14
ATR_PCT_WINDOW = 500
ATR_PCT_MIN = 50  # ATR values needed before atr_pct is defined
RSI_N = 14
EMA_FAST, EMA_SLOW, MACD_SIGNAL = 12, 26, 9
BB_N = 20
ADX_N = 14
Z_N = 20
CVD_N = 10
INTENSITY_N = 20
COHORT_SPAN = 5
ADX_TREND, ADX_RANGE, ATR_PCT_VOLATILE = 25.0, 20.0, 0.8

STRONG_TREND, VOLATILE, RANGING, CHOPPY = "STRONG_TREND", "VOLATILE", "RANGING", "CHOPPY"
REGIME_UNKNOWN = "UNKNOWN"  # FeatureRow.regime while the frame's regime is null (warm-up)

FEATURE_NAMES: list[str] = [
    "ret_1", "ret_3", "ret_12",
    "rv",
    "atr", "atr_pct",
    "rsi",
    "ema_gap", "macd_hist",
    "bb_width",
    "adx",
    "vol_z", "delta_z",
    "cvd_slope",
    "vwap_dev",
    "intensity",
    "s_top", "s_bot", "s_mood",
    "s_top_ema", "s_bot_ema", "s_mood_ema",
]

# Bars (current included) needed before the feature is defined: first non-null row index + 1.
WARMUP: dict[str, int] = {
    "ret_1": 2, "ret_3": 4, "ret_12": 13,
    "rv": RV_N + 1,                                   # 21: 20 one-bar returns
    "atr": ATR_N + 1,                                 # 15: 14 true ranges (need a previous close)
    "atr_pct": ATR_N + ATR_PCT_MIN,                   # 64: 50 ATR values
    "rsi": RSI_N + 1,                                 # 15: 14 changes
    "ema_gap": EMA_SLOW,                              # 26
    "macd_hist": EMA_SLOW + MACD_SIGNAL - 1,          # 34
    "bb_width": BB_N,                                 # 20
    "adx": 2 * ADX_N,                                 # 28: 14 DX values, DX needs 15 bars
    "vol_z": Z_N, "delta_z": Z_N,                     # 20
    "cvd_slope": CVD_N,                               # 10
    "vwap_dev": 1,
    "intensity": INTENSITY_N,                         # 20
    "s_top": 1, "s_bot": 1, "s_mood": 1,
    "s_top_ema": COHORT_SPAN, "s_bot_ema": COHORT_SPAN, "s_mood_ema": COHORT_SPAN,  # 5
    "regime": ATR_N + ATR_PCT_MIN,                    # 64: max(adx, atr_pct)
}
WARM_BARS = max(WARMUP.values())  # 64: first warm row is index WARM_BARS - 1

# Columns compute_features reads; KEY_COLUMNS are passed through when present.
INPUT_COLUMNS = ("high", "low", "close", "volume", "vwap", "trades", "delta",
                 "s_top", "s_bot", "s_mood")
KEY_COLUMNS = ("exchange", "symbol", "tf", "start", "end", "close")

_IDX = pl.col("_i")


def _seeded(x: pl.Expr, n: int, alpha: float, first: int) -> pl.Expr:
    """Recursive smoothing y = y_prev + alpha * (x - y_prev), seeded at row ``first + n - 1`` with
    the mean of the first n inputs (``x`` is defined from row ``first`` on). Wilder: alpha = 1/n;
    EMA: alpha = 2/(n+1). Before the seed the rolling mean is null and ewm_mean skips leading
    nulls, so the recursion starts at the seed."""
    seed = first + n - 1
    return (
        pl.when(_IDX > seed).then(x).otherwise(x.rolling_mean(n, min_samples=n))
        .ewm_mean(alpha=alpha, adjust=False)
    )


def _wilder(x: pl.Expr, n: int, first: int) -> pl.Expr:
    return _seeded(x, n, 1.0 / n, first)


def _ema(x: pl.Expr, n: int, first: int) -> pl.Expr:
    return _seeded(x, n, 2.0 / (n + 1), first)


def _safe_div(num: pl.Expr, den: pl.Expr, default: float) -> pl.Expr:
    return pl.when(den == 0).then(pl.lit(default)).otherwise(num / den)


def _zscore(x: pl.Expr, n: int) -> pl.Expr:
    mean = x.rolling_mean(n, min_samples=n)
    std = x.rolling_std(n, min_samples=n, ddof=0)
    flat = std <= 1e-12 * mean.abs()  # constant window (guards against rounding residue)
    return pl.when(flat).then(pl.lit(0.0)).otherwise((x - mean) / std)


def _cvd_weights(n: int) -> list[float]:
    """OLS slope of y_0..y_{n-1} on 0..n-1 with y = cumulative delta equals sum_m c_m * delta_m
    over the window's deltas 1..n-1 (delta_0 only shifts the level): c_m = sum_{j>=m}(j - xbar)/Sxx."""
    xbar = (n - 1) / 2
    sxx = sum((j - xbar) ** 2 for j in range(n))
    return [0.0] + [sum(j - xbar for j in range(m, n)) / sxx for m in range(1, n)]


def _true_range() -> pl.Expr:
    """max(h - l, |h - prev close|, |l - prev close|), defined from the second row on."""
    h, l, pc = pl.col("high"), pl.col("low"), pl.col("close").shift(1)
    return pl.when(_IDX >= 1).then(pl.max_horizontal(h - l, (h - pc).abs(), (l - pc).abs()))


def _directional_moves() -> tuple[pl.Expr, pl.Expr]:
    """Wilder's +DM and -DM, defined from the second row on."""
    h, l = pl.col("high"), pl.col("low")
    up, down = h - h.shift(1), l.shift(1) - l
    pdm = pl.when(_IDX < 1).then(None).when((up > down) & (up > 0)).then(up).otherwise(0.0)
    mdm = pl.when(_IDX < 1).then(None).when((down > up) & (down > 0)).then(down).otherwise(0.0)
    return pdm, mdm


def _dmi_stages(n: int) -> list[list[pl.Expr]]:
    """Stages adding _tr, _pdm, _mdm, _str (= ATR(n)), _spdm, _smdm, plus_di, minus_di, dx, adx."""
    pdm, mdm = _directional_moves()
    pdi, mdi = pl.col("plus_di"), pl.col("minus_di")
    return [
        [_true_range().alias("_tr"), pdm.alias("_pdm"), mdm.alias("_mdm")],
        [_wilder(pl.col(x), n, 1).alias(f"_s{x[1:]}") for x in ("_tr", "_pdm", "_mdm")],
        [_safe_div(100.0 * pl.col("_spdm"), pl.col("_str"), 0.0).alias("plus_di"),
         _safe_div(100.0 * pl.col("_smdm"), pl.col("_str"), 0.0).alias("minus_di")],
        [_safe_div(100.0 * (pdi - mdi).abs(), pdi + mdi, 0.0).alias("dx")],
        [_wilder(pl.col("dx"), n, n).alias("adx")],
    ]


def _run(lf: pl.LazyFrame, stages) -> pl.LazyFrame:
    for stage in stages:
        lf = lf.with_columns(stage)
    return lf


def _collect(lf: pl.LazyFrame) -> pl.DataFrame:
    # The in-memory engine without plan optimisation is the fastest for a few hundred rows
    # (the default streaming engine costs ~3x more here; measured with polars 2.1).
    return lf.collect(engine="in-memory", optimizations=_NO_OPT)


_NO_OPT = pl.QueryOptFlags.none()


def dmi(bars: pl.DataFrame, n: int = ADX_N) -> pl.DataFrame:
    """+DI, -DI, DX and ADX(n) (Wilder) for every row of ``bars`` (columns high, low, close);
    ``compute_features`` uses the same expressions (its ``atr`` is the smoothed TR for n = 14)."""
    lf = bars.lazy().select(pl.col("high", "low", "close").cast(pl.Float64), pl.int_range(pl.len()).alias("_i"))
    return _collect(_run(lf, _dmi_stages(n)).select("plus_di", "minus_di", "dx", "adx"))


def _feature_stages() -> list[list[pl.Expr]]:
    """The whole feature computation as stages of expressions over named columns (small
    expressions are fast; built once at import: expressions are immutable)."""
    c, v, d, n_tr = pl.col("close"), pl.col("volume"), pl.col("delta"), pl.col("trades")
    dmi_stages = _dmi_stages(ADX_N)
    stage1 = dmi_stages[0] + [
        *[(c / c.shift(k)).log().alias(f"ret_{k}") for k in RET_LAGS],
        (c - c.shift(1)).alias("_diff"),
        _ema(c, EMA_FAST, 0).alias("_ema_fast"),
        _ema(c, EMA_SLOW, 0).alias("_ema_slow"),
        (4.0 * c.rolling_std(BB_N, min_samples=BB_N, ddof=0) / c.rolling_mean(BB_N, min_samples=BB_N))
        .alias("bb_width"),
        _zscore(v, Z_N).alias("vol_z"),
        _zscore(d, Z_N).alias("delta_z"),
        _safe_div(d.rolling_sum(CVD_N, weights=_cvd_weights(CVD_N), min_samples=CVD_N),
                  v.rolling_mean(CVD_N, min_samples=CVD_N), 0.0).alias("cvd_slope"),
        pl.when(pl.col("vwap") > 0).then(c / pl.col("vwap") - 1.0).otherwise(0.0).alias("vwap_dev"),
        _safe_div(n_tr, n_tr.rolling_mean(INTENSITY_N, min_samples=INTENSITY_N), 1.0).alias("intensity"),
        *[_ema(pl.col(s), COHORT_SPAN, 0).alias(f"{s}_ema") for s in ("s_top", "s_bot", "s_mood")],
    ]
    r1, diff = pl.col("ret_1"), pl.col("_diff")
    stage2 = dmi_stages[1] + [
        (r1 * r1).rolling_mean(RV_N, min_samples=RV_N).sqrt().alias("_rms"),
        _wilder(diff.clip(lower_bound=0.0), RSI_N, 1).alias("_gain"),
        _wilder((-diff).clip(lower_bound=0.0), RSI_N, 1).alias("_loss"),
        (pl.col("_ema_fast") - pl.col("_ema_slow")).alias("_macd"),
    ]
    atr = pl.col("_str") if ATR_N == ADX_N else pl.col("_atr")
    if ATR_N != ADX_N:
        stage2.append(_wilder(pl.col("_tr"), ATR_N, 1).alias("_atr"))
    gain, loss, m = pl.col("_gain"), pl.col("_loss"), pl.col("_macd")
    stage3 = dmi_stages[2] + [
        atr.alias("atr"),
        ((atr.rolling_rank(ATR_PCT_WINDOW, method="average", min_samples=ATR_PCT_MIN) - 1.0)
         / (atr.is_not_null().cast(pl.Float64).rolling_sum(ATR_PCT_WINDOW, min_samples=1) - 1.0))
        .alias("atr_pct"),
        _safe_div(100.0 * gain, gain + loss, 50.0).alias("rsi"),
        (m / c).alias("ema_gap"),
        _ema(m, MACD_SIGNAL, EMA_SLOW - 1).alias("_signal"),
    ]
    stage4 = dmi_stages[3] + [((m - pl.col("_signal")) / c).alias("macd_hist")]
    stage5 = dmi_stages[4]
    return [stage1, stage2, stage3, stage4, stage5]


def _regime() -> pl.Expr:
    adx, pct = pl.col("adx"), pl.col("atr_pct")
    return (
        pl.when(adx.is_null() | pct.is_null()).then(None)
        .when(pct >= ATR_PCT_VOLATILE).then(pl.lit(VOLATILE))
        .when(adx >= ADX_TREND).then(pl.lit(STRONG_TREND))
        .when(adx < ADX_RANGE).then(pl.lit(RANGING))
        .otherwise(pl.lit(CHOPPY))
    )


def _all_stages() -> tuple[tuple[pl.Expr, ...], ...]:
    stages = _feature_stages()
    stages[-1] = stages[-1] + [(_IDX >= WARM_BARS - 1).alias("warm")]
    stages.append([_regime().alias("regime")])
    return tuple(tuple(s) for s in stages)


_STAGES = _all_stages()  # immutable: a tuple of tuples of (immutable) expressions


def compute_features(bars: pl.DataFrame, tf_ms: int) -> pl.DataFrame:
    """Features for every row of ``bars`` (consecutive bars of one instrument and timeframe,
    oldest first; finite values and positive prices, as ``operators.bars`` makes them).

    Returns the KEY_COLUMNS present in ``bars``, FEATURE_NAMES (Float64, null while undefined),
    ``regime`` (String, null while undefined) and ``warm`` (Boolean: the row has WARM_BARS bars of
    history, from which on every feature is defined)."""
    missing = [c for c in INPUT_COLUMNS if c not in bars.columns]
    if missing:
        raise ValueError(f"compute_features needs bar columns {missing}")
    if tf_ms <= 0:
        raise ValueError(f"compute_features needs a positive tf_ms, got {tf_ms}")
    keys = [k for k in KEY_COLUMNS if k in bars.columns]
    schema = bars.schema
    lf = bars.lazy().select(
        *[k for k in keys if k != "close"],
        *[x if schema[x] == pl.Float64 else pl.col(x).cast(pl.Float64) for x in INPUT_COLUMNS],
        pl.int_range(pl.len()).alias("_i"),
    )
    rv = (pl.col("_rms") * math.sqrt(YEAR_MS / tf_ms)).alias("rv")
    out = _collect(_run(lf, _STAGES).with_columns(rv))
    return out[[*keys, *FEATURE_NAMES, "regime", "warm"]]


# ---------------------------------------------------------------------------------- streaming


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


_HISTORY_COLUMNS = ("start", "end") + INPUT_COLUMNS


@dataclass
class FeatureState:
    """Per instrument and timeframe: the last ``h`` bars as plain columns (picklable)."""

    h: int = 600
    cols: dict = field(default_factory=dict)  # column -> deque(maxlen=h)

    def __post_init__(self) -> None:
        if self.h < 1:
            raise ValueError(f"FeatureState.h must be >= 1, got {self.h}")
        if not self.cols:
            self.cols = {c: deque(maxlen=self.h) for c in _HISTORY_COLUMNS}

    def __len__(self) -> int:
        return len(self.cols["start"])

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {c: list(q) for c, q in self.cols.items()},
            schema={c: (pl.Int64 if c in ("start", "end", "trades") else pl.Float64) for c in self.cols},
        )


def update(state: FeatureState, bar: Bar) -> Optional[FeatureRow]:
    """Append a closed ``bar`` and return its features, computed with ``compute_features`` over
    the last ``state.h`` bars. A bar that is not newer than the last one (a duplicate or an
    out-of-order bar) changes nothing and returns None."""
    starts = state.cols["start"]
    if starts and bar.start <= starts[-1]:
        return None
    for c, q in state.cols.items():
        q.append(getattr(bar, c))
    row = compute_features(state.frame(), bar.end - bar.start).row(-1, named=True)
    return FeatureRow(
        exchange=bar.exchange, symbol=bar.symbol, tf=bar.tf, start=bar.start, end=bar.end,
        close=bar.close, warm=row["warm"], regime=row["regime"] or REGIME_UNKNOWN,
        values={f: row[f] for f in FEATURE_NAMES},
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


def aligned_feature_names(overlay_tfs: list[str] | tuple[str, ...]) -> list[str]:
    """Key order of ``AlignedRow.features``: the primary's features, then each overlay's."""
    return list(FEATURE_NAMES) + [f"{tf}_{f}" for tf in overlay_tfs for f in FEATURE_NAMES]


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
        for f in FEATURE_NAMES:
            features[f"{tf}_{f}"] = row.values.get(f) if usable else None
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
    history: int = 600
    horizon: int = 3
    band_k: float = 0.5
    states: dict = field(default_factory=dict)  # tf -> FeatureState
    book: Optional[OverlayBook] = None
    labels: Optional[L.LabelState] = None

    def __post_init__(self) -> None:
        if self.book is None:
            self.book = OverlayBook(primary=self.primary, overlays=tuple(self.overlays))
        if self.labels is None:
            self.labels = L.LabelState(horizon=self.horizon, k=self.band_k)

    def on_bars(self, bars: list[Bar]) -> list:
        rows = []
        for bar in bars:
            if bar.partial or (bar.tf != self.primary and bar.tf not in self.overlays):
                continue
            st = self.states.get(bar.tf)
            if st is None:
                st = self.states[bar.tf] = FeatureState(h=self.history)
            row = update(st, bar)
            if row is not None:
                rows.append(row)
        out: list = []
        closed_at = max((b.closed_at for b in bars), default=0)
        for aligned in self.book.feed(rows):
            out.extend(L.update(self.labels, aligned))
            out.append(msgspec.structs.replace(aligned, closed_at=closed_at) if closed_at else aligned)
        return out
