"""Features: every feature against TA-Lib (or, where TA-Lib has no such indicator, an
independent plain reference) on long bar series, hand-checkable series, warm-up, no lookahead,
streaming == batch, picklable O(1) state, and closed-overlay alignment (acceptance)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import polars as pl
import pytest
import talib

from operators.bars import Bar
from operators.feature_batch import compute_features
from operators.feature_catalog import (
    CHOPPY, FEATURE_NAMES, FORMULAS, INPUT_COLUMNS, PERP_COLUMNS, RANGING, REGIME_UNKNOWN, STRONG_TREND,
    VOLATILE, WARM_BARS, WARMUP,
)
from operators.feature_state import FeatureState
from operators.features import (
    AlignedRow, FeatureRow, OverlayBook, align, aligned_feature_names, overlay_usable, update,
)
from operators.perp import NAMES as PERP_NAMES
from operators.perp import PerpSnap

M5 = 300_000
M15 = 900_000
H1 = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
TFS = {"5m": M5, "15m": M15, "1h": H1}
ORIGINAL_22 = ["ret_1", "ret_3", "ret_12", "rv", "atr", "atr_pct", "rsi", "ema_gap", "macd_hist", "bb_width",
               "adx", "vol_z", "delta_z", "cvd_slope", "vwap_dev", "intensity", "s_top", "s_bot", "s_mood",
               "s_top_ema", "s_bot_ema", "s_mood_ema"]


# ------------------------------------------------------------------------------- builders


def frame(close, high=None, low=None, *, volume=None, delta=None, trades=None, vwap=None,
          s_top=None, s_bot=None, s_mood=None, min_delta=None, max_delta=None, poc=None, tf_ms=M5) -> pl.DataFrame:
    close = [float(c) for c in close]
    n = len(close)
    s_top = [0.0] * n if s_top is None else s_top
    s_bot = [0.0] * n if s_bot is None else s_bot
    high = [c + 0.5 for c in close] if high is None else [float(x) for x in high]
    low = [c - 0.5 for c in close] if low is None else [float(x) for x in low]
    delta = [0.0] * n if delta is None else [float(x) for x in delta]
    return pl.DataFrame({
        "start": [T0 + i * tf_ms for i in range(n)],
        "end": [T0 + (i + 1) * tf_ms for i in range(n)],
        "open": close,
        "high": high,
        "low": low,
        "close": close,
        "volume": [1.0] * n if volume is None else [float(x) for x in volume],
        "vwap": close if vwap is None else vwap,
        "trades": [10] * n if trades is None else trades,
        "delta": delta,
        "min_delta": [min(0.0, d) for d in delta] if min_delta is None else min_delta,
        "max_delta": [max(0.0, d) for d in delta] if max_delta is None else max_delta,
        "s_top": s_top,
        "s_bot": s_bot,
        "s_mood": [a - b for a, b in zip(s_top, s_bot)] if s_mood is None else s_mood,
        "poc": close if poc is None else poc,
        "vah": high,
        "val": low,
    })


def random_frame(n: int, seed: int = 7, tf_ms: int = M5, tick: float | None = None) -> pl.DataFrame:
    """Random bars; with ``tick`` prices are rounded to it (ties and zero moves, as on real tapes)."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.003, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.0005, n))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.003, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.003, n))
    if tick:
        open_, close, high, low = (np.round(x / tick) * tick for x in (open_, close, high, low))
        high, low = np.maximum.reduce([high, open_, close]), np.minimum.reduce([low, open_, close])
    volume = rng.uniform(1, 20, n)
    buy = volume * rng.beta(0.7, 0.7, n)  # often one-sided: imbalanced bars happen
    delta = 2 * buy - volume
    s_top = rng.uniform(-1, 1, n)
    s_bot = rng.uniform(-1, 1, n)
    inside = lambda u: low + u * (high - low)  # noqa: E731
    val, poc, vah = (inside(u) for u in np.sort(rng.uniform(0, 1, (3, n)), axis=0))
    return pl.DataFrame({
        "start": T0 + np.arange(n) * tf_ms, "end": T0 + (np.arange(n) + 1) * tf_ms,
        "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "vwap": (high + low + close) / 3, "trades": rng.integers(1, 200, n),
        "delta": delta, "min_delta": np.minimum(delta, 0) - rng.uniform(0, 3, n),
        "max_delta": np.maximum(delta, 0) + rng.uniform(0, 3, n),
        "s_top": s_top, "s_bot": s_bot, "s_mood": s_top - s_bot, "poc": poc, "vah": vah, "val": val,
    })


def bars_of(df: pl.DataFrame, exchange="x", symbol="A/USDT:USDT", tf="5m") -> list[Bar]:
    out = []
    for r in df.iter_rows(named=True):
        out.append(Bar(
            exchange=exchange, symbol=symbol, tf=tf, start=r["start"], end=r["end"],
            open=r["open"], high=r["high"], low=r["low"], close=r["close"], volume=r["volume"],
            notional=r["volume"] * r["vwap"], vwap=r["vwap"], trades=int(r["trades"]),
            buy_volume=(r["volume"] + r["delta"]) / 2, sell_volume=(r["volume"] - r["delta"]) / 2,
            delta=r["delta"], min_delta=r.get("min_delta", min(0.0, r["delta"])),
            max_delta=r.get("max_delta", max(0.0, r["delta"])),
            largest_trade=1.0, largest_notional=r["close"], parent_orders=1, pro_orders=0,
            amateur_orders=0, pros_gross=0.0, pros_net=0.0, amateurs_gross=0.0, amateurs_net=0.0,
            s_top=r["s_top"], s_bot=r["s_bot"], s_mood=r["s_mood"], pro_threshold=0.0,
            amateur_threshold=0.0, poc=r.get("poc", r["close"]), vah=r.get("vah", r["high"]),
            val=r.get("val", r["low"]), profile_bin=0.01,
            perp=PerpSnap(**{c: r[c] for c in PERP_COLUMNS if c in r}) if "funding_rate" in r else None,
        ))
    return out


def col(df: pl.DataFrame, name: str) -> list:
    return df[name].to_list()


# ------------------------------------------- references: TA-Lib, or plain numpy where it has none


def _lag(x: np.ndarray, k: int) -> np.ndarray:
    return np.r_[np.full(k, np.nan), x[:-k]]


def _first_from(x: np.ndarray, i: int) -> np.ndarray:
    """``x`` with NaN before index i (a reference's warm-up, stated independently)."""
    x = np.asarray(x, dtype=float).copy()
    x[:i] = np.nan
    return x


def _atr_pct(atr: np.ndarray) -> np.ndarray:
    out = np.full(len(atr), np.nan)
    for t in range(len(atr)):
        win = atr[max(0, t - 499):t + 1]
        win = win[~np.isnan(win)]
        if np.isnan(atr[t]) or len(win) < 50:
            continue
        less, eq = np.sum(win < atr[t]), np.sum(win == atr[t])
        out[t] = (less + (eq - 1) / 2) / (len(win) - 1)
    return out


def _cvd_slope(d: np.ndarray, v: np.ndarray) -> np.ndarray:
    cvd = np.cumsum(d)
    out = np.full(len(d), np.nan)
    for t in range(9, len(d)):
        out[t] = np.polyfit(np.arange(10), cvd[t - 9:t + 1], 1)[0] / v[t - 9:t + 1].mean()
    return out


def _ichimoku(h, l, c):
    tenkan, kijun, span_b = talib.MIDPRICE(h, l, 9), talib.MIDPRICE(h, l, 26), talib.MIDPRICE(h, l, 52)
    a, b = _lag((tenkan + kijun) / 2, 26), _lag(span_b, 26)  # the cloud shown now was computed 26 bars ago
    top, bottom = np.fmax(a, b), np.fmin(a, b)
    cloud = np.where(c > top, (c - top) / c, np.where(c < bottom, (c - bottom) / c, 0.0))
    cloud[np.isnan(a) | np.isnan(b)] = np.nan
    return {"ichi_tenkan": c / tenkan - 1, "ichi_kijun": c / kijun - 1, "ichi_tk": (tenkan - kijun) / c,
            "ichi_cloud": cloud, "ichi_cloud_width": (a - b) / c}


def _cvd_div(c, d):
    cvd = np.cumsum(d)
    out = np.full(len(c), np.nan)
    for t in range(19, len(c)):
        pc, pv = c[t - 19:t], cvd[t - 19:t]
        out[t] = -1.0 if c[t] >= pc.max() and cvd[t] < pv.max() else 1.0 if c[t] <= pc.min() and cvd[t] > pv.min() else 0.0
    return out


def _imb_stack(dr):
    out, run = [], 0
    for x in dr:
        run = (run + 1 if run > 0 else 1) if x >= 0.5 else (run - 1 if run < 0 else -1) if x <= -0.5 else 0
        out.append(float(run))
    return np.array(out)


def _fvg(h, l, atr):
    out = np.full(len(h), np.nan)
    for t in range(2, len(h)):
        size = l[t] - h[t - 2] if l[t] > h[t - 2] else h[t] - l[t - 2] if h[t] < l[t - 2] else 0.0
        out[t] = size / atr[t]
    return out


def _fvg_open(h, l):
    n = len(h)
    open_ = np.zeros(n)
    for j in range(2, n):
        kind = 1 if l[j] > h[j - 2] else -1 if h[j] < l[j - 2] else 0
        if not kind:
            continue
        end = min(n, j + 50)  # counted for 50 bars at most
        for k in range(j + 1, end):
            if (l[k] <= h[j - 2]) if kind > 0 else (h[k] >= l[j - 2]):
                end = k  # filled at bar k: no longer open there
                break
        open_[j:end] += kind
    return _first_from(open_, 2)


def _structure(h, l, c):
    swing_hi, swing_lo = talib.FRACTAL(h, l, 2, 2)
    bos, structure = np.full(len(c), np.nan), np.full(len(c), np.nan)
    sh = sl = None
    s = 0
    for t in range(4, len(c)):
        b = 0
        if sh is not None and c[t] > sh:
            b, sh = 1, None
        elif sl is not None and c[t] < sl:
            b, sl = -1, None
        s = b or s
        if swing_hi[t]:
            sh = h[t - 2]
        if swing_lo[t]:
            sl = l[t - 2]
        bos[t], structure[t] = b, s
    return bos, structure


def references(df: pl.DataFrame, tf_ms: int) -> dict[str, np.ndarray]:
    """Every feature computed from TA-Lib's functions (where TA-Lib has the indicator) or from its
    definition in plain numpy. NaN marks the warm-up."""
    a = {k: df[k].cast(pl.Float64).to_numpy() for k in INPUT_COLUMNS}
    h, l, c, v, d = a["high"], a["low"], a["close"], a["volume"], a["delta"]
    bpy = 365 * 86_400_000 / tf_ms
    r1 = np.log(c / _lag(c, 1))
    atr, atr10 = talib.ATR(h, l, c, 14), talib.ATR(h, l, c, 10)
    macd, signal, hist = talib.MACD(c, 12, 26, 9)
    up, mid, lo = talib.BBANDS(c, 20, 2.0, 2.0, 0)
    kc_up, kc_mid, kc_lo = talib.KC(h, l, c, 20, 10, 2.0)
    dc_up, _, dc_lo = talib.DONCHIAN(h, l, 20)
    st_line, st_trend = talib.SUPERTREND(h, l, c, 10, 3.0)
    vi_p, vi_m = talib.VORTEX(h, l, c, 14)
    slow_k, slow_d = talib.STOCH(h, l, c, 14, 3, 0, 3, 0)
    v_from_1 = np.r_[np.nan, v[1:]]
    dr = d / v
    obv = talib.OBV(c, v)
    bos, structure = _structure(h, l, c)
    ref = {
        "ret_1": r1, "ret_3": np.log(c / _lag(c, 3)), "ret_12": np.log(c / _lag(c, 12)),
        "rv": np.sqrt(talib.SUM(r1 * r1, 20) / 20 * bpy),
        "atr": atr, "atr_pct": _atr_pct(atr), "rsi": talib.RSI(c, 14),
        "ema_gap": (talib.EMA(c, 12) - talib.EMA(c, 26)) / c, "macd_hist": hist / c,
        "bb_width": (up - lo) / mid, "adx": talib.ADX(h, l, c, 14),
        "vol_z": (v - talib.SMA(v, 20)) / talib.STDDEV(v, 20, 1.0),
        "delta_z": (d - talib.SMA(d, 20)) / talib.STDDEV(d, 20, 1.0),
        "cvd_slope": _cvd_slope(d, v), "vwap_dev": c / a["vwap"] - 1,
        "intensity": a["trades"] / talib.SMA(a["trades"], 20),
        **{s: a[s] for s in ("s_top", "s_bot", "s_mood")},
        **{f"{s}_ema": talib.EMA(a[s], 5) for s in ("s_top", "s_bot", "s_mood")},
        "sma_gap_20": c / talib.SMA(c, 20) - 1, "sma_gap_50": c / talib.SMA(c, 50) - 1,
        "ema_gap_20": c / talib.EMA(c, 20) - 1, "ema_gap_50": c / talib.EMA(c, 50) - 1,
        "wma_gap_20": c / talib.WMA(c, 20) - 1, "hma_gap_20": c / talib.HMA(c, 20) - 1,
        "vwma_gap_20": c / talib.VWMA(c, v, 20) - 1,
        "plus_di": talib.PLUS_DI(h, l, c, 14), "minus_di": talib.MINUS_DI(h, l, c, 14),
        "sar_gap": (c - talib.SAR(h, l, 0.02, 0.2)) / c,
        "st_gap": (c - st_line) / c, "st_dir": np.where(np.isnan(st_line), np.nan, st_trend),
        "trix": talib.TRIX(c, 15), "vi_plus": vi_p, "vi_minus": vi_m,
        **_ichimoku(h, l, c),
        "aroon_osc": talib.AROONOSC(h, l, 14),
        "stoch_k": slow_k, "stoch_d": slow_d, "macd_signal": signal / c, "cci": talib.CCI(h, l, c, 20),
        "willr": talib.WILLR(h, l, c, 14), "roc_10": talib.ROC(c, 10), "tsi": talib.TSI(c, 25, 13),
        "bb_pctb": (c - lo) / (up - lo), "bb_squeeze": (up - lo) / (kc_up - kc_lo),
        "kc_pos": (c - kc_mid) / (kc_up - kc_mid), "kc_width": (kc_up - kc_lo) / kc_mid,
        "dc_pos": (c - dc_lo) / (dc_up - dc_lo), "dc_width": (dc_up - dc_lo) / c,
        "natr": talib.NATR(h, l, c, 14), "range_atr": (h - l) / atr, "ret_atr": (c - _lag(c, 1)) / atr,
        "park_vol": np.sqrt(talib.SUM(np.log(h / l) ** 2, 20) / (4 * math.log(2) * 20) * bpy),
        "chaikin_vol": talib.CVI(h, l, 10, 10),
        "obv_slope": (obv - _lag(obv, 20)) / talib.SUM(v_from_1, 20),
        "mfi": talib.MFI(h, l, c, v, 14), "cmf": talib.CMF(h, l, c, v, 20),
        "adosc": talib.ADOSC(h, l, c, v, 3, 10) / talib.SMA(v, 10),
        "force_13": talib.EFI(c, v, 13) / (c * talib.EMA(v_from_1, 13)),
        "vwap20_dev": c / talib.VWMA(a["vwap"], v, 20) - 1,
        "delta_ratio": dr, "delta_pos": (d - a["min_delta"]) / (a["max_delta"] - a["min_delta"]),
        "delta_corr": talib.CORREL(r1, dr, 20), "cvd_div": _cvd_div(c, d), "imb_stack": _imb_stack(dr),
        "poc_dist": (c - a["poc"]) / atr, "vah_dist": (c - a["vah"]) / atr, "val_dist": (c - a["val"]) / atr,
        "fvg": _fvg(h, l, atr), "fvg_open": _fvg_open(h, l), "bos": bos, "structure": structure,
    }
    return ref


def assert_matches(got: list, want: np.ndarray, name: str, rel: float = 1e-9) -> None:
    """The same warm-up (None exactly where the reference is NaN, i.e. before TA-Lib's lookback)
    and |got - want| <= rel * max(|want|, mean |want|): relative, with the series' scale as the
    floor for oscillators that cross zero."""
    want = np.asarray(want, dtype=float)
    first = int(np.argmax(~np.isnan(want)))
    assert [i for i, g in enumerate(got) if g is None] == list(range(first)), f"{name}: warm-up differs from the reference's ({first})"
    assert first == WARMUP[name] - 1, f"{name}: WARMUP says {WARMUP[name]}, the reference starts at row {first}"
    g, w = np.array(got[first:], dtype=float), want[first:]
    assert not np.isnan(w).any() and np.isfinite(g).all(), name
    scale = np.maximum(np.abs(w), np.abs(w).mean())
    err = np.abs(g - w) / np.where(scale == 0, 1.0, scale)
    assert err.max() <= rel, f"{name}: max relative error {err.max():.2e} at row {first + int(err.argmax())}"


def assert_close(got: list, want: list, rel=1e-9, abs_=1e-9, name=""):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{name}[{i}]: expected null (not enough history), got {g}"
        else:
            assert g is not None, f"{name}[{i}]: expected {w}, got null"
            assert g == pytest.approx(w, rel=rel, abs=abs_), f"{name}[{i}]"


# ------------------------------------------------------------------------------ contract


def test_at_least_60_features_the_original_22_kept_each_with_warmup_and_formula():
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) >= 60
    assert len(FEATURE_NAMES) >= 3 * len(ORIGINAL_22)
    assert FEATURE_NAMES[:22] == ORIGINAL_22  # models and manifests refer to these names
    assert set(WARMUP) == set(FEATURE_NAMES) | {"regime"}
    assert all(len(FORMULAS[f]) > 10 for f in FEATURE_NAMES)
    assert WARM_BARS == max(WARMUP.values()) == WARMUP["ichi_cloud"] == 78
    assert (WARMUP["rsi"], WARMUP["atr"], WARMUP["adx"], WARMUP["macd_hist"], WARMUP["atr_pct"]) == (15, 15, 28, 34, 64)


def test_output_columns_and_types():
    out = compute_features(random_frame(80), M5)
    assert out.columns == ["start", "end", "close", *FEATURE_NAMES, *PERP_NAMES, "regime", "warm"]
    assert all(out.schema[f] == pl.Float64 for f in FEATURE_NAMES + PERP_NAMES)
    assert all(out[f].null_count() == 80 for f in PERP_NAMES)  # no perp data: no perp features
    assert out.schema["regime"] == pl.String and out.schema["warm"] == pl.Boolean
    assert out.height == 80


def test_missing_input_column_is_a_clear_error():
    with pytest.raises(ValueError, match="vwap"):
        compute_features(random_frame(5).drop("vwap"), M5)


# ------------------------------------------------- TA-Lib parity (acceptance: every feature)


@pytest.mark.parametrize("tick", [None, 0.01], ids=["smooth", "ticked"])
def test_every_feature_matches_talib_or_its_reference_after_the_same_warm_up(tick):
    df = random_frame(3000, seed=11 if tick is None else 12, tick=tick)
    out = compute_features(df, M5)
    ref = references(df, M5)
    assert set(ref) == set(FEATURE_NAMES)  # no feature goes unchecked
    for name in FEATURE_NAMES:
        assert_matches(col(out, name), ref[name], name)
    # the discrete structures do happen on this tape (the comparison is not vacuous)
    for name in ("st_dir", "cvd_div", "imb_stack", "fvg", "fvg_open", "bos", "structure"):
        assert len(set(col(out, name)[WARMUP[name]:])) >= (2 if name == "st_dir" else 3), name


# --------------------------------------------------------------------- hand-checkable series


def test_log_returns_are_exact():
    close = [100.0, 110.0, 121.0, 133.1, 50.0, 200.0] + [100.0 + i for i in range(10)]
    out = compute_features(frame(close), M5)
    r1, r3, r12 = col(out, "ret_1"), col(out, "ret_3"), col(out, "ret_12")
    assert r1[0] is None and r3[2] is None and r12[11] is None
    assert r1[1] == pytest.approx(math.log(1.1), rel=1e-15)
    assert r1[2] == pytest.approx(math.log(1.1), rel=1e-15)
    assert r3[3] == pytest.approx(math.log(1.331), rel=1e-14)  # 133.1 / 100
    assert r1[5] == pytest.approx(math.log(4.0), rel=1e-15)  # 200 / 50
    assert r12[12] == pytest.approx(math.log(106.0 / 100.0), rel=1e-14)  # close[12] = 106, close[0] = 100


def test_rsi_strictly_rising_is_100_falling_is_0_flat_is_50():
    up = compute_features(frame([100.0 + i for i in range(40)]), M5)
    down = compute_features(frame([200.0 - i for i in range(40)]), M5)
    flat = compute_features(frame([100.0] * 40), M5)
    assert col(up, "rsi")[:14] == [None] * 14  # 14 changes are needed
    assert col(up, "rsi")[14:] == [100.0] * 26
    assert col(down, "rsi")[14:] == [0.0] * 26
    assert col(flat, "rsi")[14:] == [50.0] * 26


# Wilder's RSI worked example (as in the StockCharts RSI tutorial).
RSI_CLOSES = [44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08, 45.89, 46.03,
              45.61, 46.28, 46.28, 46.00, 46.03, 46.41, 46.22, 45.64, 46.21, 46.25, 45.71, 46.45,
              45.78, 45.35, 44.03, 44.18, 44.22, 44.57, 43.42, 42.66, 43.13]


def test_rsi_textbook_example_by_hand():
    out = col(compute_features(frame(RSI_CLOSES), M5), "rsi")
    # The first 14 changes: -0.25 +0.06 -0.54 +0.72 +0.50 +0.27 +0.32 +0.42 +0.24 -0.19 +0.14
    # -0.42 +0.67 0.00 -> gains sum 3.34, losses sum 1.40; RSI = 100 * 3.34 / (3.34 + 1.40).
    assert out[13] is None
    assert out[14] == pytest.approx(100 * 3.34 / 4.74, abs=1e-9)  # 70.46
    # next change -0.28: avg gain 3.34/14 * 13/14, avg loss (1.40/14 * 13 + 0.28) / 14
    g, l = 3.34 / 14 * 13 / 14, (1.40 / 14 * 13 + 0.28) / 14
    assert out[15] == pytest.approx(100 * g / (g + l), abs=1e-9)  # 66.25
    assert_close(out[14:], list(talib.RSI(np.array(RSI_CLOSES), 14)[14:]), name="rsi")


def test_atr_of_constant_range_bars_equals_the_range():
    close = [100.0 + 0.5 * i for i in range(40)]  # drift smaller than the range: TR = h - l
    out = compute_features(frame(close, [c + 1 for c in close], [c - 1 for c in close]), M5)
    atr = col(out, "atr")
    assert atr[:14] == [None] * 14
    assert atr[14:] == pytest.approx([2.0] * 26, abs=1e-12)
    assert col(out, "range_atr")[14:] == pytest.approx([1.0] * 26)  # every bar spans one ATR
    assert col(out, "natr")[20] == pytest.approx(100 * 2.0 / close[20])


def test_atr_uses_gaps_through_the_previous_close():
    # range 2 everywhere, but every bar gaps up 5: close c_t = 100 + 5t, high = c_t + 1, low = c_t - 1
    # -> TR = max(2, |high - c_{t-1}| = 6, |low - c_{t-1}| = 4) = 6
    close = [100.0 + 5 * i for i in range(30)]
    out = compute_features(frame(close, [c + 1 for c in close], [c - 1 for c in close]), M5)
    assert col(out, "atr")[14:] == pytest.approx([6.0] * 16, abs=1e-12)
    assert col(out, "ret_atr")[14:] == pytest.approx([5 / 6] * 16)


def test_adx_and_directional_indicators_on_a_monotone_trend():
    # highs and lows rise by 1 each bar: +DM = 1, -DM = 0, TR = max(1, |h - c_prev| = 1.5) = 1.5
    n = 60
    out = compute_features(frame([i + 1.5 for i in range(n)], [i + 2.0 for i in range(n)], [i + 1.0 for i in range(n)]), M5)
    pdi, mdi, adx = col(out, "plus_di"), col(out, "minus_di"), col(out, "adx")
    assert pdi[:14] == [None] * 14
    assert pdi[14:] == pytest.approx([100 / 1.5] * (n - 14))
    assert mdi[14:] == [0.0] * (n - 14)
    assert adx[:27] == [None] * 27  # 14 DX values, the first DX needs 15 bars
    assert adx[27:] == pytest.approx([100.0] * (n - 27))


def test_adx_rises_when_a_range_turns_into_a_trend():
    # 40 bars chopping around 100, then 60 bars rising by 0.4 per bar (range 1 everywhere)
    close = [100.0 + (0.3 if i % 2 else -0.3) for i in range(40)] + [100.0 + 0.4 * i for i in range(1, 61)]
    high, low = [c + 0.5 for c in close], [c - 0.5 for c in close]
    out = compute_features(frame(close, high, low), M5)
    pdi, mdi, adx = col(out, "plus_di"), col(out, "minus_di"), col(out, "adx")
    assert adx[39] < 20  # the range has no direction
    assert all(p > m for p, m in zip(pdi[45:], mdi[45:]))  # +DI above -DI in the up-trend
    trend = adx[45:]
    assert all(b >= a for a, b in zip(trend, trend[1:]))  # ADX keeps increasing ...
    assert trend[-1] > 60  # ... toward high values
    assert_close(adx[27:], list(talib.ADX(np.array(high), np.array(low), np.array(close), 14)[27:]), name="adx")


def test_bollinger_of_constant_prices_and_of_99_101():
    flat = compute_features(frame([100.0] * 30), M5)
    assert col(flat, "bb_width")[19:] == [0.0] * 11
    assert col(flat, "bb_pctb")[19:] == [0.5] * 11  # no width: neutral, not a division by zero
    # alternating 99/101: sma 100, population std 1 -> 4 * 1 / 100; %B of 101 = (101 - 98) / 4
    out = compute_features(frame([99.0 if i % 2 else 101.0 for i in range(30)]), M5)
    assert col(out, "bb_width")[:19] == [None] * 19
    assert col(out, "bb_width")[19:] == pytest.approx([0.04] * 11, rel=1e-12)
    assert col(out, "bb_pctb")[20] == pytest.approx(0.75)


def test_zscores_of_a_constant_series_then_a_spike():
    vol = [5.0] * 30 + [50.0] + [5.0] * 5
    delta = [-2.0] * 30 + [7.0] + [-2.0] * 5
    out = compute_features(frame([100.0] * 36, volume=vol, delta=delta), M5)
    vz, dz = col(out, "vol_z"), col(out, "delta_z")
    assert vz[:19] == [None] * 19 and dz[:19] == [None] * 19
    assert vz[19:30] == [0.0] * 11 and dz[19:30] == [0.0] * 11  # constant window: no deviation
    # 19 values c and one spike s in the window: mean = c + (s-c)/20, std = |s-c| sqrt(19)/20
    # -> z = (19/20)(s-c) / (|s-c| sqrt(19)/20) = sqrt(19), whatever c and s are
    assert vz[30] == pytest.approx(math.sqrt(19), rel=1e-12)
    assert dz[30] == pytest.approx(math.sqrt(19), rel=1e-12)
    # the next bar is back at c: z = (c - mean) / std = -(1/20)(s-c) / (|s-c| sqrt(19)/20) = -1/sqrt(19)
    assert vz[31] == pytest.approx(-1 / math.sqrt(19), rel=1e-12)


def test_ema_gap_sign_follows_the_trend():
    up = compute_features(frame([100.0 * 1.001 ** i for i in range(60)]), M5)
    down = compute_features(frame([100.0 * 0.999 ** i for i in range(60)]), M5)
    assert col(up, "ema_gap")[:25] == [None] * 25
    assert all(g > 0 for g in col(up, "ema_gap")[25:])
    assert all(g < 0 for g in col(down, "ema_gap")[25:])
    # the first value: (SMA12-seeded EMA12 - SMA26) / close, by hand for a straight line 1..26
    line = compute_features(frame([float(i) for i in range(1, 40)]), M5)
    ema12 = sum(range(1, 13)) / 12  # 6.5 at row 11, then + 2/13 * (x - ema) per row
    for x in range(13, 27):
        ema12 += 2 / 13 * (x - ema12)
    assert col(line, "ema_gap")[25] == pytest.approx((ema12 - 13.5) / 26.0, rel=1e-12)  # SMA26 = 13.5


def test_realised_volatility_of_alternating_returns():
    r = 0.001
    close = [100.0 * math.exp(r if i % 2 else 0.0) for i in range(40)]  # returns +r, -r, +r, ...
    out = compute_features(frame(close), M5)
    bars_per_year = 365 * 288
    assert col(out, "rv")[:20] == [None] * 20
    assert col(out, "rv")[20:] == pytest.approx([r * math.sqrt(bars_per_year)] * 20, rel=1e-9)
    # annualisation follows the timeframe: 1h bars -> 365 * 24 bars a year
    assert col(compute_features(frame(close), H1), "rv")[20] == pytest.approx(r * math.sqrt(365 * 24), rel=1e-9)
    # Parkinson: every bar spans ln(h / l) = x -> sqrt(x^2 / (4 ln 2) * bars a year)
    x = math.log(1.002)
    pv = col(compute_features(frame([100.0] * 25, [100.0 * 1.002] * 25, [100.0] * 25), M5), "park_vol")
    assert pv[:19] == [None] * 19 and pv[19] == pytest.approx(x / math.sqrt(4 * math.log(2)) * math.sqrt(bars_per_year))


def test_cvd_slope_of_a_constant_delta_is_delta_over_volume():
    out = compute_features(frame([100.0] * 20, volume=[8.0] * 20, delta=[2.0] * 20), M5)
    assert col(out, "cvd_slope")[:9] == [None] * 9
    assert col(out, "cvd_slope")[9:] == pytest.approx([0.25] * 11, rel=1e-12)  # cvd rises 2/bar, volume 8


def test_vwap_deviation_and_trade_intensity():
    trades = [10] * 25 + [30]
    out = compute_features(frame([101.0] * 26, vwap=[100.0] * 26, trades=trades), M5)
    assert col(out, "vwap_dev") == pytest.approx([0.01] * 26, rel=1e-12)
    assert col(out, "vwap20_dev")[19:] == pytest.approx([0.01] * 7, rel=1e-12)
    assert col(out, "intensity")[:19] == [None] * 19
    assert col(out, "intensity")[19:25] == [1.0] * 6
    assert col(out, "intensity")[25] == pytest.approx(30 / ((19 * 10 + 30) / 20), rel=1e-12)  # 30/11


def test_cohort_signals_and_their_ema():
    s_top = [0.1, 0.2, 0.3, 0.4, 0.5, 1.0, -1.0]
    s_bot = [0.0, -0.5, 0.0, 0.5, 0.0, 0.0, 0.0]
    out = compute_features(frame([100.0] * 7, s_top=s_top, s_bot=s_bot), M5)
    assert col(out, "s_top") == s_top and col(out, "s_bot") == s_bot
    assert col(out, "s_mood") == pytest.approx([a - b for a, b in zip(s_top, s_bot)])
    ema = col(out, "s_top_ema")
    assert ema[:4] == [None] * 4
    assert ema[4] == pytest.approx(0.3)  # mean of the first 5
    assert ema[5] == pytest.approx(0.3 + (1.0 - 0.3) / 3)  # span 5: alpha = 2/6
    assert ema[6] == pytest.approx(ema[5] + (-1.0 - ema[5]) / 3)


def test_atr_percentile_constant_rising_falling():
    n = 90
    close = [100.0] * n
    const = compute_features(frame(close), M5)
    assert col(const, "atr_pct")[:63] == [None] * 63  # 50 ATR values needed, ATR starts at row 14
    assert col(const, "atr_pct")[63:] == [0.5] * (n - 63)  # all equal: middle rank
    widening = compute_features(frame(close, [100 + 0.01 * i for i in range(n)], [100 - 0.01 * i for i in range(n)]), M5)
    assert col(widening, "atr_pct")[63:] == [1.0] * (n - 63)  # every ATR is the largest so far
    narrowing = compute_features(frame(close, [101 - 0.01 * i for i in range(n)], [99 + 0.01 * i for i in range(n)]), M5)
    assert col(narrowing, "atr_pct")[63:] == [0.0] * (n - 63)
    assert col(widening, "regime")[63] == VOLATILE


def test_atr_percentile_slides_over_the_last_500_values():
    # 600 bars: ATR rises for 300 bars, then falls: the last value is below the 300 rising ones it still sees
    n = 620
    half = [0.5 + 0.001 * i for i in range(310)]
    rng_ = half + half[::-1]
    out = compute_features(frame([100.0] * n, [100 + r for r in rng_], [100 - r for r in rng_]), M5)
    want = _atr_pct(np.array(col(out, "atr"), dtype=float))
    assert_close(col(out, "atr_pct"), [None if np.isnan(w) else float(w) for w in want], rel=1e-12, name="atr_pct")


def test_regime_labels():
    n = 80
    trend = compute_features(frame([i + 1.5 for i in range(n)], [i + 2.0 for i in range(n)], [i + 1.0 for i in range(n)]), M5)
    assert col(trend, "regime")[:63] == [None] * 63  # unknown while adx / atr_pct are undefined
    assert col(trend, "regime")[63:] == [STRONG_TREND] * (n - 63)  # adx 100, atr_pct 0.5
    flat = compute_features(frame([100.0] * n), M5)
    assert col(flat, "regime")[63:] == [RANGING] * (n - 63)  # adx 0, atr_pct 0.5
    # every row of a random frame follows the rule
    out = compute_features(random_frame(400), M5)
    seen = set()
    for adx, pct, reg in zip(col(out, "adx"), col(out, "atr_pct"), col(out, "regime")):
        if adx is None or pct is None:
            want = None
        elif pct >= 0.8:
            want = VOLATILE
        elif adx >= 25:
            want = STRONG_TREND
        elif adx < 20:
            want = RANGING
        else:
            want = CHOPPY
        assert reg == want
        seen.add(reg)
    assert {VOLATILE, STRONG_TREND, RANGING, CHOPPY} <= seen


def test_atr_percentile_of_exactly_0_8_is_volatile():
    # Steer the ATR through its true ranges (constant close, so TR = high - low):
    # rows 14..53 ATR 1.00, 1.01, ... 1.39; rows 54..63 ATR 2.00 ... 2.09; row 64 TR = 0 ->
    # ATR = 2.09 * 13/14 = 1.94: above the first 40 of the 50 earlier values, below the last 10
    # -> atr_pct = 40 / 50 = 0.8, which is VOLATILE (atr_pct >= 0.8).
    target = {t: 1.0 + 0.01 * (t - 14) for t in range(14, 54)} | {t: 2.0 + 0.01 * (t - 54) for t in range(54, 64)}
    tr, atr = [1.0] * 15, 1.0  # rows 0..14: the seed is the mean of TR[1..14] = 1
    for t in range(15, 64):
        tr.append(atr + 14 * (target[t] - atr))
        atr = target[t]
    tr.append(0.0)
    out = compute_features(frame([100.0] * 65, [100 + x / 2 for x in tr], [100 - x / 2 for x in tr]), M5)
    got = col(out, "atr")
    assert got[53] < got[64] < got[54]
    assert col(out, "atr_pct")[64] == 0.8
    assert col(out, "regime")[64] == VOLATILE


def test_oscillators_of_a_flat_tape_are_neutral_not_null():
    out = compute_features(frame([100.0] * 90, [100.0] * 90, [100.0] * 90), M5).row(-1, named=True)
    assert (out["rsi"], out["stoch_k"], out["stoch_d"], out["mfi"], out["willr"], out["dc_pos"]) == (50.0, 50.0, 50.0, 50.0, -50.0, 0.5)
    assert (out["cci"], out["tsi"], out["cmf"], out["kc_pos"], out["range_atr"], out["fvg"]) == (0.0,) * 6
    assert (out["vi_plus"], out["vi_minus"], out["bb_squeeze"]) == (1.0, 1.0, 1.0)


def test_fair_value_gaps_form_fill_and_expire():
    # bar 2's low 103 is above bar 0's high 100.5: a bullish gap, open until a low reaches 100.5
    close = [100.0, 101.0, 104.0, 104.0, 102.0, 100.0]
    high = [100.5, 102.0, 105.0, 106.0, 105.0, 102.0]
    low = [99.5, 100.0, 103.0, 101.5, 101.0, 99.0]
    out = compute_features(frame(close, high, low), M5)
    assert col(out, "fvg_open")[:2] == [None, None]
    assert col(out, "fvg_open")[2:] == [1.0, 1.0, 1.0, 0.0]  # bar 4's low 101 leaves it open; bar 5's 99 fills it
    # a gap is counted for 50 bars at most
    close = [100.0, 101.0, 104.0] + [104.0] * 60
    out = compute_features(frame(close, [100.5, 102.0] + [105.0] * 61, [99.5, 100.0, 103.0] + [101.0] * 60), M5)
    fo = col(out, "fvg_open")
    assert fo[2:52] == [1.0] * 50 and fo[52:] == [0.0] * 11
    # the gap's size is measured in ATRs once the ATR exists: bearish gap at bar 20
    close = [100.0] * 20 + [97.0]
    high, low = [100.5] * 20 + [98.0], [99.5] * 20 + [96.0]
    out = compute_features(frame(close, high, low), M5)
    atr = col(out, "atr")[20]
    assert col(out, "fvg")[:14] == [None] * 14 and col(out, "fvg")[14:20] == [0.0] * 6
    assert col(out, "fvg")[20] == pytest.approx(-(99.5 - 98.0) / atr)


def test_break_of_structure_needs_a_confirmed_swing_and_breaks_it_once():
    # a swing high at bar 2 (high 105), confirmed at bar 4; bar 6 closes above it; bar 7 again (no new break)
    high = [101.0, 102.0, 105.0, 103.0, 102.0, 104.0, 106.5, 107.0, 106.0]
    low = [99.0, 100.0, 101.0, 100.5, 100.0, 101.0, 104.0, 105.0, 104.5]
    close = [100.0, 101.0, 102.0, 101.0, 101.0, 103.0, 106.0, 106.5, 105.0]
    out = compute_features(frame(close, high, low), M5)
    assert col(out, "bos")[:4] == [None] * 4
    assert col(out, "bos")[4:] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert col(out, "structure")[4:] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # the swing is not used before it is confirmed: the same closes without bars 3-4's lower highs
    high2 = high[:3] + [106.0, 106.0] + high[5:]
    out2 = compute_features(frame(close, high2, low), M5)
    assert col(out2, "bos")[4:] == [0.0] * 5


def test_stacked_imbalance_and_delta_position():
    delta = [0.6, 0.8, 0.5, -0.9, -0.7, 0.1, 0.49]
    out = compute_features(frame([100.0] * 7, volume=[1.0] * 7, delta=delta, min_delta=[-1.0] * 7, max_delta=[1.0] * 7), M5)
    assert col(out, "imb_stack") == [1.0, 2.0, 3.0, -1.0, -2.0, 0.0, 0.0]  # |delta|/v >= 0.5 <=> one side >= 3x
    assert col(out, "delta_ratio") == pytest.approx(delta)
    assert col(out, "delta_pos") == pytest.approx([(d + 1) / 2 for d in delta])


def test_cvd_divergence_flags_a_new_high_that_order_flow_does_not_confirm():
    close = [100.0 + 0.1 * i for i in range(20)]  # every close a new 20-bar high
    buying = [1.0] * 20  # CVD at a new high too: confirmed
    fading = [1.0] * 19 + [-1.0]  # CVD falls on the last bar: divergence
    assert col(compute_features(frame(close, delta=buying), M5), "cvd_div")[19] == 0.0
    assert col(compute_features(frame(close, delta=fading), M5), "cvd_div")[19] == -1.0
    lows = [100.0 - 0.1 * i for i in range(20)]
    assert col(compute_features(frame(lows, delta=[-1.0] * 19 + [1.0]), M5), "cvd_div")[19] == 1.0


def test_ichimoku_cloud_distance_uses_the_cloud_computed_26_bars_earlier():
    close = [100.0] * 90 + [110.0] * 30  # a jump at bar 90; every bar spans close +- 0.5
    out = compute_features(frame(close), M5)
    cloud, width = col(out, "ichi_cloud"), col(out, "ichi_cloud_width")
    assert cloud[:77] == [None] * 77 and width[76] is None
    assert cloud[77:90] == [0.0] * 13 and width[77:90] == [0.0] * 13  # flat: inside a zero-width cloud at 100
    # from the jump on, the cloud shown is the one computed 26 bars earlier, still at 100 ...
    assert cloud[90:116] == pytest.approx([10 / 110] * 26)
    # ... until bar 116 shows the cloud computed at bar 90: every midpoint (110.5 + 99.5) / 2 = 105
    assert cloud[116] == pytest.approx(5 / 110)
    assert col(out, "ichi_tenkan")[119] == 0.0 and col(out, "ichi_tk")[95] == pytest.approx((105 - 105) / 110)


# ------------------------------------------------------------- warm-up and lookahead


def test_warm_up_rows_are_marked_and_hold_nulls_not_values():
    out = compute_features(random_frame(120), M5)
    for name in FEATURE_NAMES:
        values = col(out, name)
        first = WARMUP[name] - 1
        assert values[:first] == [None] * first, name
        assert all(v is not None and math.isfinite(v) for v in values[first:]), name
    warm = col(out, "warm")
    assert warm == [False] * (WARM_BARS - 1) + [True] * (120 - WARM_BARS + 1)
    assert col(out, "regime")[WARMUP["regime"] - 2] is None and col(out, "regime")[WARMUP["regime"] - 1] is not None


def with_perp(df: pl.DataFrame, seed: int = 5) -> pl.DataFrame:
    """``df`` with perp columns (``features.PERP_COLUMNS``): a funding rate that drifts, mark and
    index near the close, open interest that wanders, liquidations in about a third of the bars."""
    rng = np.random.default_rng(seed)
    n, close = df.height, df["close"].to_numpy()
    liq = rng.random(n) < 0.35
    return df.with_columns(
        pl.Series("funding_rate", 1e-4 + np.cumsum(rng.normal(0, 2e-5, n))),
        pl.Series("funding_time", (df["end"].to_numpy() // 28_800_000 + 1) * 28_800_000),
        pl.Series("funding_ts", df["end"].to_numpy() - 1),
        pl.Series("mark_price", close * (1 + rng.normal(0, 3e-4, n))),
        pl.Series("index_price", close * (1 + rng.normal(0, 3e-4, n))),
        pl.Series("open_interest", 1e4 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))),
        pl.lit(None, dtype=pl.Float64).alias("oi_value"),
        pl.Series("oi_ts", df["end"].to_numpy() - 1),
        pl.Series("liq_buy", np.where(liq & (rng.random(n) < 0.5), rng.uniform(10, 500, n), 0.0)),
        pl.Series("liq_sell", np.where(liq, rng.uniform(10, 500, n), 0.0)),
        pl.Series("liq_count", np.where(liq, 2, 0)),
    )


def test_short_history_is_all_cold():
    out = compute_features(random_frame(10), M5)
    assert not any(col(out, "warm"))
    assert col(out, "adx") == [None] * 10 and col(out, "rsi") == [None] * 10


PERTURBED = ("open", "high", "low", "close", "volume", "vwap", "delta", "min_delta", "max_delta",
             "s_top", "s_bot", "s_mood", "poc", "vah", "val", "funding_rate", "mark_price", "open_interest",
             "liq_buy", "liq_sell")


def test_no_lookahead_changing_later_bars_leaves_earlier_rows_unchanged_for_every_feature():
    df = with_perp(random_frame(300, seed=3, tick=0.01))
    base = compute_features(df, M5)
    rng = np.random.default_rng(99)
    changed_later = set()
    for i in (0, 20, 63, 77, 150, 298):
        later = pl.int_range(pl.len()) > i
        changed = df.with_columns(
            pl.when(later).then(pl.col(c) * pl.lit(rng.uniform(0.5, 2.0))).otherwise(pl.col(c)) for c in PERTURBED
        ).with_columns(pl.when(later).then(pl.col("trades") * 7).otherwise(pl.col("trades")))
        again = compute_features(changed, M5)
        assert again.head(i + 1).equals(base.head(i + 1)), f"rows <= {i} changed"
        for name in FEATURE_NAMES + PERP_NAMES:
            if not again[name].tail(300 - i - 1).equals(base[name].tail(300 - i - 1)):
                changed_later.add(name)
    # every feature does react to the bars it is allowed to see: the test covers all of them
    assert changed_later == set(FEATURE_NAMES + PERP_NAMES)


# ------------------------------------------------------------------------------ streaming


def test_streaming_equals_batch_bar_for_bar():
    df = with_perp(random_frame(400, seed=11))
    bars = bars_of(df)
    state = FeatureState()
    batch = compute_features(df, M5)
    names = FEATURE_NAMES + PERP_NAMES
    for i, bar in enumerate(bars):
        row = update(state, bar)
        want = batch.row(i, named=True)
        assert (row.start, row.end, row.close, row.tf) == (bar.start, bar.end, bar.close, "5m")
        assert row.values == {f: want[f] for f in names}, f"bar {i}"
        assert list(row.values) == names
        if i >= 12:
            assert all(row.values[f] is not None for f in PERP_NAMES), f"bar {i}"
        assert row.warm == want["warm"]
        assert row.regime == (want["regime"] or REGIME_UNKNOWN)


def test_streaming_state_is_plain_bounded_and_ignores_stale_bars():
    bars = bars_of(random_frame(1500, tick=0.01))
    state = FeatureState()
    for b in bars[:200]:
        update(state, b)
    assert update(state, bars[199]) is None  # duplicate
    assert update(state, bars[5]) is None  # out of order
    assert len(state) == 200
    restored, copied = pickle.loads(pickle.dumps(state)), copy.deepcopy(state)
    # the copies are independent: advancing the original does not move them
    ahead = [update(state, b) for b in bars[200:600]]
    assert [update(restored, b) for b in bars[200:600]] == ahead
    assert [update(copied, b) for b in bars[200:600]] == ahead
    assert ahead[-1].values["rsi"] is not None and ahead[-1].warm
    size_600 = len(pickle.dumps(state))  # every window is full by now (the longest: 500 ATR values)
    for b in bars[600:]:
        update(state, b)
    assert len(pickle.dumps(state)) < 1.1 * size_600  # O(1) state: no history kept beyond fixed windows


def test_feature_row_regime_is_unknown_while_cold():
    row = update(FeatureState(), bars_of(random_frame(1))[0])
    assert row.warm is False and row.regime == REGIME_UNKNOWN
    assert row.values["ret_1"] is None and row.values["vwap_dev"] is not None


# ------------------------------------------------- multi-timeframe alignment (acceptance)


def frow(tf: str, end: int, marker: float = 1.0, warm: bool = True) -> FeatureRow:
    """A FeatureRow whose every value is ``marker`` (so a test can see which row was used)."""
    return FeatureRow(exchange="x", symbol="A/USDT:USDT", tf=tf, start=end - TFS[tf], end=end,
                      close=100.0, warm=warm, regime=RANGING, values={f: marker for f in FEATURE_NAMES + PERP_NAMES})


def test_acceptance_overlay_ending_after_the_primary_end_is_never_used():
    primary = frow("5m", T0 + 2 * H1 + 10 * 60_000, marker=0.0)  # 5m bar 02:05-02:10
    open_15m = frow("15m", T0 + 2 * H1 + 15 * 60_000, marker=9.0)  # 02:00-02:15: still open at 02:10
    open_1h = frow("1h", T0 + 3 * H1, marker=9.0)  # 02:00-03:00: still open
    row = align(primary, {"15m": open_15m, "1h": open_1h}, primary.end, TFS)
    assert row.overlay_ok == {"15m": False, "1h": False}
    assert all(row.features[f"15m_{f}"] is None for f in FEATURE_NAMES)
    assert all(row.features[f"1h_{f}"] is None for f in FEATURE_NAMES)
    # even one millisecond after the primary end is too late
    assert not overlay_usable(primary.end, frow("15m", primary.end + 1), M15)
    # the book holds the later row too, but picks the newest one CLOSED by 02:10
    book = OverlayBook()
    for r in (frow("15m", T0 + 2 * H1, 1.0), open_15m, frow("1h", T0 + 2 * H1, 2.0), open_1h):
        assert book.offer(r) is None
    got = book.offer(primary)
    assert got.overlay_ok == {"15m": True, "1h": True}
    assert got.features["15m_rsi"] == 1.0 and got.features["1h_rsi"] == 2.0  # never 9.0


def test_acceptance_overlay_older_than_two_intervals_is_missing():
    end = T0 + 12 * H1
    primary = frow("5m", end, marker=0.0)
    cases = [
        ("1h", end - 2 * H1, True),  # exactly two intervals old: still usable
        ("1h", end - 2 * H1 - 1, False),  # a millisecond more: stale
        ("1h", end - 3 * H1, False),
        ("15m", end - 2 * M15, True),
        ("15m", end - 2 * M15 - 1, False),
        ("15m", end, True),  # ends together with the primary: closed
    ]
    for tf, o_end, ok in cases:
        row = align(primary, {tf: frow(tf, o_end, 5.0)}, end, TFS)
        assert row.overlay_ok == {tf: ok}, (tf, end - o_end)
        assert row.features[f"{tf}_adx"] == (5.0 if ok else None)
    missing = align(primary, {"15m": None, "1h": None}, end, TFS)
    assert missing.overlay_ok == {"15m": False, "1h": False}
    assert missing.features["1h_rsi"] is None and missing.features["rsi"] == 0.0


def test_aligned_row_layout():
    primary = frow("5m", T0 + H1, marker=3.0)
    row = align(primary, {"15m": frow("15m", T0 + H1, 1.5), "1h": frow("1h", T0 + H1, 2.5)}, primary.end, TFS)
    assert isinstance(row, AlignedRow)
    assert list(row.features) == aligned_feature_names(["15m", "1h"])
    assert row.features["rsi"] == 3.0 and row.features["15m_rsi"] == 1.5 and row.features["1h_ema_gap"] == 2.5
    assert (row.start, row.end, row.tf, row.regime, row.warm) == (primary.start, primary.end, "5m", RANGING, True)
    with pytest.raises(ValueError, match="4h"):
        align(primary, {"4h": None}, primary.end, TFS)


def test_book_feed_uses_an_overlay_closing_with_the_primary():
    book = OverlayBook()
    book.offer(frow("15m", T0 + M15, 1.0))
    batch = [frow("5m", T0 + M15 + M5, 0.0), frow("5m", T0 + 2 * M15, 0.0), frow("15m", T0 + 2 * M15, 2.0)]
    a, b = book.feed(batch)
    assert a.features["15m_rsi"] == 1.0  # 5m ending 00:20: the 15m bar ending 00:30 is not closed yet
    assert b.features["15m_rsi"] == 2.0  # 5m ending 00:30: the 15m bar ending 00:30 is closed
    assert pickle.loads(pickle.dumps(book)).recent == book.recent


def _ohlc_bars(minute_close: np.ndarray, tf: str, every: int) -> pl.DataFrame:
    """Bars of ``every`` minutes from a minute close path (volume etc. from the minutes)."""
    n = len(minute_close) // every
    m = minute_close[: n * every].reshape(n, every)
    prev = np.r_[m[0, 0], m[:-1, -1]]
    return pl.DataFrame({
        "start": T0 + np.arange(n) * every * 60_000, "end": T0 + (np.arange(n) + 1) * every * 60_000,
        "open": prev, "high": np.maximum(m.max(1), prev), "low": np.minimum(m.min(1), prev), "close": m[:, -1],
        "volume": np.full(n, float(every)), "vwap": m.mean(1), "trades": np.full(n, every * 3),
        "delta": m[:, -1] - prev, "s_top": np.zeros(n), "s_bot": np.zeros(n), "s_mood": np.zeros(n),
    })


def test_acceptance_pipeline_of_streams_uses_only_closed_fresh_overlays():
    """5m, 15m and 1h bars stream in the order roll-ups close them (by end, shorter first); one 1h
    bars are missing (a data gap). Every aligned 5m row carries, per overlay, exactly the newest
    overlay bar ending at or before its own end, or nothing when that one is > 2 intervals old."""
    rng = np.random.default_rng(2)
    minutes = 100 * np.exp(np.cumsum(rng.normal(0, 0.001, 14 * 60)))
    frames = {tf: _ohlc_bars(minutes, tf, TFS[tf] // 60_000) for tf in TFS}
    gap = (T0 + 6 * H1, T0 + 7 * H1)  # drop the 1h bars 05:00-06:00 and 06:00-07:00
    streams = {tf: [b for b in bars_of(df, tf=tf) if not (tf == "1h" and b.end in gap)] for tf, df in frames.items()}
    events = sorted((b for bs in streams.values() for b in bs), key=lambda b: (b.end, TFS[b.tf]))
    states = {tf: FeatureState() for tf in TFS}
    book = OverlayBook()
    seen: dict[str, list[FeatureRow]] = {"15m": [], "1h": []}  # overlay rows offered so far
    aligned, stale = [], 0
    for bar in events:
        row = update(states[bar.tf], bar)
        if bar.tf != "5m":
            seen[bar.tf].append(row)
        a = book.offer(row)
        if a is None:
            continue
        aligned.append(a)
        for tf in ("15m", "1h"):
            closed = [r for r in seen[tf] if r.end <= a.end]
            want = closed[-1] if closed and a.end - closed[-1].end <= 2 * TFS[tf] else None
            assert a.overlay_ok[tf] == (want is not None), (tf, a.end)
            got = {f: a.features[f"{tf}_{f}"] for f in FEATURE_NAMES}
            assert got == ({f: want.values[f] for f in FEATURE_NAMES} if want else {f: None for f in FEATURE_NAMES})
            if want is not None:
                assert want.end <= a.end  # closed: never a bar that ends after the primary
            stale += want is None and bool(closed)
    assert len(aligned) == len(streams["5m"]) == 14 * 12
    # The gap leaves the 1h bar ending 05:00 as the newest one: stale for the 5m rows ending
    # 07:05-08:00 (the 5m row ending 08:00 is offered before the 1h bar ending 08:00; OverlayBook.feed
    # would use it, see test_book_feed_uses_an_overlay_closing_with_the_primary).
    assert stale == 12
    by_end = {a.end: a for a in aligned}
    assert by_end[T0 + 7 * H1].overlay_ok["1h"] is True  # exactly two hours old
    assert by_end[T0 + 7 * H1 + M5].overlay_ok["1h"] is False
    assert by_end[T0 + 8 * H1].overlay_ok["1h"] is False
    assert by_end[T0 + 8 * H1 + M5].overlay_ok["1h"] is True
    assert any(a.overlay_ok["1h"] for a in aligned) and any(a.overlay_ok["15m"] for a in aligned)
