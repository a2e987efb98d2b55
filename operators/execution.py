"""The execution interface between a strategy and its book: what ``StrategyEngine`` asks of wherever
its orders go. Pure typing: no bytewax, no I/O.

Today there is one implementation, ``operators.paper.PaperBook`` (fills simulated at the next 1m
open, fees, slippage, funding, marks). A real-money adapter (ccxt: orders sent to a venue, fills
and funding read back) plugs in here: it implements ``Execution`` and is handed to
``StrategyEngine(..., execution=...)``; the engine does not change.

The engine's protocol with its execution, in the order of a 1m bar (``StrategyEngine.on_bar``):
funding announced and settled (``note_funding``, ``settle_funding``), the pending order filled at
the bar's open (``fill_pending``) or cancelled (``cancel``), protective exits closed inside the bar
(``close``), the bar's close marked (``mark``), then equity read. On a scored row it submits
entries and exits (``submit_open``, ``submit_close``) and reads the open positions and pending
orders. A promotion (``operators.optimizer``) also re-tags the book and sets its fee and slippage.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from operators.paper import ClosedTrade, Fill, FundingPayment, PendingOrder, Position
from operators.perp import PerpSnap
from operators.slippage import TapeWalk

__all__ = ["Execution"]


@runtime_checkable
class Execution(Protocol):
    """The book one strategy trades through. At most one position or pending order per instrument
    (``"exchange:symbol"``); every record it returns carries ``tags`` (origin, strategy_id,
    variant_id, config_hash)."""

    tags: dict
    positions: dict[str, Position]      # instrument -> the open position (the engine updates its extremes)
    pending: dict[str, PendingOrder]    # instrument -> the order waiting for the next 1m open
    cash: float
    realised_gross: float               # gross PnL of the closed trades
    fees: float
    funding: float                      # funding received (> 0) or paid, in cash
    trades: int                         # closed trades, and of them: wins, gross profit, gross loss
    wins: int
    gross_profit: float
    gross_loss: float

    # ---- orders
    def submit_open(self, instrument: str, exchange: str, symbol: str, side: int, notional: float,
                    decision_ts: int, arm: str, atr: Optional[float], primary_ms: int) -> int:
        """Queue an entry decided at ``decision_ts``; returns the position id."""
        ...

    def submit_close(self, instrument: str, decision_ts: int, reason: str) -> Optional[int]:
        """Queue the close of the instrument's position; its id, or None when there is nothing to close."""
        ...

    def cancel(self, instrument: str) -> Optional[PendingOrder]:
        ...

    def has_order(self, instrument: str) -> bool:
        ...

    def open_count(self) -> int:
        """Open positions plus pending entries (what ``max_positions`` counts)."""
        ...

    # ---- fills
    def fill_pending(self, instrument: str, bar_start: int, bar_open: float,
                     walk: Optional[TapeWalk] = None) -> tuple[list[Fill], Optional[ClosedTrade]]:
        """Fill the instrument's pending order at the open of the 1m bar starting at ``bar_start``."""
        ...

    def close(self, instrument: str, ts: int, ref: float, reason: str, decision_ts: int,
              walk: Optional[TapeWalk] = None) -> tuple[Fill, ClosedTrade]:
        """Close the whole position now at ``ref`` (a protective exit inside a bar)."""
        ...

    # ---- funding
    def note_funding(self, instrument: str, snap: Optional[PerpSnap], before: Optional[int] = None) -> None:
        ...

    def settle_funding(self, instrument: str, bar_start: int) -> list[FundingPayment]:
        ...

    # ---- marks
    def mark(self, instrument: str, price: float) -> None:
        ...

    def equity(self) -> float:
        ...

    def exposure(self) -> float:
        ...

    def mark_to_exit_bps(self, pos: Position, mark: float) -> float:
        """Net PnL in bps of closing ``pos`` at ``mark`` now (the bandit's reward at maturity)."""
        ...
