"""Momentum oscillators (TA-Lib RSI, MACD, TRIX, STOCH, CCI, TSI), incremental with plain picklable
state.

Conventions are the package's (``operators.indicators``): ``update`` takes one closed bar's inputs
and returns the value at that bar, or None while warming up."""

from __future__ import annotations

from collections import deque
from typing import Optional

from operators.indicators.averages import EMA, SMA, Wilder, ema_k
from operators.indicators.windows import MaxMin


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
        self.k_fast = ema_k(fast)
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
