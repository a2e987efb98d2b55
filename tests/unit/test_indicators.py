"""Incremental indicators vs TA-Lib (the reference implementation the field trusts): on long random
bar series, every value after the warm-up within 1e-9 relative, and the first value at TA-Lib's
lookback index (the same warm-up). Plus: O(1) state that pickles and deep-copies mid-stream."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import talib

from operators.indicators import (
    ADOSC, ATR, CCI, CMF, CVI, DMI, EMA, HMA, KC, MACD, MFI, RSI, SAR, SMA, TRIX, TSI, VWMA, WMA,
    AroonOsc, Correl, Fractal, StdDev, Stoch, Supertrend, TrueRange, Vortex, Wilder,
)

N = 3000


def bar_series(seed: int, tick: float | None = None) -> dict[str, np.ndarray]:
    """A random walk of OHLCV bars; with ``tick`` prices are rounded to it, so equal highs, lows
    and closes (ties, zero moves) occur as they do on real tapes."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, N)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.001, N))
    high = np.maximum(open_, close) * (1 + rng.exponential(0.002, N))
    low = np.minimum(open_, close) * (1 - rng.exponential(0.002, N))
    if tick:
        close, high, low = (np.round(x / tick) * tick for x in (close, high, low))
        high, low = np.maximum(high, close), np.minimum(low, close)
    volume = rng.lognormal(2, 0.8, N)
    return {"h": high, "l": low, "c": close, "v": volume}


SERIES = {"smooth": bar_series(1), "ticked": bar_series(2, tick=0.05)}


def run(make, feed, s: dict) -> list:
    ind = make()
    return [feed(ind, s["h"][i], s["l"][i], s["c"][i], s["v"][i]) for i in range(N)]


def assert_parity(got: list, want: np.ndarray, name: str) -> None:
    """Same warm-up (None exactly where TA-Lib gives NaN) and |got - want| <= 1e-9 * max(|want|,
    s), where s is the series' mean |value| (oscillators cross zero, where any rounding is
    'relatively' infinite)."""
    want = np.asarray(want, dtype=float)
    first_ta = int(np.argmax(~np.isnan(want)))
    nulls = [i for i, g in enumerate(got) if g is None]
    assert nulls == list(range(first_ta)), f"{name}: warm-up differs (TA-Lib's first value at {first_ta})"
    g = np.array(got[first_ta:], dtype=float)
    w = want[first_ta:]
    assert not np.isnan(w).any() and np.isfinite(g).all(), name
    scale = np.maximum(np.abs(w), np.abs(w).mean())
    err = np.abs(g - w) / scale
    assert err.max() <= 1e-9, f"{name}: max relative error {err.max():.2e} at bar {first_ta + int(err.argmax())}"


# name -> (make, feed(ind, h, l, c, v) -> value, TA-Lib(h, l, c, v) -> array)
CASES = {
    "SMA": (lambda: SMA(20), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.SMA(c, 20)),
    "EMA": (lambda: EMA(26), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.EMA(c, 26)),
    "RMA": (lambda: Wilder(14), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.RMA(c, 14)),
    "WMA": (lambda: WMA(20), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.WMA(c, 20)),
    "HMA": (lambda: HMA(20), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.HMA(c, 20)),
    "VWMA": (lambda: VWMA(20), lambda i, h, l, c, v: i.update(c, v), lambda h, l, c, v: talib.VWMA(c, v, 20)),
    "STDDEV": (lambda: StdDev(20), lambda i, h, l, c, v: (r := i.update(c)) and r[1],
               lambda h, l, c, v: talib.STDDEV(c, 20, 1.0)),
    "TRANGE": (lambda: TrueRange(), lambda i, h, l, c, v: i.update(h, l, c), lambda h, l, c, v: talib.TRANGE(h, l, c)),
    "ATR": (lambda: ATR(14), lambda i, h, l, c, v: i.update(h, l, c), lambda h, l, c, v: talib.ATR(h, l, c, 14)),
    "RSI": (lambda: RSI(14), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.RSI(c, 14)),
    "PLUS_DI": (lambda: DMI(14), lambda i, h, l, c, v: i.update(h, l, c)[0], lambda h, l, c, v: talib.PLUS_DI(h, l, c, 14)),
    "MINUS_DI": (lambda: DMI(14), lambda i, h, l, c, v: i.update(h, l, c)[1], lambda h, l, c, v: talib.MINUS_DI(h, l, c, 14)),
    "ADX": (lambda: DMI(14), lambda i, h, l, c, v: i.update(h, l, c)[2], lambda h, l, c, v: talib.ADX(h, l, c, 14)),
    "KC.upper": (lambda: KC(20, 10, 2.0), lambda i, h, l, c, v: (r := i.update(h, l, c)) and r[0],
                 lambda h, l, c, v: talib.KC(h, l, c, 20, 10, 2.0)[0]),
    "KC.middle": (lambda: KC(20, 10, 2.0), lambda i, h, l, c, v: (r := i.update(h, l, c)) and r[1],
                  lambda h, l, c, v: talib.KC(h, l, c, 20, 10, 2.0)[1]),
    "KC.lower": (lambda: KC(20, 10, 2.0), lambda i, h, l, c, v: (r := i.update(h, l, c)) and r[2],
                 lambda h, l, c, v: talib.KC(h, l, c, 20, 10, 2.0)[2]),
    "SAR": (lambda: SAR(0.02, 0.2), lambda i, h, l, c, v: i.update(h, l), lambda h, l, c, v: talib.SAR(h, l, 0.02, 0.2)),
    "SUPERTREND": (lambda: Supertrend(10, 3.0), lambda i, h, l, c, v: i.update(h, l, c)[0],
                   lambda h, l, c, v: talib.SUPERTREND(h, l, c, 10, 3.0)[0]),
    "SUPERTREND.trend": (lambda: Supertrend(10, 3.0), lambda i, h, l, c, v: i.update(h, l, c)[1],
                         lambda h, l, c, v: np.where(np.arange(N) < 10, np.nan, talib.SUPERTREND(h, l, c, 10, 3.0)[1])),
    "MACD": (lambda: MACD(12, 26, 9), lambda i, h, l, c, v: i.update(c)[0], lambda h, l, c, v: talib.MACD(c, 12, 26, 9)[0]),
    "MACD.signal": (lambda: MACD(12, 26, 9), lambda i, h, l, c, v: i.update(c)[1],
                    lambda h, l, c, v: talib.MACD(c, 12, 26, 9)[1]),
    "MACD.hist": (lambda: MACD(12, 26, 9), lambda i, h, l, c, v: i.update(c)[2], lambda h, l, c, v: talib.MACD(c, 12, 26, 9)[2]),
    "TRIX": (lambda: TRIX(15), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.TRIX(c, 15)),
    "STOCH.k": (lambda: Stoch(14, 3, 3), lambda i, h, l, c, v: i.update(h, l, c)[0],
                lambda h, l, c, v: talib.STOCH(h, l, c, 14, 3, 0, 3, 0)[0]),
    "STOCH.d": (lambda: Stoch(14, 3, 3), lambda i, h, l, c, v: i.update(h, l, c)[1],
                lambda h, l, c, v: talib.STOCH(h, l, c, 14, 3, 0, 3, 0)[1]),
    "CCI": (lambda: CCI(20), lambda i, h, l, c, v: i.update(h, l, c), lambda h, l, c, v: talib.CCI(h, l, c, 20)),
    "MFI": (lambda: MFI(14), lambda i, h, l, c, v: i.update(h, l, c, v), lambda h, l, c, v: talib.MFI(h, l, c, v, 14)),
    "TSI": (lambda: TSI(25, 13), lambda i, h, l, c, v: i.update(c), lambda h, l, c, v: talib.TSI(c, 25, 13)),
    "VORTEX.plus": (lambda: Vortex(14), lambda i, h, l, c, v: i.update(h, l, c)[0], lambda h, l, c, v: talib.VORTEX(h, l, c, 14)[0]),
    "VORTEX.minus": (lambda: Vortex(14), lambda i, h, l, c, v: i.update(h, l, c)[1], lambda h, l, c, v: talib.VORTEX(h, l, c, 14)[1]),
    "AROONOSC": (lambda: AroonOsc(14), lambda i, h, l, c, v: i.update(h, l), lambda h, l, c, v: talib.AROONOSC(h, l, 14)),
    "CORREL": (lambda: Correl(20), lambda i, h, l, c, v: i.update(c, v), lambda h, l, c, v: talib.CORREL(c, v, 20)),
    "ADOSC": (lambda: ADOSC(3, 10), lambda i, h, l, c, v: i.update(h, l, c, v), lambda h, l, c, v: talib.ADOSC(h, l, c, v, 3, 10)),
    "CMF": (lambda: CMF(20), lambda i, h, l, c, v: i.update(h, l, c, v), lambda h, l, c, v: talib.CMF(h, l, c, v, 20)),
    "CVI": (lambda: CVI(10, 10), lambda i, h, l, c, v: i.update(h, l), lambda h, l, c, v: talib.CVI(h, l, 10, 10)),
}


@pytest.mark.parametrize("series", list(SERIES))
@pytest.mark.parametrize("name", list(CASES))
def test_indicator_matches_talib(name, series):
    make, feed, ref = CASES[name]
    s = SERIES[series]
    assert_parity(run(make, feed, s), ref(s["h"], s["l"], s["c"], s["v"]), f"{name}/{series}")


@pytest.mark.parametrize("series", list(SERIES))
def test_fractal_swings_match_talib_and_are_reported_when_confirmed(series):
    s = SERIES[series]
    got = run(Fractal, lambda i, h, l, c, v: i.update(h, l), s)
    want_hi, want_lo = talib.FRACTAL(s["h"], s["l"], 2, 2)
    assert got[:4] == [None] * 4 and all(g is not None for g in got[4:])
    assert [g[0] is not None for g in got[4:]] == list(want_hi[4:] == 100)
    assert [g[1] is not None for g in got[4:]] == list(want_lo[4:] == 100)
    for t, g in enumerate(got[4:], start=4):  # the level is the high / low two bars back
        assert g[0] in (None, s["h"][t - 2]) and g[1] in (None, s["l"][t - 2])
    assert 50 < sum(g[0] is not None for g in got[4:]) < N // 2


def test_state_pickles_and_deep_copies_mid_stream_and_continues_identically():
    s = SERIES["ticked"]
    for name, (make, feed, _) in CASES.items():
        a = make()
        for i in range(500):
            feed(a, s["h"][i], s["l"][i], s["c"][i], s["v"][i])
        b, c = pickle.loads(pickle.dumps(a)), copy.deepcopy(a)
        for i in range(500, 700):
            args = (s["h"][i], s["l"][i], s["c"][i], s["v"][i])
            assert feed(a, *args) == feed(b, *args) == feed(c, *args), name


def test_state_size_does_not_grow_with_history():
    s = SERIES["smooth"]
    for name, (make, feed, _) in CASES.items():
        ind = make()
        sizes = []
        for i in range(N):
            feed(ind, s["h"][i], s["l"][i], s["c"][i], s["v"][i])
            if i in (400, N - 1):
                sizes.append(len(pickle.dumps(ind)))
        assert sizes[0] == sizes[1], f"{name}: state grew from {sizes[0]} to {sizes[1]} bytes"


def test_degenerate_windows_give_the_documented_neutral_values():
    flat = [100.0] * 40
    rsi, st, cci, mfi, tsi, vx = RSI(14), Stoch(14, 3, 3), CCI(20), MFI(14), TSI(25, 13), Vortex(14)
    for x in flat:
        r, (k, d), cc = rsi.update(x), st.update(x, x, x), cci.update(x, x, x)
        m, t, (vp, vm) = mfi.update(x, x, x, 1.0), tsi.update(x), vx.update(x, x, x)
    assert (r, k, d, cc, m, t, vp, vm) == (50.0, 50.0, 50.0, 0.0, 50.0, 0.0, 1.0, 1.0)
    # a flat tape has no range: DI 0, ADX stays undefined-free (0), SAR follows the bars
    dmi = DMI(14)
    outs = [dmi.update(x, x, x) for x in flat]
    assert outs[13] == (None, None, None) and outs[14][:2] == (0.0, 0.0) and outs[27] == (0.0, 0.0, 0.0)
