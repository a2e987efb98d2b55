"""Features (SPEC §4): per instrument and timeframe, from closed bars only. Pure logic, no bytewax.

``FeatureState`` holds the incremental state of every indicator (``operators.indicators``, each
checked against TA-Lib) and turns one closed bar into its feature values in O(1): a fixed set of
recursions and short windows, never a pass over the history. ``SPEC`` lists every feature with its
warm-up and formula (the README's feature table shows it); ``FEATURE_NAMES`` is its order, which
models and manifests record. ``compute_features`` runs the same state over a frame of
bars (research, tests), so streaming equals batch by construction.

Rules every feature follows:

- No lookahead: the value at a bar uses that bar and earlier ones only. Structures that need
  "future" bars (a swing high needs two lower highs after it) are reported when they are known,
  at the later bar, never back-dated.
- Warm-up is never faked: a feature is None until it has its inputs (``WARMUP[name]`` bars, the
  current one included, TA-Lib's lookback + 1 where TA-Lib has the indicator), and ``warm`` is
  False until every feature is defined (``WARM_BARS``). After that a degenerate window (no range,
  no movement) gives the neutral value named in the formula, never a null.
- Scale-free: ratios, distances relative to the close or to the ATR, oscillators, signs and counts,
  because models are trained across instruments. The one exception is ``atr`` itself (price units):
  labels and stops read it (``operators.labels``, ``operators.strategy``); ``natr`` is its
  scale-free twin.
- Smoothings start as TA-Lib's do (the mean of the first n inputs), so after the warm-up a value
  depends (negligibly, like (1 - 1/n)^t) on where the series started.

Perpetual-futures features (``operators.perp.SPEC``: funding, basis, open interest, liquidations)
follow the primary row's features when the bars carry perp data (``Bar.perp``); they are None on a
tape without it and do not hold back ``warm``.

Multi-timeframe: ``align`` / ``OverlayBook`` attach the latest CLOSED overlay rows (default 15m and
1h) to a primary row (default 5m), prefixed like ``15m_rsi``; an overlay that ends after the
primary bar, or is older than two of its intervals, is missing (None values, overlay_ok False).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate
from operator import mul
from types import SimpleNamespace
from typing import Optional

import msgspec
import polars as pl

from operators import indicators as I
from operators import labels as L
from operators import perp as PD
from operators.bars import TIMEFRAMES, Bar

YEAR_MS = 365 * 86_400_000

ATR_N = 14
ATR_PCT_WINDOW = 500
ATR_PCT_MIN = 50  # ATR values needed before atr_pct is defined
COHORT_SPAN = 5
ADX_TREND, ADX_RANGE, ATR_PCT_VOLATILE = 25.0, 20.0, 0.8
IMBALANCE = 0.5  # |delta| / volume >= 0.5  <=>  one side traded >= 3x the other
FVG_KEEP = 50  # bars an unfilled fair-value gap stays counted
ICHI_TENKAN, ICHI_KIJUN, ICHI_SPAN_B, ICHI_SHIFT = 9, 26, 52, 26
LN2x4 = 4.0 * math.log(2.0)

STRONG_TREND, VOLATILE, RANGING, CHOPPY = "STRONG_TREND", "VOLATILE", "RANGING", "CHOPPY"
REGIME_UNKNOWN = "UNKNOWN"  # FeatureRow.regime while adx or atr_pct is undefined (warm-up)

# (name, bars needed, formula). c, h, l, v = the bar's close, high, low, volume; x[-k] = k bars ago;
# ATR = ATR(14); "TA-Lib X" = the TA-Lib function X, reproduced incrementally (tests/unit/
# test_indicators.py) and checked through the feature (tests/unit/test_features.py).
SPEC: list[tuple[str, int, str]] = [
    # -- the original 22 (names kept: models and manifests refer to them)
    ("ret_1", 2, "log(c / c[-1])"),
    ("ret_3", 4, "log(c / c[-3])"),
    ("ret_12", 13, "log(c / c[-12])"),
    ("rv", 21, "realised volatility: sqrt(mean of the last 20 squared ret_1 x bars per year), zero-mean"),
    ("atr", 15, "TA-Lib ATR(14), in price units: the one feature that is not scale-free (labels and stops read it; natr is its scale-free twin)"),
    ("atr_pct", 64, "mid-rank percentile of ATR among the last 500 ATR values: (#less + (#equal - 1) / 2) / (count - 1); needs 50"),
    ("rsi", 15, "TA-Lib RSI(14); 50 when nothing moved"),
    ("ema_gap", 26, "(TA-Lib EMA(12) - EMA(26)) / c"),
    ("macd_hist", 34, "TA-Lib MACD(12, 26, 9) histogram / c"),
    ("bb_width", 20, "Bollinger(20, 2) width: 4 * std20 / SMA20 (population std)"),
    ("adx", 28, "TA-Lib ADX(14)"),
    ("vol_z", 20, "(v - mean20(v)) / std20(v); 0 for a constant window"),
    ("delta_z", 20, "(delta - mean20) / std20 of the bar delta (buy - sell volume); 0 for a constant window"),
    ("cvd_slope", 10, "least-squares slope per bar of cumulative delta over 10 bars / mean volume of those bars"),
    ("vwap_dev", 1, "c / bar vwap - 1"),
    ("intensity", 20, "trades / mean20(trades); 1 when the mean is 0"),
    ("s_top", 1, "pros' net / gross taker notional in the bar (cohorts, operators.bars)"),
    ("s_bot", 1, "amateurs' net / gross taker notional in the bar"),
    ("s_mood", 1, "s_top - s_bot"),
    ("s_top_ema", COHORT_SPAN, "EMA(5) of s_top"),
    ("s_bot_ema", COHORT_SPAN, "EMA(5) of s_bot"),
    ("s_mood_ema", COHORT_SPAN, "EMA(5) of s_mood"),
    # -- trend
    ("sma_gap_20", 20, "c / TA-Lib SMA(20) - 1"),
    ("sma_gap_50", 50, "c / TA-Lib SMA(50) - 1"),
    ("ema_gap_20", 20, "c / TA-Lib EMA(20) - 1"),
    ("ema_gap_50", 50, "c / TA-Lib EMA(50) - 1"),
    ("wma_gap_20", 20, "c / TA-Lib WMA(20) - 1"),
    ("hma_gap_20", 23, "c / TA-Lib HMA(20) - 1 (Hull: WMA4(2 WMA10 - WMA20))"),
    ("vwma_gap_20", 20, "c / TA-Lib VWMA(20) - 1 (sum(c v) / sum(v))"),
    ("plus_di", 15, "TA-Lib PLUS_DI(14)"),
    ("minus_di", 15, "TA-Lib MINUS_DI(14)"),
    ("sar_gap", 2, "(c - TA-Lib SAR(0.02, 0.2)) / c: positive while the SAR trails below (long)"),
    ("st_gap", 11, "(c - TA-Lib SUPERTREND(10, 3) line) / c"),
    ("st_dir", 11, "TA-Lib SUPERTREND(10, 3) trend: +1 up, -1 down"),
    ("trix", 44, "TA-Lib TRIX(15): 100 x 1-bar rate of change of EMA(EMA(EMA(c)))"),
    ("vi_plus", 15, "TA-Lib VORTEX(14) VI+: sum|h - l[-1]| / sum TR over 14 (1 with no range)"),
    ("vi_minus", 15, "TA-Lib VORTEX(14) VI-: sum|l - h[-1]| / sum TR over 14 (1 with no range)"),
    ("ichi_tenkan", 9, "c / tenkan - 1, tenkan = (highest h + lowest l) / 2 over 9"),
    ("ichi_kijun", 26, "c / kijun - 1, kijun = midpoint over 26"),
    ("ichi_tk", 26, "(tenkan - kijun) / c"),
    ("ichi_cloud", 78, "distance from the cloud shown at this bar (span A = (tenkan + kijun) / 2 and span B = midpoint over 52, both computed 26 bars ago): (c - top) / c above it, (c - bottom) / c below, 0 inside"),
    ("ichi_cloud_width", 78, "(span A - span B) / c of that cloud (positive: bullish cloud)"),
    ("aroon_osc", 15, "TA-Lib AROONOSC(14): 100 / 14 x (bars since the lowest low - bars since the highest high) over 15 bars"),
    # -- momentum
    ("stoch_k", 18, "TA-Lib STOCH(14, 3, 3) slow %K (SMA smoothing); fast %K 50 on a flat window"),
    ("stoch_d", 18, "TA-Lib STOCH(14, 3, 3) %D"),
    ("macd_signal", 34, "TA-Lib MACD(12, 26, 9) signal / c"),
    ("cci", 20, "TA-Lib CCI(20): (tp - SMA20(tp)) / (0.015 x mean |tp - SMA20(tp)|), tp = (h + l + c) / 3; 0 flat"),
    ("willr", 14, "TA-Lib WILLR(14): -100 (highest h - c) / (highest h - lowest l); -50 on a flat window"),
    ("roc_10", 11, "TA-Lib ROC(10): 100 (c / c[-10] - 1)"),
    ("tsi", 38, "TA-Lib TSI(25, 13): 100 EMA13(EMA25(m)) / EMA13(EMA25(|m|)), m = c - c[-1]; 0 when nothing moved"),
    # -- volatility
    ("bb_pctb", 20, "Bollinger %B: (c - lower) / (upper - lower), bands SMA20 +- 2 std20; 0.5 when the width is 0"),
    ("bb_squeeze", 20, "Bollinger width / Keltner width: 4 std20 / (KC upper - KC lower); < 1: the bands are inside the channel (squeeze); 1 when the channel has no width"),
    ("kc_pos", 20, "TA-Lib KC(20, 10, 2): (c - middle) / (upper - middle), middle = EMA20 of (h + l + c) / 3, bands +- 2 ATR(10); 0 with no width"),
    ("kc_width", 20, "TA-Lib KC(20, 10, 2): (upper - lower) / middle"),
    ("dc_pos", 20, "TA-Lib DONCHIAN(20): (c - lower) / (upper - lower), highest h and lowest l over 20; 0.5 with no range"),
    ("dc_width", 20, "TA-Lib DONCHIAN(20): (upper - lower) / c"),
    ("natr", 15, "TA-Lib NATR(14): 100 ATR / c"),
    ("range_atr", 15, "(h - l) / ATR: the bar's range in ATRs; 0 when ATR is 0"),
    ("ret_atr", 15, "(c - c[-1]) / ATR: the bar's move in ATRs; 0 when ATR is 0"),
    ("park_vol", 20, "Parkinson volatility: sqrt(sum over 20 of ln(h / l)^2 / (4 ln 2 x 20) x bars per year)"),
    ("chaikin_vol", 20, "TA-Lib CVI(10, 10): 100 (EMA10(h - l) / its value 10 bars ago - 1)"),
    # -- volume
    ("obv_slope", 21, "(TA-Lib OBV - OBV[-20]) / sum of the last 20 volumes: net signed volume share, in [-1, 1]"),
    ("mfi", 15, "TA-Lib MFI(14); 50 with no money flow"),
    ("cmf", 20, "TA-Lib CMF(20): sum(((c - l) - (h - c)) / (h - l) x v) / sum(v) over 20"),
    ("adosc", 10, "TA-Lib ADOSC(3, 10) / SMA10(v): Chaikin A/D oscillator in bar volumes"),
    ("force_13", 14, "TA-Lib EFI(13) / (c x EMA13(v)): Elder's force index as a volume-weighted return"),
    ("vwap20_dev", 20, "c / VWAP20 - 1, VWAP20 = sum(vwap x v) / sum(v) over 20 bars (TA-Lib VWMA of the bar vwaps)"),
    # -- order flow
    ("delta_ratio", 1, "delta / v, in [-1, 1]"),
    ("delta_pos", 1, "(delta - min_delta) / (max_delta - min_delta): where the bar's running delta closed within its range; 0.5 with no range"),
    ("delta_corr", 21, "TA-Lib CORREL(20) of ret_1 and delta_ratio: does order flow move price?"),
    ("cvd_div", 20, "CVD divergence: -1 when c >= the 19 previous closes but CVD < its max over them (a new high order flow does not confirm), +1 mirrored for lows, else 0"),
    ("imb_stack", 1, "stacked imbalance, bar level: +k after k consecutive bars with delta / v >= 0.5 (buys >= 3x sells), -k for sells, 0 otherwise"),
    ("poc_dist", 15, "(c - the bar's volume-profile POC) / ATR; 0 when ATR is 0"),
    ("vah_dist", 15, "(c - value-area high) / ATR"),
    ("val_dist", 15, "(c - value-area low) / ATR"),
    # -- smart-money structures, without hindsight
    ("fvg", 15, "fair-value gap formed at this bar: (l - h[-2]) / ATR if l > h[-2] (bullish), -(l[-2] - h) / ATR if h < l[-2] (bearish), else 0"),
    ("fvg_open", 3, "unfilled bullish minus bearish fair-value gaps of the last 50 bars (a bullish gap is filled when a later low reaches h[-2] of its formation, a bearish one when a later high reaches l[-2])"),
    ("bos", 5, "break of structure at this bar: +1 when c closes above the last confirmed swing high (TA-Lib FRACTAL(2, 2), known 2 bars after the swing), -1 below the last swing low; a swing is broken once"),
    ("structure", 5, "direction of the most recent break of structure (+1 / -1), 0 before the first"),
]

FEATURE_NAMES: list[str] = [name for name, _, _ in SPEC]
FORMULAS: dict[str, str] = {name: formula for name, _, formula in SPEC}
# Bars (current included) needed before the feature is defined: first non-null row index + 1.
WARMUP: dict[str, int] = {name: n for name, n, _ in SPEC} | {"regime": ATR_N + ATR_PCT_MIN}
WARM_BARS = max(WARMUP.values())  # first warm row is index WARM_BARS - 1

# Bar fields the features read; KEY_COLUMNS are passed through by compute_features when present.
INPUT_COLUMNS = ("high", "low", "close", "volume", "vwap", "trades", "delta", "min_delta", "max_delta",
                 "s_top", "s_bot", "s_mood", "poc", "vah", "val")
KEY_COLUMNS = ("exchange", "symbol", "tf", "start", "end", "close")
PERP_COLUMNS = tuple(PD.PerpSnap.__struct_fields__)  # optional bar columns: the bar's perp data


def _cvd_weights(n: int) -> tuple[float, ...]:
    """OLS slope of y_0..y_{n-1} on 0..n-1 with y = cumulative delta equals sum_m c_m * delta_m
    over the window's deltas 1..n-1 (delta_0 only shifts the level): c_m = sum_{j>=m}(j - xbar)/Sxx."""
    xbar = (n - 1) / 2
    sxx = sum((j - xbar) ** 2 for j in range(n))
    return (0.0,) + tuple(sum(j - xbar for j in range(m, n)) / sxx for m in range(1, n))


CVD_N = 10
_CVD_W = _cvd_weights(CVD_N)


def _zscore(ms: Optional[tuple[float, float]], x: float) -> Optional[float]:
    if ms is None:
        return None
    mean, std = ms
    return 0.0 if std <= 1e-12 * abs(mean) else (x - mean) / std  # constant window (rounding residue)


def _per(num: float, den: Optional[float], default: float = 0.0) -> Optional[float]:
    """num / den; None while den is (warm-up), ``default`` when it is 0."""
    if den is None:
        return None
    return default if den == 0 else num / den


def regime_of(adx: Optional[float], atr_pct: Optional[float]) -> Optional[str]:
    """VOLATILE if atr_pct >= 0.8; else STRONG_TREND if adx >= 25; else RANGING if adx < 20; else
    CHOPPY. None while adx or atr_pct is undefined."""
    if adx is None or atr_pct is None:
        return None
    if atr_pct >= ATR_PCT_VOLATILE:
        return VOLATILE
    if adx >= ADX_TREND:
        return STRONG_TREND
    return RANGING if adx < ADX_RANGE else CHOPPY


class FeatureState:
    """Per instrument and timeframe: the incremental state of every feature (plain objects and
    short deques: pickles and deep-copies for bytewax snapshots, the same size at bar 100 as at bar
    1,000,000). ``step`` turns the next closed bar into its feature values."""

    def __init__(self) -> None:
        self.count = 0
        self.last_start: Optional[int] = None
        self.closes: deque = deque(maxlen=13)
        self.r2: deque = deque(maxlen=20)  # ret_1 squared
        self.atr = I.ATR(ATR_N)
        self.atr_hist: deque = deque(maxlen=ATR_PCT_WINDOW)
        self.atr_sorted: list = []
        self.rsi = I.RSI(14)
        self.ema12, self.ema26 = I.EMA(12), I.EMA(26)
        self.macd = I.MACD(12, 26, 9)
        self.bb = I.StdDev(20)
        self.dmi = I.DMI(14)
        self.vol_sd, self.delta_sd = I.StdDev(20), I.StdDev(20)
        self.deltas: deque = deque(maxlen=CVD_N)
        self.vols10: deque = deque(maxlen=CVD_N)
        self.trades: deque = deque(maxlen=20)
        self.cohort = (I.EMA(COHORT_SPAN), I.EMA(COHORT_SPAN), I.EMA(COHORT_SPAN))
        self.sma20, self.sma50 = I.SMA(20), I.SMA(50)
        self.ema20, self.ema50 = I.EMA(20), I.EMA(50)
        self.wma20, self.hma20, self.vwma20 = I.WMA(20), I.HMA(20), I.VWMA(20)
        self.sar = I.SAR(0.02, 0.2)
        self.supertrend = I.Supertrend(10, 3.0)
        self.trix = I.TRIX(15)
        self.vortex = I.Vortex(14)
        self.tenkan, self.kijun, self.span_b = I.MaxMin(ICHI_TENKAN), I.MaxMin(ICHI_KIJUN), I.MaxMin(ICHI_SPAN_B)
        self.spans: deque = deque(maxlen=ICHI_SHIFT + 1)  # (span A, span B) as computed, newest last
        self.aroon = I.AroonOsc(14)
        self.stoch = I.Stoch(14, 3, 3)
        self.cci = I.CCI(20)
        self.willr = I.MaxMin(14)
        self.tsi = I.TSI(25, 13)
        self.kc = I.KC(20, 10, 2.0)
        self.donchian = I.MaxMin(20)
        self.hl2: deque = deque(maxlen=20)  # ln(h / l)^2
        self.cvi = I.CVI(10, 10)
        self.obv: deque = deque(maxlen=20)  # signed volume from bar 1 on
        self.obv_v: deque = deque(maxlen=20)
        self.mfi = I.MFI(14)
        self.cmf = I.CMF(20)
        self.adosc, self.vol10 = I.ADOSC(3, 10), I.SMA(10)
        self.efi, self.efi_v = I.EMA(13), I.EMA(13)
        self.vwap20 = I.VWMA(20)
        self.corr = I.Correl(20)
        self.cvd_close: deque = deque(maxlen=20)
        self.cvd_delta: deque = deque(maxlen=20)
        self.imb = 0
        self.hl3: deque = deque(maxlen=3)  # (h, l) of the last 3 bars
        self.gaps: deque = deque()  # open fair-value gaps: (bar index, +1 / -1, fill level)
        self.fractal = I.Fractal()
        self.swing_high: Optional[float] = None  # last confirmed, not yet broken
        self.swing_low: Optional[float] = None
        self.structure = 0
        self.perp = PD.PerpFeatures()

    def __len__(self) -> int:
        return self.count

    def __deepcopy__(self, memo: dict) -> "FeatureState":
        # bytewax deep-copies the state of every key touched in an epoch; the generic deepcopy
        # walks every float of every window (~1.7 ms here), this structural copy ~0.1 ms.
        return _clone(self)

    def step(self, b, tf_ms: int) -> dict[str, Optional[float]]:
        """Feature values of the next closed bar ``b`` (any object with the INPUT_COLUMNS as
        attributes) of a ``tf_ms`` timeframe. Bars must come in order, one per period."""
        h, l, c, v = float(b.high), float(b.low), float(b.close), float(b.volume)
        delta = float(b.delta)
        i = self.count
        self.count = i + 1
        bars_per_year = YEAR_MS / tf_ms
        f: dict[str, Optional[float]] = {}

        # -- returns and volatility
        closes = self.closes
        prev = closes[-1] if closes else None
        closes.append(c)
        for k in (1, 3, 12):
            f[f"ret_{k}"] = math.log(c / closes[-1 - k]) if len(closes) > k else None
        r1 = f["ret_1"]
        if r1 is not None:
            self.r2.append(r1 * r1)
        f["rv"] = math.sqrt(sum(self.r2) / 20 * bars_per_year) if len(self.r2) == 20 else None
        atr = self.atr.update(h, l, c)
        f["atr"] = atr
        f["atr_pct"] = self._atr_pct(atr)
        f["rsi"] = self.rsi.update(c)
        e12, e26 = self.ema12.update(c), self.ema26.update(c)
        f["ema_gap"] = None if e26 is None else (e12 - e26) / c
        _, signal, hist = self.macd.update(c)
        f["macd_hist"] = None if hist is None else hist / c
        bb = self.bb.update(c)
        if bb is None:
            f["bb_width"] = f["bb_pctb"] = None
        else:
            mid, sd = bb
            f["bb_width"] = 4.0 * sd / mid
            f["bb_pctb"] = 0.5 if sd == 0 else (c - (mid - 2.0 * sd)) / (4.0 * sd)
        pdi, mdi, adx = self.dmi.update(h, l, c)
        f["adx"] = adx
        f["vol_z"] = _zscore(self.vol_sd.update(v), v)
        f["delta_z"] = _zscore(self.delta_sd.update(delta), delta)
        self.deltas.append(delta)
        self.vols10.append(v)
        if len(self.deltas) == CVD_N:
            f["cvd_slope"] = _per(sum(map(mul, _CVD_W, self.deltas)), sum(self.vols10) / CVD_N)
        else:
            f["cvd_slope"] = None
        vwap = float(b.vwap)
        f["vwap_dev"] = c / vwap - 1.0 if vwap > 0 else 0.0
        n_tr = float(b.trades)
        self.trades.append(n_tr)
        f["intensity"] = _per(n_tr, sum(self.trades) / 20, 1.0) if len(self.trades) == 20 else None
        for name, ema in zip(("s_top", "s_bot", "s_mood"), self.cohort):
            x = float(getattr(b, name))
            f[name] = x
            f[f"{name}_ema"] = ema.update(x)

        # -- trend
        for name, ma in (("sma_gap_20", self.sma20.update(c)), ("sma_gap_50", self.sma50.update(c)),
                         ("wma_gap_20", self.wma20.update(c)), ("hma_gap_20", self.hma20.update(c)),
                         ("vwma_gap_20", self.vwma20.update(c, v))):
            f[name] = None if ma is None else c / ma - 1.0
        ema20, ema50 = self.ema20.update(c), self.ema50.update(c)
        f["ema_gap_20"] = None if ema20 is None else c / ema20 - 1.0
        f["ema_gap_50"] = None if ema50 is None else c / ema50 - 1.0
        f["plus_di"], f["minus_di"] = pdi, mdi
        sar = self.sar.update(h, l)
        f["sar_gap"] = None if sar is None else (c - sar) / c
        line, trend = self.supertrend.update(h, l, c)
        f["st_gap"] = None if line is None else (c - line) / c
        f["st_dir"] = None if trend is None else float(trend)
        f["trix"] = self.trix.update(c)
        f["vi_plus"], f["vi_minus"] = self.vortex.update(h, l, c)
        self._ichimoku(h, l, c, f)
        f["aroon_osc"] = self.aroon.update(h, l)

        # -- momentum
        f["stoch_k"], f["stoch_d"] = self.stoch.update(h, l, c)
        f["macd_signal"] = None if signal is None else signal / c
        f["cci"] = self.cci.update(h, l, c)
        hl = self.willr.update(h, l)
        f["willr"] = None if hl is None else (-50.0 if hl[0] == hl[1] else -100.0 * (hl[0] - c) / (hl[0] - hl[1]))
        f["roc_10"] = (c / closes[-11] - 1.0) * 100.0 if len(closes) > 10 else None
        f["tsi"] = self.tsi.update(c)

        # -- volatility
        kc = self.kc.update(h, l, c)
        if kc is None or bb is None:
            f["bb_squeeze"] = f["kc_pos"] = f["kc_width"] = None
        else:
            upper, middle, lower = kc
            f["bb_squeeze"] = 1.0 if upper == lower else 4.0 * bb[1] / (upper - lower)
            f["kc_pos"] = 0.0 if upper == middle else (c - middle) / (upper - middle)
            f["kc_width"] = (upper - lower) / middle
        dc = self.donchian.update(h, l)
        if dc is None:
            f["dc_pos"] = f["dc_width"] = None
        else:
            f["dc_pos"] = 0.5 if dc[0] == dc[1] else (c - dc[1]) / (dc[0] - dc[1])
            f["dc_width"] = (dc[0] - dc[1]) / c
        f["natr"] = None if atr is None else 100.0 * atr / c
        f["range_atr"] = _per(h - l, atr)
        f["ret_atr"] = None if prev is None else _per(c - prev, atr)
        self.hl2.append(math.log(h / l) ** 2)
        f["park_vol"] = math.sqrt(sum(self.hl2) / (LN2x4 * 20) * bars_per_year) if len(self.hl2) == 20 else None
        f["chaikin_vol"] = self.cvi.update(h, l)

        # -- volume
        if prev is not None:
            self.obv.append(v if c > prev else -v if c < prev else 0.0)
            self.obv_v.append(v)
        f["obv_slope"] = _per(sum(self.obv), sum(self.obv_v)) if len(self.obv) == 20 else None
        f["mfi"] = self.mfi.update(h, l, c, v)
        f["cmf"] = self.cmf.update(h, l, c, v)
        ad, vol10 = self.adosc.update(h, l, c, v), self.vol10.update(v)
        f["adosc"] = None if ad is None else _per(ad, vol10)
        if prev is None:
            f["force_13"] = None
        else:
            efi, ev = self.efi.update((c - prev) * v), self.efi_v.update(v)
            f["force_13"] = None if efi is None else _per(efi, c * ev)
        vw20 = self.vwap20.update(vwap, v)
        f["vwap20_dev"] = None if vw20 is None else _per(c, vw20, 1.0) - 1.0

        # -- order flow
        dr = delta / v if v > 0 else 0.0
        f["delta_ratio"] = dr
        lo_d, hi_d = float(b.min_delta), float(b.max_delta)
        f["delta_pos"] = 0.5 if hi_d == lo_d else (delta - lo_d) / (hi_d - lo_d)
        f["delta_corr"] = None if r1 is None else self.corr.update(r1, dr)
        f["cvd_div"] = self._cvd_divergence(c, delta)
        if dr >= IMBALANCE:
            self.imb = self.imb + 1 if self.imb > 0 else 1
        elif dr <= -IMBALANCE:
            self.imb = self.imb - 1 if self.imb < 0 else -1
        else:
            self.imb = 0
        f["imb_stack"] = float(self.imb)
        for name, level in (("poc_dist", b.poc), ("vah_dist", b.vah), ("val_dist", b.val)):
            f[name] = _per(c - float(level), atr)

        # -- smart-money structures
        self._fair_value_gaps(i, h, l, atr, f)
        self._break_of_structure(h, l, c, f)
        out = {name: f[name] for name in FEATURE_NAMES}
        perp = self.__dict__.get("perp") or self.__dict__.setdefault("perp", PD.PerpFeatures())  # older snapshots
        out.update(perp.step(getattr(b, "perp", None), r1, v * vwap))
        return out

    # ------------------------------------------------------------------------- pieces of step

    def _atr_pct(self, atr: Optional[float]) -> Optional[float]:
        if atr is None:
            return None
        hist, srt = self.atr_hist, self.atr_sorted
        if len(hist) == hist.maxlen:
            del srt[bisect_left(srt, hist[0])]
        hist.append(atr)
        insort(srt, atr)
        n = len(srt)
        if n < ATR_PCT_MIN:
            return None
        less = bisect_left(srt, atr)
        equal = bisect_right(srt, atr) - less
        return (less + (equal - 1) / 2) / (n - 1)

    def _ichimoku(self, h: float, l: float, c: float, f: dict) -> None:
        t, k, b = self.tenkan.update(h, l), self.kijun.update(h, l), self.span_b.update(h, l)
        tenkan = None if t is None else (t[0] + t[1]) / 2.0
        kijun = None if k is None else (k[0] + k[1]) / 2.0
        f["ichi_tenkan"] = None if tenkan is None else c / tenkan - 1.0
        f["ichi_kijun"] = None if kijun is None else c / kijun - 1.0
        f["ichi_tk"] = None if kijun is None else (tenkan - kijun) / c
        if kijun is not None:
            self.spans.append(((tenkan + kijun) / 2.0, None if b is None else (b[0] + b[1]) / 2.0))
        shown = self.spans[0] if len(self.spans) == self.spans.maxlen else None  # computed 26 bars ago
        if shown is None or shown[1] is None:
            f["ichi_cloud"] = f["ichi_cloud_width"] = None
            return
        a, bb = shown
        top, bottom = max(a, bb), min(a, bb)
        f["ichi_cloud"] = (c - top) / c if c > top else (c - bottom) / c if c < bottom else 0.0
        f["ichi_cloud_width"] = (a - bb) / c

    def _cvd_divergence(self, c: float, delta: float) -> Optional[float]:
        closes, deltas = self.cvd_close, self.cvd_delta
        closes.append(c)
        deltas.append(delta)
        if len(closes) < closes.maxlen:
            return None
        cvd = list(accumulate(deltas))  # cumulative delta from the window's start: only differences matter
        before, now = cvd[:-1], cvd[-1]
        prior = list(closes)[:-1]
        if c >= max(prior) and now < max(before):
            return -1.0
        if c <= min(prior) and now > min(before):
            return 1.0
        return 0.0

    def _fair_value_gaps(self, i: int, h: float, l: float, atr: Optional[float], f: dict) -> None:
        gaps = self.gaps
        while gaps and gaps[0][0] <= i - FVG_KEEP:
            gaps.popleft()
        if gaps:  # this bar fills the gaps it trades through (formed on earlier bars)
            self.gaps = gaps = deque(g for g in gaps if (l > g[2] if g[1] > 0 else h < g[2]))
        hl = self.hl3
        hl.append((h, l))
        formed = 0.0
        if len(hl) == 3:
            h2, l2 = hl[0]
            if l > h2:
                gaps.append((i, 1, h2))
                formed = l - h2
            elif h < l2:
                gaps.append((i, -1, l2))
                formed = h - l2
            f["fvg_open"] = float(sum(g[1] for g in gaps))
        else:
            f["fvg_open"] = None
        f["fvg"] = None if atr is None or len(hl) < 3 else _per(formed, atr)

    def _break_of_structure(self, h: float, l: float, c: float, f: dict) -> None:
        swings = self.fractal.update(h, l)
        if swings is None:
            f["bos"] = f["structure"] = None
            return
        bos = 0.0
        if self.swing_high is not None and c > self.swing_high:
            bos, self.swing_high = 1.0, None
        elif self.swing_low is not None and c < self.swing_low:
            bos, self.swing_low = -1.0, None
        if bos:
            self.structure = int(bos)
        if swings[0] is not None:
            self.swing_high = swings[0]
        if swings[1] is not None:
            self.swing_low = swings[1]
        f["bos"], f["structure"] = bos, float(self.structure)


def _clone(x):
    """A deep copy of indicator state, relying on its shape: objects (``__slots__`` classes or
    FeatureState) are copied attribute by attribute, tuples element by element, and deques and
    lists are copied shallowly because they only ever hold immutable values (numbers, tuples of
    numbers). ``tests/unit/test_features.py`` checks copies stay independent."""
    t = type(x)
    if t is float or t is int or x is None:
        return x
    if t is deque:
        return deque(x, x.maxlen)
    if t is list:
        return list(x)
    if t is tuple:
        return tuple(map(_clone, x))
    slots = getattr(t, "__slots__", None)
    if slots is not None:
        new = t.__new__(t)
        for name in slots:
            setattr(new, name, _clone(getattr(x, name)))
        return new
    if t is FeatureState:
        new = t.__new__(t)
        new.__dict__.update({k: _clone(v) for k, v in x.__dict__.items()})
        return new
    return x  # numbers, strings, None: immutable


def compute_features(bars: pl.DataFrame, tf_ms: int) -> pl.DataFrame:
    """Features for every row of ``bars`` (consecutive bars of one instrument and timeframe,
    oldest first; finite values and positive prices, as ``operators.bars`` makes them), computed
    by one ``FeatureState`` stepping through the rows: what streaming gives, bar for bar.

    Perp data comes from the optional columns ``PERP_COLUMNS`` (a bar's ``PerpSnap`` fields; without
    them the perp features are null).

    Returns the KEY_COLUMNS present in ``bars``, FEATURE_NAMES and the perp features (Float64, null
    while undefined), ``regime`` (String, null while undefined) and ``warm`` (Boolean: the row has
    WARM_BARS bars of history, from which on every FEATURE_NAMES feature is defined)."""
    missing = [c for c in INPUT_COLUMNS if c not in bars.columns]
    if missing:
        raise ValueError(f"compute_features needs bar columns {missing}")
    if tf_ms <= 0:
        raise ValueError(f"compute_features needs a positive tf_ms, got {tf_ms}")
    keys = [k for k in KEY_COLUMNS if k in bars.columns]
    perp_cols = [c for c in PERP_COLUMNS if c in bars.columns]
    state = FeatureState()
    rows = []
    for r in bars.select(*INPUT_COLUMNS, *perp_cols).iter_rows(named=True):
        snap = PD.PerpSnap(**{c: r.pop(c) for c in perp_cols}) if perp_cols else None
        rows.append(state.step(SimpleNamespace(**r, perp=snap), tf_ms))
    names = FEATURE_NAMES + PD.NAMES
    out = pl.DataFrame({name: [r[name] for r in rows] for name in names}, schema={name: pl.Float64 for name in names})
    return pl.concat([bars.select(keys), out], how="horizontal").with_columns(
        pl.Series("regime", [regime_of(r["adx"], r["atr_pct"]) for r in rows], dtype=pl.String),
        (pl.int_range(pl.len()) >= WARM_BARS - 1).alias("warm"),
    )


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
    return list(FEATURE_NAMES) + PD.NAMES + [f"{tf}_{f}" for tf in overlay_tfs for f in FEATURE_NAMES]


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
    history: int = 600  # unused since features are incremental (kept: callers pass it positionally)
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
                st = self.states[bar.tf] = FeatureState()
            row = update(st, bar)
            if row is not None:
                rows.append(row)
        out: list = []
        closed_at = max((b.closed_at for b in bars), default=0)
        for aligned in self.book.feed(rows):
            out.extend(L.update(self.labels, aligned))
            out.append(msgspec.structs.replace(aligned, closed_at=closed_at) if closed_at else aligned)
        return out
