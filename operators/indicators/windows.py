"""Statistics over a fixed window of the last n inputs (TA-Lib STDDEV, MAX/MIN, CORREL), with plain
picklable state.

Conventions are the package's (``operators.indicators``): ``update`` takes one closed bar's inputs
and returns the value at that bar, or None while warming up."""

from __future__ import annotations

import math
from collections import deque
from operator import mul
from typing import Optional


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
