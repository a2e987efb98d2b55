"""Volatility and range indicators (TA-Lib TRANGE, ATR, KC, CVI), incremental with plain picklable
state.

Conventions are the package's (``operators.indicators``): ``update`` takes one closed bar's inputs
and returns the value at that bar, or None while warming up."""

from __future__ import annotations

from collections import deque
from typing import Optional

from operators.indicators.averages import EMA


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
