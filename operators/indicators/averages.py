"""Moving averages (TA-Lib SMA, EMA, Wilder's RMA, WMA, HMA, VWMA), incremental with plain
picklable state.

Conventions are the package's (``operators.indicators``): ``update`` takes one closed bar's inputs
and returns the value at that bar, or None while warming up."""

from __future__ import annotations

import math
from collections import deque
from operator import mul
from typing import Optional


def ema_k(n: int) -> float:
    """The EMA weight of the newest input, 2 / (n + 1) (TA-Lib)."""
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
        self.k = ema_k(n)
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
