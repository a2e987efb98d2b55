"""Volume and money-flow indicators (TA-Lib MFI, ADOSC, CMF), incremental with plain picklable state.

Conventions are the package's (``operators.indicators``): ``update`` takes one closed bar's inputs
and returns the value at that bar, or None while warming up."""

from __future__ import annotations

from collections import deque
from typing import Optional

from operators.indicators.averages import EMA


# TA-Lib's scale-aware tie (TA_IS_ZERO_SCALED): a difference of two prices within 1e-14 of their
# magnitude is rounding, not a move.
TIE = 1e-14


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
