"""The feature catalog: every feature's name, warm-up and formula (``CATALOG``), the regime rule, and the
bar columns the features read. Pure data, no bytewax.

``CATALOG`` lists every feature with its warm-up and formula (the README's feature table shows it);
``FEATURE_NAMES`` is its order, which models and manifests record. ``operators.feature_state``
computes them, one closed bar at a time.

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

Perpetual-futures features (``operators.perp.CATALOG``: funding, basis, open interest, liquidations)
follow the primary row's features when the bars carry perp data (``Bar.perp``); they are None on a
tape without it and do not hold back ``warm``.
"""

from __future__ import annotations

from typing import Optional

from operators.perp import PerpSnap

ATR_N = 14
ATR_PCT_MIN = 50  # ATR values needed before atr_pct is defined
COHORT_SPAN = 5
ADX_TREND, ADX_RANGE, ATR_PCT_VOLATILE = 25.0, 20.0, 0.8

STRONG_TREND, VOLATILE, RANGING, CHOPPY = "STRONG_TREND", "VOLATILE", "RANGING", "CHOPPY"
REGIME_UNKNOWN = "UNKNOWN"  # FeatureRow.regime while adx or atr_pct is undefined (warm-up)

# (name, bars needed, formula). c, h, l, v = the bar's close, high, low, volume; x[-k] = k bars ago;
# ATR = ATR(14); "TA-Lib X" = the TA-Lib function X, reproduced incrementally (tests/unit/
# test_indicators.py) and checked through the feature (tests/unit/test_features.py).
CATALOG: list[tuple[str, int, str]] = [
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

FEATURE_NAMES: list[str] = [name for name, _, _ in CATALOG]
FORMULAS: dict[str, str] = {name: formula for name, _, formula in CATALOG}
# Bars (current included) needed before the feature is defined: first non-null row index + 1.
WARMUP: dict[str, int] = {name: n for name, n, _ in CATALOG} | {"regime": ATR_N + ATR_PCT_MIN}
WARM_BARS = max(WARMUP.values())  # first warm row is index WARM_BARS - 1

# Bar fields the features read; KEY_COLUMNS are passed through by compute_features when present.
INPUT_COLUMNS = ("high", "low", "close", "volume", "vwap", "trades", "delta", "min_delta", "max_delta",
                 "s_top", "s_bot", "s_mood", "poc", "vah", "val")
KEY_COLUMNS = ("exchange", "symbol", "tf", "start", "end", "close")
PERP_COLUMNS = tuple(PerpSnap.__struct_fields__)  # optional bar columns: the bar's perp data


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
