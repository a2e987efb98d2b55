"""``FeatureState``: the incremental state of every feature of one instrument and timeframe, turning
one closed bar into its feature values in O(1). Pure logic, no bytewax.

Every indicator it holds comes from ``operators.indicators`` (each checked against TA-Lib); a
fixed set of recursions and short windows, never a pass over the history. The features, their
warm-ups and formulas are listed in ``operators.feature_catalog``.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from itertools import accumulate
from operator import mul
from typing import Optional

from operators.feature_catalog import ATR_N, ATR_PCT_MIN, COHORT_SPAN, FEATURE_NAMES
from operators.indicators import (
    ADOSC, ATR, CCI, CMF, CVI, DMI, EMA, HMA, KC, MACD, MFI, RSI, SAR, SMA, TRIX, TSI, VWMA, WMA, AroonOsc,
    Correl, Fractal, MaxMin, StdDev, Stoch, Supertrend, Vortex,
)
from operators.perp import PerpFeatures
from operators.records import YEAR_MS

ATR_PCT_WINDOW = 500
IMBALANCE = 0.5  # |delta| / volume >= 0.5  <=>  one side traded >= 3x the other
FVG_KEEP = 50  # bars an unfilled fair-value gap stays counted
ICHI_TENKAN, ICHI_KIJUN, ICHI_SPAN_B, ICHI_SHIFT = 9, 26, 52, 26
LN2x4 = 4.0 * math.log(2.0)


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


class FeatureState:
    """Per instrument and timeframe: the incremental state of every feature (plain objects and
    short deques: pickles and deep-copies for bytewax snapshots, the same size at bar 100 as at bar
    1,000,000). ``step`` turns the next closed bar into its feature values."""

    def __init__(self) -> None:
        self.count = 0
        self.last_start: Optional[int] = None
        self.closes: deque = deque(maxlen=13)
        self.r2: deque = deque(maxlen=20)  # ret_1 squared
        self.atr = ATR(ATR_N)
        self.atr_hist: deque = deque(maxlen=ATR_PCT_WINDOW)
        self.atr_sorted: list = []
        self.rsi = RSI(14)
        self.ema12, self.ema26 = EMA(12), EMA(26)
        self.macd = MACD(12, 26, 9)
        self.bb = StdDev(20)
        self.dmi = DMI(14)
        self.vol_sd, self.delta_sd = StdDev(20), StdDev(20)
        self.deltas: deque = deque(maxlen=CVD_N)
        self.vols10: deque = deque(maxlen=CVD_N)
        self.trades: deque = deque(maxlen=20)
        self.cohort = (EMA(COHORT_SPAN), EMA(COHORT_SPAN), EMA(COHORT_SPAN))
        self.sma20, self.sma50 = SMA(20), SMA(50)
        self.ema20, self.ema50 = EMA(20), EMA(50)
        self.wma20, self.hma20, self.vwma20 = WMA(20), HMA(20), VWMA(20)
        self.sar = SAR(0.02, 0.2)
        self.supertrend = Supertrend(10, 3.0)
        self.trix = TRIX(15)
        self.vortex = Vortex(14)
        self.tenkan, self.kijun, self.span_b = MaxMin(ICHI_TENKAN), MaxMin(ICHI_KIJUN), MaxMin(ICHI_SPAN_B)
        self.spans: deque = deque(maxlen=ICHI_SHIFT + 1)  # (span A, span B) as computed, newest last
        self.aroon = AroonOsc(14)
        self.stoch = Stoch(14, 3, 3)
        self.cci = CCI(20)
        self.willr = MaxMin(14)
        self.tsi = TSI(25, 13)
        self.kc = KC(20, 10, 2.0)
        self.donchian = MaxMin(20)
        self.hl2: deque = deque(maxlen=20)  # ln(h / l)^2
        self.cvi = CVI(10, 10)
        self.obv: deque = deque(maxlen=20)  # signed volume from bar 1 on
        self.obv_v: deque = deque(maxlen=20)
        self.mfi = MFI(14)
        self.cmf = CMF(20)
        self.adosc, self.vol10 = ADOSC(3, 10), SMA(10)
        self.efi, self.efi_v = EMA(13), EMA(13)
        self.vwap20 = VWMA(20)
        self.corr = Correl(20)
        self.cvd_close: deque = deque(maxlen=20)
        self.cvd_delta: deque = deque(maxlen=20)
        self.imb = 0
        self.hl3: deque = deque(maxlen=3)  # (h, l) of the last 3 bars
        self.gaps: deque = deque()  # open fair-value gaps: (bar index, +1 / -1, fill level)
        self.fractal = Fractal()
        self.swing_high: Optional[float] = None  # last confirmed, not yet broken
        self.swing_low: Optional[float] = None
        self.structure = 0
        self.perp = PerpFeatures()

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
        perp = self.__dict__.get("perp") or self.__dict__.setdefault("perp", PerpFeatures())  # older snapshots
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
