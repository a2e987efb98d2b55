"""Features (SPEC §4): hand-checkable series, a plain-Python reference for every feature, warm-up,
no lookahead, streaming == batch, and closed-overlay alignment (acceptance)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import polars as pl
import pytest

from operators import features as F
from operators.bars import Bar
from operators.features import (
    FEATURE_NAMES, WARMUP, WARM_BARS, AlignedRow, FeatureRow, FeatureState, OverlayBook, align,
    compute_features, dmi, update,
)

M5 = 300_000
M15 = 900_000
H1 = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
TFS = {"5m": M5, "15m": M15, "1h": H1}


# ------------------------------------------------------------------------------- builders


def frame(close, high=None, low=None, *, volume=None, delta=None, trades=None, vwap=None,
          s_top=None, s_bot=None, s_mood=None, tf_ms=M5) -> pl.DataFrame:
    close = [float(c) for c in close]
    n = len(close)
    s_top = [0.0] * n if s_top is None else s_top
    s_bot = [0.0] * n if s_bot is None else s_bot
    return pl.DataFrame({
        "start": [T0 + i * tf_ms for i in range(n)],
        "end": [T0 + (i + 1) * tf_ms for i in range(n)],
        "open": close,
        "high": [c + 0.5 for c in close] if high is None else [float(x) for x in high],
        "low": [c - 0.5 for c in close] if low is None else [float(x) for x in low],
        "close": close,
        "volume": [1.0] * n if volume is None else [float(x) for x in volume],
        "vwap": close if vwap is None else vwap,
        "trades": [10] * n if trades is None else trades,
        "delta": [0.0] * n if delta is None else [float(x) for x in delta],
        "s_top": s_top,
        "s_bot": s_bot,
        "s_mood": [a - b for a, b in zip(s_top, s_bot)] if s_mood is None else s_mood,
    })


def random_frame(n: int, seed: int = 7, tf_ms: int = M5) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.003, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.0005, n))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.003, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.003, n))
    volume = rng.uniform(1, 20, n)
    buy = volume * rng.uniform(0, 1, n)
    s_top = rng.uniform(-1, 1, n)
    s_bot = rng.uniform(-1, 1, n)
    return pl.DataFrame({
        "start": T0 + np.arange(n) * tf_ms, "end": T0 + (np.arange(n) + 1) * tf_ms,
        "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "vwap": (high + low + close) / 3, "trades": rng.integers(1, 200, n),
        "delta": 2 * buy - volume, "s_top": s_top, "s_bot": s_bot, "s_mood": s_top - s_bot,
    })


def bars_of(df: pl.DataFrame, exchange="x", symbol="A/USDT:USDT", tf="5m") -> list[Bar]:
    out = []
    for r in df.iter_rows(named=True):
        out.append(Bar(
            exchange=exchange, symbol=symbol, tf=tf, start=r["start"], end=r["end"],
            open=r["open"], high=r["high"], low=r["low"], close=r["close"], volume=r["volume"],
            notional=r["volume"] * r["vwap"], vwap=r["vwap"], trades=int(r["trades"]),
            buy_volume=(r["volume"] + r["delta"]) / 2, sell_volume=(r["volume"] - r["delta"]) / 2,
            delta=r["delta"], min_delta=min(0.0, r["delta"]), max_delta=max(0.0, r["delta"]),
            largest_trade=1.0, largest_notional=r["close"], parent_orders=1, pro_orders=0,
            amateur_orders=0, pros_gross=0.0, pros_net=0.0, amateurs_gross=0.0, amateurs_net=0.0,
            s_top=r["s_top"], s_bot=r["s_bot"], s_mood=r["s_mood"], pro_threshold=0.0,
            amateur_threshold=0.0, poc=r["close"], vah=r["high"], val=r["low"], profile_bin=0.01,
        ))
    return out


def col(df: pl.DataFrame, name: str) -> list:
    return df[name].to_list()


# ------------------------------------------------------ plain-Python reference (independent)


def ref_seeded(xs, n, alpha, first):
    """Seed = mean of xs[first:first+n] at row first+n-1, then y += alpha * (x - y)."""
    out = [None] * len(xs)
    seed = first + n - 1
    if len(xs) <= seed:
        return out
    y = sum(xs[first:seed + 1]) / n
    out[seed] = y
    for t in range(seed + 1, len(xs)):
        y = y + alpha * (xs[t] - y)
        out[t] = y
    return out


def ref_wilder(xs, n, first):
    return ref_seeded(xs, n, 1.0 / n, first)


def ref_ema(xs, n, first):
    return ref_seeded(xs, n, 2.0 / (n + 1), first)


def ref_rsi(close, n=14):
    gains = [None] + [max(close[t] - close[t - 1], 0.0) for t in range(1, len(close))]
    losses = [None] + [max(close[t - 1] - close[t], 0.0) for t in range(1, len(close))]
    ag, al = ref_wilder(gains, n, 1), ref_wilder(losses, n, 1)
    return [None if g is None else (50.0 if g + l == 0 else 100.0 * g / (g + l)) for g, l in zip(ag, al)]


def ref_tr(h, l, c):
    return [None] + [max(h[t] - l[t], abs(h[t] - c[t - 1]), abs(l[t] - c[t - 1])) for t in range(1, len(c))]


def ref_dmi(h, l, c, n=14):
    pdm, mdm = [None], [None]
    for t in range(1, len(c)):
        up, down = h[t] - h[t - 1], l[t - 1] - l[t]
        pdm.append(up if up > down and up > 0 else 0.0)
        mdm.append(down if down > up and down > 0 else 0.0)
    s_tr, s_p, s_m = ref_wilder(ref_tr(h, l, c), n, 1), ref_wilder(pdm, n, 1), ref_wilder(mdm, n, 1)
    pdi, mdi, dx = [], [], []
    for tr, p, m in zip(s_tr, s_p, s_m):
        if tr is None:
            pdi.append(None), mdi.append(None), dx.append(None)
            continue
        a = 0.0 if tr == 0 else 100.0 * p / tr
        b = 0.0 if tr == 0 else 100.0 * m / tr
        pdi.append(a), mdi.append(b)
        dx.append(0.0 if a + b == 0 else 100.0 * abs(a - b) / (a + b))
    return pdi, mdi, dx, ref_wilder(dx, n, n)


def ref_features(df: pl.DataFrame, tf_ms: int) -> dict[str, list]:
    h, l, c = col(df, "high"), col(df, "low"), col(df, "close")
    v, d, n_tr, vw = col(df, "volume"), col(df, "delta"), [float(x) for x in col(df, "trades")], col(df, "vwap")
    n = len(c)
    out: dict[str, list] = {}
    for k in (1, 3, 12):
        out[f"ret_{k}"] = [None if t < k else math.log(c[t] / c[t - k]) for t in range(n)]
    r1 = out["ret_1"]
    out["rv"] = [None if t < 20 else math.sqrt(sum(r * r for r in r1[t - 19:t + 1]) / 20 * (365 * 86_400_000 / tf_ms))
                 for t in range(n)]
    atr = ref_wilder(ref_tr(h, l, c), 14, 1)
    out["atr"] = atr
    pct = []
    for t in range(n):
        win = [a for a in atr[max(0, t - 499):t + 1] if a is not None]
        if atr[t] is None or len(win) < 50:
            pct.append(None)
            continue
        less = sum(a < atr[t] for a in win)
        eq = sum(a == atr[t] for a in win)
        pct.append((less + (eq - 1) / 2) / (len(win) - 1))
    out["atr_pct"] = pct
    out["rsi"] = ref_rsi(c)
    e12, e26 = ref_ema(c, 12, 0), ref_ema(c, 26, 0)
    macd = [None if a is None or b is None else a - b for a, b in zip(e12, e26)]
    sig = ref_ema(macd, 9, 25)
    out["ema_gap"] = [None if m is None else m / c[t] for t, m in enumerate(macd)]
    out["macd_hist"] = [None if s is None else (macd[t] - s) / c[t] for t, s in enumerate(sig)]
    bb, vz, dz = [], [], []
    for t in range(n):
        if t < 19:
            bb.append(None), vz.append(None), dz.append(None)
            continue
        w = c[t - 19:t + 1]
        mu = sum(w) / 20
        bb.append(4 * math.sqrt(sum((x - mu) ** 2 for x in w) / 20) / mu)
        for series, dest in ((v, vz), (d, dz)):
            w = series[t - 19:t + 1]
            mu = sum(w) / 20
            sd = math.sqrt(sum((x - mu) ** 2 for x in w) / 20)
            dest.append(0.0 if sd <= 1e-12 * abs(mu) else (series[t] - mu) / sd)
    out["bb_width"], out["vol_z"], out["delta_z"] = bb, vz, dz
    out["adx"] = ref_dmi(h, l, c)[3]
    cvd = np.cumsum(d)
    out["cvd_slope"] = [
        None if t < 9 else float(np.polyfit(np.arange(10), cvd[t - 9:t + 1], 1)[0]) / (sum(v[t - 9:t + 1]) / 10)
        for t in range(n)
    ]
    out["vwap_dev"] = [c[t] / vw[t] - 1 for t in range(n)]
    out["intensity"] = [None if t < 19 else n_tr[t] / (sum(n_tr[t - 19:t + 1]) / 20) for t in range(n)]
    for s in ("s_top", "s_bot", "s_mood"):
        out[s] = col(df, s)
        out[f"{s}_ema"] = ref_ema(col(df, s), 5, 0)
    return out


def assert_close(got: list, want: list, rel=1e-9, abs_=1e-9, name=""):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{name}[{i}]: expected null (not enough history), got {g}"
        else:
            assert g is not None, f"{name}[{i}]: expected {w}, got null"
            assert g == pytest.approx(w, rel=rel, abs=abs_), f"{name}[{i}]"


# ------------------------------------------------------------------------------ contract


def test_feature_names_are_fixed_and_warmup_documents_each():
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) == 22
    assert FEATURE_NAMES[:4] == ["ret_1", "ret_3", "ret_12", "rv"]
    assert set(WARMUP) == set(FEATURE_NAMES) | {"regime"}
    assert WARM_BARS == WARMUP["atr_pct"] == 64
    assert (WARMUP["rsi"], WARMUP["atr"], WARMUP["adx"], WARMUP["macd_hist"]) == (15, 15, 28, 34)


def test_output_columns_and_types():
    out = compute_features(random_frame(80), M5)
    assert out.columns == ["start", "end", "close", *FEATURE_NAMES, "regime", "warm"]
    assert all(out.schema[f] == pl.Float64 for f in FEATURE_NAMES)
    assert out.schema["regime"] == pl.String and out.schema["warm"] == pl.Boolean
    assert out.height == 80


def test_missing_input_column_is_a_clear_error():
    with pytest.raises(ValueError, match="vwap"):
        compute_features(random_frame(5).drop("vwap"), M5)


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
    assert_close(out, ref_rsi(RSI_CLOSES), name="rsi")


def test_atr_of_constant_range_bars_equals_the_range():
    close = [100.0 + 0.5 * i for i in range(40)]  # drift smaller than the range: TR = h - l
    out = compute_features(frame(close, [c + 1 for c in close], [c - 1 for c in close]), M5)
    atr = col(out, "atr")
    assert atr[:14] == [None] * 14
    assert atr[14:] == pytest.approx([2.0] * 26, abs=1e-12)


def test_atr_uses_gaps_through_the_previous_close():
    # range 2 everywhere, but every bar gaps up 5: close c_t = 100 + 5t, high = c_t + 1, low = c_t - 1
    # -> TR = max(2, |high - c_{t-1}| = 6, |low - c_{t-1}| = 4) = 6
    close = [100.0 + 5 * i for i in range(30)]
    out = compute_features(frame(close, [c + 1 for c in close], [c - 1 for c in close]), M5)
    assert col(out, "atr")[14:] == pytest.approx([6.0] * 16, abs=1e-12)


def test_adx_on_a_monotone_trend():
    # highs and lows rise by 1 each bar: +DM = 1, -DM = 0, TR = max(1, |h - c_prev| = 1.5) = 1.5
    n = 60
    d = dmi(frame([i + 0.5 for i in range(n)], [i + 1.0 for i in range(n)], [float(i) for i in range(n)]))
    pdi, mdi, adx = col(d, "plus_di"), col(d, "minus_di"), col(d, "adx")
    assert pdi[14:] == pytest.approx([100 / 1.5] * (n - 14))
    assert mdi[14:] == [0.0] * (n - 14)
    assert adx[:27] == [None] * 27  # 14 DX values, the first DX needs 15 bars
    assert adx[27:] == pytest.approx([100.0] * (n - 27))


def test_adx_rises_when_a_range_turns_into_a_trend():
    # 40 bars chopping around 100, then 60 bars rising by 0.4 per bar (range 1 everywhere)
    close = [100.0 + (0.3 if i % 2 else -0.3) for i in range(40)] + [100.0 + 0.4 * i for i in range(1, 61)]
    high, low = [c + 0.5 for c in close], [c - 0.5 for c in close]
    d = dmi(frame(close, high, low))
    pdi, mdi, adx = col(d, "plus_di"), col(d, "minus_di"), col(d, "adx")
    assert adx[39] < 20  # the range has no direction
    assert all(p > m for p, m in zip(pdi[45:], mdi[45:]))  # +DI above -DI in the up-trend
    trend = adx[45:]
    assert all(b >= a for a, b in zip(trend, trend[1:]))  # ADX keeps increasing ...
    assert trend[-1] > 60  # ... toward high values
    assert_close(adx, ref_dmi(high, low, close)[3], name="adx")
    out = compute_features(frame(close, high, low), M5)
    assert col(out, "adx") == adx  # compute_features uses the same ADX


def test_bollinger_width_of_constant_prices_is_zero_and_of_99_101_is_4pct():
    assert col(compute_features(frame([100.0] * 30), M5), "bb_width")[19:] == [0.0] * 11
    # alternating 99/101: sma 100, population std 1 -> 4 * 1 / 100
    out = compute_features(frame([99.0 if i % 2 else 101.0 for i in range(30)]), M5)
    assert col(out, "bb_width")[:19] == [None] * 19
    assert col(out, "bb_width")[19:] == pytest.approx([0.04] * 11, rel=1e-12)


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


def test_cvd_slope_of_a_constant_delta_is_delta_over_volume():
    out = compute_features(frame([100.0] * 20, volume=[8.0] * 20, delta=[2.0] * 20), M5)
    assert col(out, "cvd_slope")[:9] == [None] * 9
    assert col(out, "cvd_slope")[9:] == pytest.approx([0.25] * 11, rel=1e-12)  # cvd rises 2/bar, volume 8


def test_vwap_deviation_and_trade_intensity():
    trades = [10] * 25 + [30]
    out = compute_features(frame([101.0] * 26, vwap=[100.0] * 26, trades=trades), M5)
    assert col(out, "vwap_dev") == pytest.approx([0.01] * 26, rel=1e-12)
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
    assert col(widening, "regime")[63] == F.VOLATILE


def test_regime_labels():
    n = 80
    trend = compute_features(frame([i + 0.5 for i in range(n)], [i + 1.0 for i in range(n)], [float(i) for i in range(n)]), M5)
    assert col(trend, "regime")[:63] == [None] * 63  # unknown while adx / atr_pct are undefined
    assert col(trend, "regime")[63:] == [F.STRONG_TREND] * (n - 63)  # adx 100, atr_pct 0.5
    flat = compute_features(frame([100.0] * n), M5)
    assert col(flat, "regime")[63:] == [F.RANGING] * (n - 63)  # adx 0, atr_pct 0.5
    # every row of a random frame follows the rule
    out = compute_features(random_frame(400), M5)
    seen = set()
    for adx, pct, reg in zip(col(out, "adx"), col(out, "atr_pct"), col(out, "regime")):
        if adx is None or pct is None:
            want = None
        elif pct >= 0.8:
            want = F.VOLATILE
        elif adx >= 25:
            want = F.STRONG_TREND
        elif adx < 20:
            want = F.RANGING
        else:
            want = F.CHOPPY
        assert reg == want
        seen.add(reg)
    assert {F.VOLATILE, F.STRONG_TREND, F.RANGING, F.CHOPPY} <= seen


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
    assert col(out, "regime")[64] == F.VOLATILE


# ------------------------------------------------------------- reference, warm-up, lookahead


@pytest.mark.parametrize("n", [40, 700])
def test_every_feature_matches_the_plain_python_reference(n):
    df = random_frame(n, seed=n)
    out = compute_features(df, M5)
    ref = ref_features(df, M5)
    for name in FEATURE_NAMES:
        assert_close(col(out, name), ref[name], rel=1e-8, abs_=1e-10, name=name)


def test_warm_up_rows_are_marked_and_hold_nulls_not_values():
    out = compute_features(random_frame(120), M5)
    for name in FEATURE_NAMES:
        values = col(out, name)
        first = WARMUP[name] - 1
        assert values[:first] == [None] * first, name
        assert all(v is not None and math.isfinite(v) for v in values[first:]), name
    warm = col(out, "warm")
    assert warm == [False] * (WARM_BARS - 1) + [True] * (120 - WARM_BARS + 1)
    assert col(out, "regime")[WARM_BARS - 2] is None and col(out, "regime")[WARM_BARS - 1] is not None


def test_short_history_is_all_cold():
    out = compute_features(random_frame(10), M5)
    assert not any(col(out, "warm"))
    assert col(out, "adx") == [None] * 10 and col(out, "rsi") == [None] * 10


def test_no_lookahead_changing_later_bars_leaves_earlier_rows_unchanged():
    df = random_frame(300, seed=3)
    base = compute_features(df, M5)
    rng = np.random.default_rng(99)
    for i in (0, 20, 63, 150, 298):
        changed = df.with_columns(
            pl.when(pl.int_range(pl.len()) > i).then(pl.col(c) * pl.lit(rng.uniform(0.5, 2.0))).otherwise(pl.col(c))
            for c in ("open", "high", "low", "close", "volume", "vwap", "delta", "s_top", "s_bot", "s_mood")
        ).with_columns(pl.when(pl.int_range(pl.len()) > i).then(pl.col("trades") * 7).otherwise(pl.col("trades")))
        again = compute_features(changed, M5)
        assert again.head(i + 1).equals(base.head(i + 1)), f"rows <= {i} changed"
        assert not again.equals(base)  # the change is real


# ------------------------------------------------------------------------------ streaming


def test_streaming_equals_batch_over_the_same_window():
    df = random_frame(180, seed=11)
    bars = bars_of(df)
    h = 70
    state = FeatureState(h=h)
    for i, bar in enumerate(bars):
        row = update(state, bar)
        assert len(state) == min(i + 1, h)
        batch = compute_features(df.slice(max(0, i - h + 1), min(i + 1, h)), M5).row(-1, named=True)
        assert (row.start, row.end, row.close, row.tf) == (bar.start, bar.end, bar.close, "5m")
        assert row.values == {f: batch[f] for f in FEATURE_NAMES}, f"bar {i}"
        assert row.warm == batch["warm"]
        assert row.regime == (batch["regime"] or F.REGIME_UNKNOWN)
    # with a window that holds everything, streaming equals compute_features over the whole frame
    full = compute_features(df, M5)
    state = FeatureState(h=600)
    rows = [update(state, b) for b in bars]
    assert [r.values["atr"] for r in rows] == col(full, "atr")
    assert [r.values["adx"] for r in rows] == col(full, "adx")
    assert [r.warm for r in rows] == col(full, "warm")


def test_bounded_history_only_differs_by_where_smoothing_starts():
    df = random_frame(260, seed=5)
    state = FeatureState(h=200)
    for bar in bars_of(df):
        row = update(state, bar)
    full = compute_features(df, M5).row(-1, named=True)
    # Wilder smoothing seeded 60 bars later: the seed's weight left is (13/14)^186 ~ 1e-6
    assert row.values["rsi"] != full["rsi"]
    assert row.values["rsi"] == pytest.approx(full["rsi"], rel=1e-5)
    assert row.values["ret_12"] == full["ret_12"]


def test_streaming_state_is_plain_and_ignores_stale_bars():
    bars = bars_of(random_frame(30))
    state = FeatureState(h=600)
    for b in bars[:20]:
        update(state, b)
    assert update(state, bars[19]) is None  # duplicate
    assert update(state, bars[5]) is None  # out of order
    assert len(state) == 20
    restored = pickle.loads(pickle.dumps(state))
    copied = copy.deepcopy(state)
    a, b, c = update(state, bars[20]), update(restored, bars[20]), update(copied, bars[20])
    assert a == b == c and a.values["rsi"] is not None


def test_feature_row_regime_is_unknown_while_cold():
    row = update(FeatureState(), bars_of(random_frame(1))[0])
    assert row.warm is False and row.regime == F.REGIME_UNKNOWN
    assert row.values["ret_1"] is None and row.values["vwap_dev"] is not None


# ------------------------------------------------- multi-timeframe alignment (acceptance)


def frow(tf: str, end: int, marker: float = 1.0, warm: bool = True) -> FeatureRow:
    """A FeatureRow whose every value is ``marker`` (so a test can see which row was used)."""
    return FeatureRow(exchange="x", symbol="A/USDT:USDT", tf=tf, start=end - TFS[tf], end=end,
                      close=100.0, warm=warm, regime=F.RANGING, values={f: marker for f in FEATURE_NAMES})


def test_acceptance_overlay_ending_after_the_primary_end_is_never_used():
    primary = frow("5m", T0 + 2 * H1 + 10 * 60_000, marker=0.0)  # 5m bar 02:05-02:10
    open_15m = frow("15m", T0 + 2 * H1 + 15 * 60_000, marker=9.0)  # 02:00-02:15: still open at 02:10
    open_1h = frow("1h", T0 + 3 * H1, marker=9.0)  # 02:00-03:00: still open
    row = align(primary, {"15m": open_15m, "1h": open_1h}, primary.end, TFS)
    assert row.overlay_ok == {"15m": False, "1h": False}
    assert all(row.features[f"15m_{f}"] is None for f in FEATURE_NAMES)
    assert all(row.features[f"1h_{f}"] is None for f in FEATURE_NAMES)
    # even one millisecond after the primary end is too late
    assert not F.overlay_usable(primary.end, frow("15m", primary.end + 1), M15)
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
    assert list(row.features) == F.aligned_feature_names(["15m", "1h"])
    assert row.features["rsi"] == 3.0 and row.features["15m_rsi"] == 1.5 and row.features["1h_ema_gap"] == 2.5
    assert (row.start, row.end, row.tf, row.regime, row.warm) == (primary.start, primary.end, "5m", F.RANGING, True)
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
            assert got == (want.values if want else {f: None for f in FEATURE_NAMES})
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
