"""Trend and swing indicators (TA-Lib PLUS_DI / MINUS_DI / ADX, SAR, SUPERTREND, VORTEX, AROONOSC,
FRACTAL), incremental with plain picklable state.

Conventions are the package's (``operators.indicators``): ``update`` takes one closed bar's inputs
and returns the value at that bar, or None while warming up."""

from __future__ import annotations

from collections import deque
from typing import Optional

from operators.indicators.volatility import ATR


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
