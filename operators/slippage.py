"""Slippage from the tape: what an order of a given size would have paid at a 1m bar's open. Pure
logic; imports nothing of ours.

A 1m bar keeps the start of its tape (``TapeWalk``): the first ``WALK_TRADES`` buy-initiated and the
first ``WALK_TRADES`` sell-initiated trades after the open, as cumulative amount and notional. A
market buy of ``qty`` at the open takes the liquidity those next buyers took: it walks the buy trades
in tape order until their amounts reach ``qty`` (the last one in part), paying for each trade's
amount the highest price the buyers had reached by then (a sweep must go as high as they went to
find that much; the running maximum makes the price a non-decreasing function of size, whatever the
drift inside the minute). A sell walks the sell trades at their running minimum. What the kept trades cannot fill is filled at the bar's worst
price for the order (its high for a buy, its low for a sell). The paper book never fills better than
the open (adverse only) and still charges ``slippage_bps`` on top (spread and latency), so a small
order pays about the fixed slippage and a large one more.

>>> import numpy as np
>>> buy = np.array([True, True, True, True])
>>> w = build(np.array([100.0, 100.5, 100.2, 101.0]), np.array([1.0, 1.0, 1.0, 1.0]), buy, high=101.0, low=100.0)
>>> walk_price(w, 1.0, buy=True), walk_price(w, 2.0, buy=True), walk_price(w, 3.0, buy=True), walk_price(w, 6.0, buy=True)
(100.0, 100.25, 100.33333333333333, 100.66666666666667)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

WALK_TRADES = 128  # trades kept per side: enough for an order many times the typical trade


class TapeWalk:
    """The start of a bar's tape, per side: cumulative amounts and cumulative notionals at the
    running worst price (numpy arrays, never modified), and the bar's high and low."""

    __slots__ = ("buy_qty", "buy_notional", "sell_qty", "sell_notional", "high", "low")

    def __init__(self, buy_qty: np.ndarray, buy_notional: np.ndarray, sell_qty: np.ndarray,
                 sell_notional: np.ndarray, high: float, low: float):
        self.buy_qty, self.buy_notional, self.sell_qty, self.sell_notional = buy_qty, buy_notional, sell_qty, sell_notional
        self.high, self.low = high, low

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TapeWalk) and all(
            np.array_equal(getattr(self, k), getattr(other, k)) for k in self.__slots__)

    __hash__ = None  # compared by value

    def __repr__(self) -> str:
        return f"TapeWalk(buys={len(self.buy_qty)}, sells={len(self.sell_qty)}, high={self.high}, low={self.low})"


def build(price: np.ndarray, amount: np.ndarray, is_buy: np.ndarray, high: float, low: float) -> TapeWalk:
    """The walk of a bar's trades (in tape order: event time, then arrival)."""
    def side(mask: np.ndarray, worst: np.ufunc) -> tuple[np.ndarray, np.ndarray]:
        p, a = worst.accumulate(price[mask][:WALK_TRADES]), amount[mask][:WALK_TRADES]
        return np.cumsum(a), np.cumsum(p * a)

    bq, bn = side(is_buy, np.maximum)
    sq, sn = side(~is_buy, np.minimum)
    return TapeWalk(bq, bn, sq, sn, float(high), float(low))


def walk_price(walk: Optional[TapeWalk], qty: float, buy: bool) -> Optional[float]:
    """Average price of a market order of ``qty`` walking the tape (None without a walk or qty)."""
    if walk is None or not qty > 0:
        return None
    cq, cn = (walk.buy_qty, walk.buy_notional) if buy else (walk.sell_qty, walk.sell_notional)
    worst = walk.high if buy else walk.low
    if not len(cq):
        return worst
    i = int(np.searchsorted(cq, qty))  # first trade whose cumulative amount reaches qty
    if i >= len(cq):
        return float(cn[-1] + (qty - cq[-1]) * worst) / qty
    q0, n0 = (float(cq[i - 1]), float(cn[i - 1])) if i else (0.0, 0.0)
    px = (float(cn[i]) - n0) / (float(cq[i]) - q0)
    return (n0 + (qty - q0) * px) / qty
