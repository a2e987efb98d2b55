"""Incremental technical indicators, O(1) per bar in the length of the history (a few fixed-size
windows at most), with plain picklable state. Pure logic, no bytewax.

Why hand-written (measured, issue 13): FeatureStage lives in bytewax state, which is deep-copied
at every epoch close and pickled into recovery snapshots. TA-Lib's streaming handles
(``talib.stream``, O(1) and exact) cannot be pickled ("a stream handle points into the TA-Lib C
library"). talipp keeps every past input and output in lists (its pickle grows without bound:
0.1-1 MB per indicator after 3,000 bars), costs 2-20 us per update, and 5 of 13 indicators checked
differ from TA-Lib (ATR, ADX and SAR seeding by 1-3%, MACD's signal by up to 21%, TRIX by a factor
of 100). So each class below follows the TA-Lib C function of the same name, and
``tests/unit/test_indicators.py`` checks every one against TA-Lib on long random bar series:
<= 1e-9 relative, and the same warm-up (the first value at TA-Lib's lookback index).

Conventions: ``update(...)`` takes one closed bar's inputs and returns the value at that bar, or
None while warming up (never a made-up value). Where a window is degenerate (no range, no
movement, no volume) TA-Lib answers 0; the oscillators here answer their neutral value instead
(RSI, Stochastic, MFI 50; Vortex 1 and 1), as each docstring says. On any other data they agree.
"""

from __future__ import annotations

import math
from collections import deque
from operator import mul
from typing import Optional


# TA-Lib's scale-aware tie (TA_IS_ZERO_SCALED): a difference of two prices within 1e-14 of their
# magnitude is rounding, not a move.
TIE = 1e-14


def _ema_k(n: int) -> float:
    return 2.0 / (n + 1)


class SMA:
    """Simple mean of the last n inputs (TA-Lib SMA; first value after n inputs)."""

    __slots__ = ("n", "win")

    def __init__(self, n: int):
        self.n = n
        self.win: deque = deque(maxlen=n)

    def update(self, x: float) -> Optional[float]:
        w = self.win
        w.append(x)
        return sum(w) / self.n if len(w) == self.n else None


class EMA:
    """Exponential moving average, TA-Lib's EMA: seeded with the mean of the first ``seed``
    inputs (default n), then y = (x - y) * k + y with k = 2 / (n + 1). ``seed=1`` starts from the
    first input, as TA-Lib's ADOSC does."""

    __slots__ = ("k", "seed", "count", "acc", "value")

    def __init__(self, n: int, seed: Optional[int] = None):
        self.k = _ema_k(n)
        self.seed = n if seed is None else seed
        self.count = 0
        self.acc = 0.0
        self.value: Optional[float] = None

    def update(self, x: float) -> Optional[float]:
        v = self.value
        if v is not None:
            v = (x - v) * self.k + v
            self.value = v
            return v
        self.count += 1
        self.acc += x
        if self.count == self.seed:
            self.value = self.acc / self.seed
        return self.value


class Wilder:
    """Wilder's smoothing (TA-Lib RMA, and the averaging inside RSI and ATR): seeded with the mean
    of the first n inputs, then y = (y * (n - 1) + x) / n."""

    __slots__ = ("n", "count", "acc", "value")

    def __init__(self, n: int):
        self.n = n
        self.count = 0
        self.acc = 0.0
        self.value: Optional[float] = None

    def update(self, x: float) -> Optional[float]:
        v = self.value
        if v is not None:
            v = (v * (self.n - 1) + x) / self.n
            self.value = v
            return v
        self.count += 1
        self.acc += x
        if self.count == self.n:
            self.value = self.acc / self.n
        return self.value


class WMA:
    """Linearly weighted mean of the last n inputs, weights 1..n (newest heaviest) (TA-Lib WMA)."""

    __slots__ = ("n", "win", "weights", "den")

    def __init__(self, n: int):
        self.n = n
        self.win: deque = deque(maxlen=n)
        self.weights = tuple(float(i) for i in range(1, n + 1))
        self.den = n * (n + 1) / 2.0

    def update(self, x: float) -> Optional[float]:
        w = self.win
        w.append(x)
        if len(w) < self.n:
            return None
        return sum(map(mul, self.weights, w)) / self.den


class HMA:
    """Hull moving average (TA-Lib HMA): WMA_m(2 * WMA_{n/2}(x) - WMA_n(x)), n/2 rounded down,
    m = floor(sqrt(n)); first value after n - 1 + m inputs."""

    __slots__ = ("half", "full", "outer")

    def __init__(self, n: int):
        self.half = WMA(n // 2)
        self.full = WMA(n)
        self.outer = WMA(int(math.isqrt(n)))

    def update(self, x: float) -> Optional[float]:
        a = self.half.update(x)
        b = self.full.update(x)
        return None if b is None else self.outer.update(2.0 * a - b)


class VWMA:
    """Volume-weighted mean of the last n prices: sum(p * v) / sum(v) (TA-Lib VWMA); the plain
    mean when the window has no volume."""

    __slots__ = ("n", "p", "v")

    def __init__(self, n: int):
        self.n = n
        self.p: deque = deque(maxlen=n)
        self.v: deque = deque(maxlen=n)

    def update(self, price: float, volume: float) -> Optional[float]:
        self.p.append(price)
        self.v.append(volume)
        if len(self.v) < self.n:
            return None
        sv = sum(self.v)
        if sv == 0:
            return sum(self.p) / self.n
        return sum(map(mul, self.p, self.v)) / sv


class StdDev:
    """Population standard deviation of the last n inputs (TA-Lib STDDEV with nbdev 1), computed
    in two passes over the window (TA-Lib's running sums agree to ~1e-12 on real prices)."""

    __slots__ = ("n", "win")

    def __init__(self, n: int):
        self.n = n
        self.win: deque = deque(maxlen=n)

    def update(self, x: float) -> Optional[tuple[float, float]]:
        """(mean, std) of the window, or None while it is not full."""
        w = self.win
        w.append(x)
        if len(w) < self.n:
            return None
        m = sum(w) / self.n
        d = [y - m for y in w]
        return m, math.sqrt(sum(map(mul, d, d)) / self.n)


class TrueRange:
    """max(high - low, |high - previous close|, |low - previous close|), from the second bar on
    (TA-Lib TRANGE)."""

    __slots__ = ("prev_close",)

    def __init__(self):
        self.prev_close: Optional[float] = None

    def update(self, high: float, low: float, close: float) -> Optional[float]:
        pc = self.prev_close
        self.prev_close = close
        if pc is None:
            return None
        return max(high - low, abs(pc - high), abs(pc - low))


class ATR:
    """Average true range (TA-Lib ATR): Wilder smoothing of the true range, seeded with the mean
    of the n true ranges ending at bar ``start`` (default n: bars 1..n), the first value. A later
    ``start`` is how TA-Lib's KC seeds its ATR (at the middle band's first bar)."""

    __slots__ = ("n", "start", "tr", "trs", "count", "value", "last_tr")

    def __init__(self, n: int, start: Optional[int] = None):
        self.n = n
        self.start = n if start is None else max(n, start)
        self.tr = TrueRange()
        self.trs: deque = deque(maxlen=n)  # the true ranges before the seed
        self.count = 0
        self.value: Optional[float] = None
        self.last_tr: Optional[float] = None

    def update(self, high: float, low: float, close: float) -> Optional[float]:
        tr = self.tr.update(high, low, close)
        self.last_tr = tr
        i = self.count
        self.count = i + 1
        v = self.value
        if v is not None:
            v = (v * (self.n - 1) + tr) / self.n
            self.value = v
            return v
        if tr is not None:
            self.trs.append(tr)
        if i == self.start:
            self.value = sum(self.trs) / self.n
            self.trs.clear()
        return self.value


class KC:
    """Keltner channel as TA-Lib KC(n, atr_n, k) computes it: middle = EMA_n of the typical price
    (h + l + c) / 3, bands middle +- k * ATR(atr_n), where the ATR is seeded at the first middle
    bar (n - 1) with the mean of the atr_n true ranges ending there. Returns (upper, middle,
    lower) from bar max(n - 1, atr_n) on."""

    __slots__ = ("k", "mid", "atr")

    def __init__(self, n: int = 20, atr_n: int = 10, k: float = 2.0):
        self.k = k
        self.mid = EMA(n)
        self.atr = ATR(atr_n, start=n - 1)

    def update(self, high: float, low: float, close: float) -> Optional[tuple[float, float, float]]:
        mid = self.mid.update((high + low + close) / 3.0)
        atr = self.atr.update(high, low, close)
        if mid is None or atr is None:
            return None
        band = atr * self.k
        return mid + band, mid, mid - band


class RSI:
    """Relative strength index (TA-Lib RSI): Wilder averages of gains and losses seeded with the
    mean of the first n changes; 100 * gain / (gain + loss), 50 when nothing moved."""

    __slots__ = ("prev", "gain", "loss")

    def __init__(self, n: int):
        self.prev: Optional[float] = None
        self.gain = Wilder(n)
        self.loss = Wilder(n)

    def update(self, x: float) -> Optional[float]:
        p = self.prev
        self.prev = x
        if p is None:
            return None
        d = x - p
        g = self.gain.update(d if d > 0 else 0.0)
        lo = self.loss.update(-d if d < 0 else 0.0)
        if g is None:
            return None
        s = g + lo
        return 50.0 if s == 0 else 100.0 * g / s


class DMI:
    """Wilder's directional movement (TA-Lib PLUS_DI, MINUS_DI, ADX). +DM = up move if it is
    positive and larger than the down move, else 0 (and symmetrically -DM). The DMs and the true
    range are smoothed as running SUMS, seeded with the sum of the first n - 1 values, then
    s = s - s / n + x, so DI = 100 * s(DM) / s(TR) is first defined at bar n. DX = 100 * |+DI - -DI|
    / (+DI + -DI); ADX is the mean of the first n DX (bars n..2n-1), then Wilder-smoothed.
    A bar with no range in the sums (s(TR) = 0) gives DI = 0 and no DX: it adds 0 to the seed and
    leaves the ADX where it was (as TA-Lib, with an exact zero test)."""

    __slots__ = ("n", "prev_high", "prev_low", "prev_close", "count", "s_pdm", "s_mdm", "s_tr",
                 "dx_sum", "adx")

    def __init__(self, n: int):
        self.n = n
        self.prev_high = self.prev_low = self.prev_close = None
        self.count = 0  # bars seen
        self.s_pdm = self.s_mdm = self.s_tr = 0.0
        self.dx_sum = 0.0
        self.adx: Optional[float] = None

    def update(self, high: float, low: float, close: float) -> tuple[Optional[float], Optional[float], Optional[float]]:
        """(+DI, -DI, ADX) at this bar."""
        n = self.n
        ph, pl_, pc = self.prev_high, self.prev_low, self.prev_close
        self.prev_high, self.prev_low, self.prev_close = high, low, close
        i = self.count
        self.count = i + 1
        if i == 0:
            return None, None, None
        up, down = high - ph, pl_ - low
        pdm = up if (up > 0 and up > down) else 0.0
        mdm = down if (down > 0 and down > up) else 0.0
        tr = max(high - low, abs(pc - high), abs(pc - low))
        if i < n:  # bars 1..n-1: plain sums
            self.s_pdm += pdm
            self.s_mdm += mdm
            self.s_tr += tr
            return None, None, None
        self.s_pdm = self.s_pdm - self.s_pdm / n + pdm
        self.s_mdm = self.s_mdm - self.s_mdm / n + mdm
        self.s_tr = self.s_tr - self.s_tr / n + tr
        dx = None
        if self.s_tr != 0:
            pdi = 100.0 * (self.s_pdm / self.s_tr)
            mdi = 100.0 * (self.s_mdm / self.s_tr)
            s = pdi + mdi
            if s != 0:
                dx = 100.0 * (abs(mdi - pdi) / s)
        else:
            pdi = mdi = 0.0
        if i < 2 * n - 1:  # bars n..2n-2: collect DX for the seed
            self.dx_sum += dx or 0.0
        elif i == 2 * n - 1:
            self.adx = (self.dx_sum + (dx or 0.0)) / n
        elif dx is not None:
            self.adx = (self.adx * (n - 1) + dx) / n
        return pdi, mdi, self.adx


class SAR:
    """Parabolic SAR (TA-Lib SAR, acceleration ``af``, maximum ``af_max``). The first value is at
    bar 1: the trend starts short if bar 1 has a positive -DM (its low fell more than its high
    rose), else long, with the SAR at bar 0's low (long) or high (short) and the extreme point at
    bar 1's high (long) or low (short). Every bar: if the bar pierces the SAR, the trend flips and
    the SAR jumps to the extreme point; the SAR never enters the previous or current bar's range."""

    __slots__ = ("af0", "af_max", "af", "long", "sar", "ep", "prev_high", "prev_low", "count")

    def __init__(self, af: float = 0.02, af_max: float = 0.2):
        self.af0, self.af_max = af, af_max
        self.af = af
        self.long = True
        self.sar = self.ep = 0.0
        self.prev_high = self.prev_low = 0.0
        self.count = 0

    def update(self, high: float, low: float) -> Optional[float]:
        i = self.count
        self.count = i + 1
        if i == 0:
            self.prev_high, self.prev_low = high, low
            return None
        if i == 1:
            up, down = high - self.prev_high, self.prev_low - low
            self.long = not (down > 0 and up < down)  # TA-Lib: MINUS_DM(1) > 0 -> short
            if self.long:
                self.ep, self.sar = high, self.prev_low
            else:
                self.ep, self.sar = low, self.prev_high
            self.prev_high, self.prev_low = high, low  # "new" = bar 1: prev = new on the first step
        ph, pl_ = self.prev_high, self.prev_low
        self.prev_high, self.prev_low = high, low
        af, sar, ep = self.af, self.sar, self.ep
        if self.long:
            if low <= sar:  # flip to short
                self.long = False
                sar = ep
                sar = max(sar, ph, high)
                out = sar
                af, ep = self.af0, low
                sar = sar + af * (ep - sar)
                sar = max(sar, ph, high)
            else:
                out = sar
                if high > ep:
                    ep = high
                    af = min(af + self.af0, self.af_max)
                sar = sar + af * (ep - sar)
                sar = min(sar, pl_, low)
        else:
            if high >= sar:  # flip to long
                self.long = True
                sar = ep
                sar = min(sar, pl_, low)
                out = sar
                af, ep = self.af0, high
                sar = sar + af * (ep - sar)
                sar = min(sar, pl_, low)
            else:
                out = sar
                if low < ep:
                    ep = low
                    af = min(af + self.af0, self.af_max)
                sar = sar + af * (ep - sar)
                sar = max(sar, ph, high)
        self.af, self.sar, self.ep = af, sar, ep
        return out


class Supertrend:
    """SuperTrend (TA-Lib SUPERTREND, ATR(n), multiplier m): bands (high + low) / 2 +- m * ATR;
    the upper band only moves down (the lower only up) unless the previous close crossed it; the
    trend flips when the close crosses the band of the other side. Returns (line, +1 up / -1
    down), first at bar n; the first trend is up."""

    __slots__ = ("m", "atr", "upper", "lower", "up", "prev_close")

    def __init__(self, n: int = 10, m: float = 3.0):
        self.m = m
        self.atr = ATR(n)
        self.upper = self.lower = 0.0
        self.up: Optional[bool] = None
        self.prev_close = 0.0

    def update(self, high: float, low: float, close: float) -> tuple[Optional[float], Optional[int]]:
        atr = self.atr.update(high, low, close)
        if atr is None:
            return None, None
        mid = (high + low) / 2.0
        band = self.m * atr
        bu, bl = mid + band, mid - band
        if self.up is None:
            self.upper, self.lower, self.up = bu, bl, True
        else:
            if bu < self.upper or self.prev_close > self.upper:
                self.upper = bu
            if bl > self.lower or self.prev_close < self.lower:
                self.lower = bl
            if self.up:
                if close < self.lower:
                    self.up = False
            elif close > self.upper:
                self.up = True
        self.prev_close = close
        return (self.lower, 1) if self.up else (self.upper, -1)


class MACD:
    """MACD(fast, slow, signal) exactly as TA-Lib computes it: both EMAs start at the slow EMA's
    first bar (slow - 1), the fast one seeded with the mean of its last ``fast`` inputs there
    (not from bar 0); signal = EMA(signal) of the MACD line. Returns (macd, signal, hist), all
    first at bar slow + signal - 2."""

    __slots__ = ("fast_n", "slow_n", "win", "k_fast", "fast", "slow", "signal")

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9):
        if slow < fast:
            fast, slow = slow, fast
        self.fast_n, self.slow_n = fast, slow
        self.win: deque = deque(maxlen=fast)  # the inputs that seed the fast EMA
        self.k_fast = _ema_k(fast)
        self.fast: Optional[float] = None
        self.slow = EMA(slow)
        self.signal = EMA(signal)

    def update(self, x: float) -> tuple[Optional[float], Optional[float], Optional[float]]:
        slow = self.slow.update(x)
        f = self.fast
        if f is None:
            self.win.append(x)
            if slow is None:
                return None, None, None
            f = sum(self.win) / self.fast_n
        else:
            f = (x - f) * self.k_fast + f
        self.fast = f
        m = f - slow
        s = self.signal.update(m)
        if s is None:
            return None, None, None
        return m, s, m - s


class TRIX:
    """TRIX(n) (TA-Lib): 100 * one-bar rate of change of EMA(EMA(EMA(x))), each EMA seeded with
    the mean of its first n inputs; first at bar 3 (n - 1) + 1."""

    __slots__ = ("e1", "e2", "e3", "prev")

    def __init__(self, n: int):
        self.e1, self.e2, self.e3 = EMA(n), EMA(n), EMA(n)
        self.prev: Optional[float] = None

    def update(self, x: float) -> Optional[float]:
        a = self.e1.update(x)
        if a is None:
            return None
        b = self.e2.update(a)
        if b is None:
            return None
        c = self.e3.update(b)
        if c is None:
            return None
        p = self.prev
        self.prev = c
        if p is None:
            return None
        return 0.0 if p == 0 else (c / p - 1.0) * 100.0


class MaxMin:
    """Highest and lowest of the last n values of two series (highs and lows)."""

    __slots__ = ("n", "hi", "lo")

    def __init__(self, n: int):
        self.n = n
        self.hi: deque = deque(maxlen=n)
        self.lo: deque = deque(maxlen=n)

    def update(self, high: float, low: float) -> Optional[tuple[float, float]]:
        self.hi.append(high)
        self.lo.append(low)
        if len(self.hi) < self.n:
            return None
        return max(self.hi), min(self.lo)


class Stoch:
    """Slow stochastic (TA-Lib STOCH, SMA smoothing): fast %K = 100 * (close - lowest low) /
    (highest high - lowest low) over k bars (50 on a flat window), slow %K = SMA(sk) of it,
    %D = SMA(sd) of slow %K. Returns (slow %K, %D), both first at bar k + sk + sd - 3 (as TA-Lib,
    which starts both outputs together)."""

    __slots__ = ("mm", "sk", "sd")

    def __init__(self, k: int = 14, sk: int = 3, sd: int = 3):
        self.mm = MaxMin(k)
        self.sk, self.sd = SMA(sk), SMA(sd)

    def update(self, high: float, low: float, close: float) -> tuple[Optional[float], Optional[float]]:
        hl = self.mm.update(high, low)
        if hl is None:
            return None, None
        hh, ll = hl
        fast = 50.0 if hh == ll else (close - ll) / ((hh - ll) / 100.0)
        k = self.sk.update(fast)
        d = None if k is None else self.sd.update(k)
        return (None, None) if d is None else (k, d)


class CCI:
    """Commodity channel index (TA-Lib CCI): typical price tp = (h + l + c) / 3; (tp - mean) /
    (0.015 * mean absolute deviation) over n bars; 0 when the window is flat."""

    __slots__ = ("n", "win")

    def __init__(self, n: int):
        self.n = n
        self.win: deque = deque(maxlen=n)

    def update(self, high: float, low: float, close: float) -> Optional[float]:
        w = self.win
        tp = (high + low + close) / 3.0
        w.append(tp)
        if len(w) < self.n:
            return None
        m = sum(w) / self.n
        dev = sum(abs(x - m) for x in w)
        d = tp - m
        return 0.0 if d == 0 or dev == 0 else d / (0.015 * (dev / self.n))


class MFI:
    """Money flow index (TA-Lib MFI): raw flow tp * volume counts as positive when the typical
    price rose from the previous bar, negative when it fell (a change within TIE of the prices is
    rounding of (h + l + c) / 3, not a move); 100 * pos / (pos + neg) over the last n bars (first
    at bar n); 50 when there was no flow either way (TA-Lib: 0)."""

    __slots__ = ("n", "prev_tp", "pos", "neg")

    def __init__(self, n: int):
        self.n = n
        self.prev_tp: Optional[float] = None
        self.pos: deque = deque(maxlen=n)
        self.neg: deque = deque(maxlen=n)

    def update(self, high: float, low: float, close: float, volume: float) -> Optional[float]:
        tp = (high + low + close) / 3.0
        p = self.prev_tp
        self.prev_tp = tp
        if p is None:
            return None
        d = tp - p
        flow = 0.0 if abs(d) <= TIE * (abs(tp) + abs(p)) else tp * volume
        self.pos.append(flow if d > 0 else 0.0)
        self.neg.append(flow if d < 0 else 0.0)
        if len(self.pos) < self.n:
            return None
        ps, ns = sum(self.pos), sum(self.neg)
        return 50.0 if ps + ns == 0 else 100.0 * (ps / (ps + ns))


class TSI:
    """True strength index (TA-Lib TSI): 100 * EMA_s(EMA_r(m)) / EMA_s(EMA_r(|m|)), m = x - x_prev,
    EMAs seeded with the mean of their first inputs; first at bar r + s - 1; 0 when nothing moved."""

    __slots__ = ("prev", "r1", "s1", "r2", "s2")

    def __init__(self, r: int = 25, s: int = 13):
        self.prev: Optional[float] = None
        self.r1, self.s1, self.r2, self.s2 = EMA(r), EMA(s), EMA(r), EMA(s)

    def update(self, x: float) -> Optional[float]:
        p = self.prev
        self.prev = x
        if p is None:
            return None
        m = x - p
        a, b = self.r1.update(m), self.r2.update(abs(m))
        if a is None:
            return None
        num, den = self.s1.update(a), self.s2.update(b)
        if num is None:
            return None
        return 0.0 if den == 0 else 100.0 * (num / den)


class Vortex:
    """Vortex indicator (TA-Lib VORTEX): VI+ = sum |high - previous low| / sum true range, VI- =
    sum |low - previous high| / sum true range over n bars (first at bar n); 1 and 1 when the
    window has no range."""

    __slots__ = ("n", "prev", "vp", "vm", "tr")

    def __init__(self, n: int):
        self.n = n
        self.prev: Optional[tuple[float, float, float]] = None
        self.vp: deque = deque(maxlen=n)
        self.vm: deque = deque(maxlen=n)
        self.tr: deque = deque(maxlen=n)

    def update(self, high: float, low: float, close: float) -> tuple[Optional[float], Optional[float]]:
        p = self.prev
        self.prev = (high, low, close)
        if p is None:
            return None, None
        ph, pl_, pc = p
        self.vp.append(abs(high - pl_))
        self.vm.append(abs(low - ph))
        self.tr.append(max(high - low, abs(pc - high), abs(pc - low)))
        if len(self.tr) < self.n:
            return None, None
        t = sum(self.tr)
        if t == 0:
            return 1.0, 1.0
        return sum(self.vp) / t, sum(self.vm) / t


class AroonOsc:
    """Aroon oscillator (TA-Lib AROONOSC): over the last n + 1 bars, 100 / n * (index of the
    highest high - index of the lowest low), the most recent one on ties; first at bar n."""

    __slots__ = ("n", "hi", "lo")

    def __init__(self, n: int):
        self.n = n
        self.hi: deque = deque(maxlen=n + 1)
        self.lo: deque = deque(maxlen=n + 1)

    def update(self, high: float, low: float) -> Optional[float]:
        self.hi.append(high)
        self.lo.append(low)
        if len(self.hi) <= self.n:
            return None
        h, lo = list(self.hi), list(self.lo)
        # bars since the most recent extreme: position of the first occurrence from the end
        since_hi = h[::-1].index(max(h))
        since_lo = lo[::-1].index(min(lo))
        return (100.0 / self.n) * (since_lo - since_hi)


class Correl:
    """Pearson correlation of two series over the last n bars (TA-Lib CORREL); 0 when either
    series is constant over the window."""

    __slots__ = ("n", "xs", "ys")

    def __init__(self, n: int):
        self.n = n
        self.xs: deque = deque(maxlen=n)
        self.ys: deque = deque(maxlen=n)

    def update(self, x: float, y: float) -> Optional[float]:
        xs, ys, n = self.xs, self.ys, self.n
        xs.append(x)
        ys.append(y)
        if len(xs) < n:
            return None
        mx, my = sum(xs) / n, sum(ys) / n
        dx = [a - mx for a in xs]
        dy = [b - my for b in ys]
        sxx, syy = sum(map(mul, dx, dx)), sum(map(mul, dy, dy))
        if sxx <= 0 or syy <= 0:
            return 0.0
        return sum(map(mul, dx, dy)) / math.sqrt(sxx * syy)


class ADOSC:
    """Chaikin A/D oscillator (TA-Lib ADOSC): EMA_fast(AD) - EMA_slow(AD) of the accumulation/
    distribution line AD += ((close - low) - (high - close)) / (high - low) * volume (a bar with
    no range adds 0); both EMAs start from the first AD value, the first output is at bar
    slow - 1. Only differences of AD matter, so the running AD's origin is irrelevant."""

    __slots__ = ("ad", "fast", "slow", "count", "lookback")

    def __init__(self, fast: int = 3, slow: int = 10):
        self.ad = 0.0
        self.fast, self.slow = EMA(fast, seed=1), EMA(slow, seed=1)
        self.count = 0
        self.lookback = max(fast, slow) - 1

    def update(self, high: float, low: float, close: float, volume: float) -> Optional[float]:
        rng = high - low
        if rng > 0:
            self.ad += ((close - low) - (high - close)) / rng * volume
        f, s = self.fast.update(self.ad), self.slow.update(self.ad)
        i = self.count
        self.count = i + 1
        return f - s if i >= self.lookback else None


def money_flow_multiplier(high: float, low: float, close: float) -> float:
    """((close - low) - (high - close)) / (high - low), in [-1, 1]; 0 for a bar with no range."""
    rng = high - low
    return ((close - low) - (high - close)) / rng if rng > 0 else 0.0


class CMF:
    """Chaikin money flow (TA-Lib CMF): sum(money flow multiplier * volume) / sum(volume) over n
    bars (first at bar n - 1); 0 with no volume."""

    __slots__ = ("n", "mfv", "v")

    def __init__(self, n: int):
        self.n = n
        self.mfv: deque = deque(maxlen=n)
        self.v: deque = deque(maxlen=n)

    def update(self, high: float, low: float, close: float, volume: float) -> Optional[float]:
        self.mfv.append(money_flow_multiplier(high, low, close) * volume)
        self.v.append(volume)
        if len(self.v) < self.n:
            return None
        sv = sum(self.v)
        return 0.0 if sv == 0 else sum(self.mfv) / sv


class CVI:
    """Chaikin volatility (TA-Lib CVI): 100 * (e / e_{r bars ago} - 1), e = EMA_n(high - low);
    first at bar n - 1 + r; 0 when the older average is 0."""

    __slots__ = ("ema", "hist")

    def __init__(self, n: int = 10, r: int = 10):
        self.ema = EMA(n)
        self.hist: deque = deque(maxlen=r + 1)

    def update(self, high: float, low: float) -> Optional[float]:
        e = self.ema.update(high - low)
        if e is None:
            return None
        self.hist.append(e)
        if len(self.hist) < self.hist.maxlen:
            return None
        old = self.hist[0]
        return 0.0 if old == 0 else (e / old - 1.0) * 100.0


class Fractal:
    """Williams fractal swings (TA-Lib FRACTAL, 2 bars each side): the bar two bars back is a
    swing high if its high is strictly above the highs of the two bars before and the two bars
    after it (a swing low likewise with lows). It is known only now, two bars later, which is
    when it is reported: (swing high level or None, swing low level or None), from bar 4 on."""

    __slots__ = ("hi", "lo")

    def __init__(self):
        self.hi: deque = deque(maxlen=5)
        self.lo: deque = deque(maxlen=5)

    def update(self, high: float, low: float) -> Optional[tuple[Optional[float], Optional[float]]]:
        self.hi.append(high)
        self.lo.append(low)
        if len(self.hi) < 5:
            return None
        h0, h1, h2, h3, h4 = self.hi
        l0, l1, l2, l3, l4 = self.lo
        swing_high = h2 if (h2 > h0 and h2 > h1 and h2 > h3 and h2 > h4) else None
        swing_low = l2 if (l2 < l0 and l2 < l1 and l2 < l3 and l2 < l4) else None
        return swing_high, swing_low
