"""Paper execution: ``PaperBook``, one simulated book per strategy, and the records it writes (fills,
funding payments, equity points). Pure logic: no bytewax, no I/O. ``PaperBook`` implements
``operators.execution.Execution``, the interface the strategy engine trades through.

- An order decided at time T (a primary bar's close) waits as a pending order and fills at the
  OPEN of the first 1m bar of its instrument that starts at or after T -- the next bar, never the
  decision bar's close. Its quantity is fixed then: notional / fill price.
- Every fill pays the taker fee (``fee_bps`` of the fill's notional) and slippage against us:
  buys fill above the reference price, sells below. At a 1m open the order walks that bar's tape
  (``operators.slippage``): the next trades on its side until its size is filled, each at the worst
  price reached by then (never better than the open), and ``slippage_bps`` on top, so a large order
  pays more than a small one. Bars without a tape (tests, old snapshots) pay ``slippage_bps`` alone.
- Protective exits (stops, targets) fill inside the bar at their level (or at the open on a gap),
  also with slippage and fee.
- Accounting is for linear perpetuals: ``cash`` = initial equity + realised gross PnL - fees +
  funding; equity = cash + unrealised PnL of open positions marked at each instrument's last 1m close.
- Funding (``settle_funding``): a position open at a funding time T (the first 1m bar of its
  instrument starting at or after T comes before that bar's fills) receives
  ``-side x qty x mark x rate`` (longs pay a positive rate), with the rate and mark of the latest
  update announcing T made before the bar (``note_funding``, from the bars' ``perp``; even when the
  minute before T had no trade). Each payment is a ``FundingPayment`` row and is in the trade's net PnL.
- A trade's net PnL (``Fill.realised_pnl`` on the exit) = gross PnL - entry fee - exit fee + funding.
- A position's id comes from the data that opened it (``position_id``), never from a counter: a
  restart, a replay of the same input or a second run writes its fills under the same keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

from operators.decision import Tagged
from operators.perp import PerpSnap
from operators.slippage import TapeWalk, walk_price


class Fill(Tagged, kw_only=True):
    ts: int                    # open time of the 1m bar used
    exchange: str
    symbol: str
    side: str                  # buy | sell
    qty: float                 # base units, > 0
    price: float               # after slippage
    ref_price: float           # before slippage (bar open, stop level...)
    notional: float            # qty * price
    fee: float
    slippage_bps: float
    reason: str                # entry | stop_loss | trailing_stop | take_profit | atr_stop |
    #                            atr_take_profit | time_stop | opposite_signal | kill_switch
    position_id: int
    position_side: int         # +1 long, -1 short (the position this fill opens or closes)
    realised_pnl: Optional[float] = None   # exits: net PnL of the whole trade (both fees)
    pnl_bps: Optional[float] = None        # exits: realised_pnl / entry notional in bps
    decision_ts: int = 0       # the decision that caused it (protective exits: the entry's)
    arm: str = ""              # the arm that opened the position


class FundingPayment(Tagged, kw_only=True):
    ts: int                    # the funding time
    exchange: str
    symbol: str
    position_id: int
    position_side: int
    qty: float
    mark_price: float
    rate: float
    amount: float              # to the book: > 0 received, < 0 paid


class EquityPoint(Tagged, kw_only=True):
    ts: int                    # the 1m bar close (end) at which equity was marked
    seq: int                   # n-th mark of this ts (1, 2, ... one per instrument's bar ending at ts):
    #                            the last point of a ts is the latest mark (ReplacingMergeTree(seq))
    equity: float
    cash: float
    realised_pnl: float        # gross, closed trades
    unrealised_pnl: float
    fees: float
    exposure: float            # gross open notional at the marks
    open_positions: int
    peak: float
    drawdown: float
    halted: bool
    funding: float = 0.0       # funding received (> 0) or paid (< 0) so far, in cash


def position_id(tags: dict, exchange: str, symbol: str, decision_ts: int, side: int) -> int:
    """The id of the position a decision opens: a 63-bit hash of whose book it is (origin,
    strategy_id, variant_id), the instrument, the decision's time (the scored bar's end) and the
    side. A book holds at most one position or pending order per instrument, and an instrument
    has one decision per primary bar, so no two positions of a book share these (a collision of
    the hash, ~n^2/2^64, is refused by ``submit_open``). Unlike a counter it does not depend on
    what came before: the same input always gives the same ids, in a restart from a snapshot, in
    a second run and whatever order instruments arrive in, so stored fills replace themselves."""
    key = "\x1f".join((tags.get("origin", ""), tags.get("strategy_id", ""), tags.get("variant_id", ""),
                        exchange, symbol, str(int(decision_ts)), str(int(side))))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class PendingOrder:
    instrument: str
    exchange: str
    symbol: str
    kind: str                  # open | close
    side: int                  # position side (+1 long / -1 short)
    decision_ts: int
    reason: str                # entry | time_stop | opposite_signal | kill_switch
    notional: float = 0.0      # open orders
    position_id: int = 0
    arm: str = ""
    atr: Optional[float] = None
    primary_ms: int = 300_000


@dataclass
class Position:
    position_id: int
    instrument: str
    exchange: str
    symbol: str
    side: int
    qty: float
    entry_price: float
    entry_ts: int
    entry_fee: float
    decision_ts: int
    arm: str
    atr: Optional[float]
    primary_ms: int
    peak: float                # highest price since entry (through the last checked bar)
    trough: float              # lowest price since entry
    bars_held: int = 0         # 1m bars seen since the fill (the fill bar included)
    closing: bool = False      # a close order is pending
    funding: float = 0.0       # funding received (> 0) or paid while open

    @property
    def best(self) -> float:
        return self.peak if self.side > 0 else self.trough

    @property
    def entry_notional(self) -> float:
        return self.qty * self.entry_price

    def unrealised(self, mark: float) -> float:
        return self.side * self.qty * (mark - self.entry_price)


@dataclass
class ClosedTrade:
    position_id: int
    arm: str
    net_pnl: float
    pnl_bps: float
    exit_ts: int
    reason: str


@dataclass
class PaperBook:
    initial_equity: float
    fee_bps: float
    slippage_bps: float
    tags: dict                 # origin, strategy_id, variant_id, config_hash
    cash: float = 0.0
    realised_gross: float = 0.0
    fees: float = 0.0
    pending: dict = field(default_factory=dict)     # instrument -> PendingOrder
    positions: dict = field(default_factory=dict)   # instrument -> Position
    marks: dict = field(default_factory=dict)       # instrument -> last 1m close
    trades: int = 0
    wins: int = 0
    gross_profit: float = 0.0
    gross_loss: float = 0.0
    funding: float = 0.0                            # funding received (> 0) or paid, in cash
    funding_next: dict = field(default_factory=dict)  # instrument -> {funding time: (announced at, rate, mark or None)}
    funding_done: dict = field(default_factory=dict)  # instrument -> last funding time settled

    def __post_init__(self) -> None:
        if self.cash == 0.0:
            self.cash = self.initial_equity

    # ---- prices
    def slipped(self, ref: float, buy: bool) -> float:
        s = self.slippage_bps / 1e4
        return ref * (1 + s) if buy else ref * (1 - s)

    def fill_price(self, ref: float, buy: bool, qty: float, walk: Optional[TapeWalk]) -> float:
        """At a bar's open: the tape-walk price for ``qty`` (never better than ``ref``), slipped."""
        walked = walk_price(walk, qty, buy)
        if walked is not None:
            ref = max(ref, walked) if buy else min(ref, walked)
        return self.slipped(ref, buy)

    def fee_of(self, notional: float) -> float:
        return abs(notional) * self.fee_bps / 1e4

    # ---- orders
    def submit_open(self, instrument: str, exchange: str, symbol: str, side: int, notional: float,
                    decision_ts: int, arm: str, atr: Optional[float], primary_ms: int) -> int:
        if instrument in self.pending or instrument in self.positions:
            raise ValueError(f"{instrument}: an order or a position is already there")
        pid = position_id(self.tags, exchange, symbol, decision_ts, side)
        if any(o.position_id == pid for o in self.pending.values()) or \
                any(p.position_id == pid for p in self.positions.values()):
            raise ValueError(f"{instrument}: position id {pid} is in use (hash collision)")
        self.pending[instrument] = PendingOrder(instrument, exchange, symbol, "open", side, decision_ts, "entry",
                                                notional=notional, position_id=pid, arm=arm, atr=atr,
                                                primary_ms=primary_ms)
        return pid

    def submit_close(self, instrument: str, decision_ts: int, reason: str) -> Optional[int]:
        pos = self.positions.get(instrument)
        if pos is None or pos.closing or instrument in self.pending:
            return None
        pos.closing = True
        self.pending[instrument] = PendingOrder(instrument, pos.exchange, pos.symbol, "close", pos.side,
                                                decision_ts, reason, position_id=pos.position_id, arm=pos.arm)
        return pos.position_id

    def cancel(self, instrument: str) -> Optional[PendingOrder]:
        order = self.pending.pop(instrument, None)
        if order is not None and order.kind == "close" and instrument in self.positions:
            self.positions[instrument].closing = False
        return order

    def has_order(self, instrument: str) -> bool:
        return instrument in self.pending

    def fill_pending(self, instrument: str, bar_start: int, bar_open: float,
                     walk: Optional[TapeWalk] = None) -> tuple[list[Fill], Optional[ClosedTrade]]:
        """Fill the instrument's pending order at this bar's open if it was decided at or before the
        bar's start, walking the bar's tape (``walk``) when it has one."""
        order = self.pending.get(instrument)
        if order is None or order.decision_ts > bar_start:
            return [], None
        del self.pending[instrument]
        if order.kind == "open":
            return [self._open(order, bar_start, bar_open, walk)], None
        fill, closed = self.close(instrument, bar_start, bar_open, order.reason, order.decision_ts, walk)
        return [fill], closed

    def _open(self, o: PendingOrder, ts: int, ref: float, walk: Optional[TapeWalk] = None) -> Fill:
        price = self.fill_price(ref, o.side > 0, o.notional / ref, walk)
        qty = o.notional / price
        notional = qty * price
        fee = self.fee_of(notional)
        self.cash -= fee
        self.fees += fee
        self.positions[o.instrument] = Position(
            position_id=o.position_id, instrument=o.instrument, exchange=o.exchange, symbol=o.symbol, side=o.side,
            qty=qty, entry_price=price, entry_ts=ts, entry_fee=fee, decision_ts=o.decision_ts, arm=o.arm, atr=o.atr,
            primary_ms=o.primary_ms, peak=price, trough=price)
        self.marks.setdefault(o.instrument, ref)
        return Fill(**self.tags, ts=ts, exchange=o.exchange, symbol=o.symbol, side="buy" if o.side > 0 else "sell",
                    qty=qty, price=price, ref_price=ref, notional=notional, fee=fee,
                    slippage_bps=_adverse_bps(price, ref, o.side > 0), reason="entry", position_id=o.position_id,
                    position_side=o.side, decision_ts=o.decision_ts, arm=o.arm)

    def close(self, instrument: str, ts: int, ref: float, reason: str, decision_ts: int,
              walk: Optional[TapeWalk] = None) -> tuple[Fill, ClosedTrade]:
        """Close the whole position at ``ref`` (slippage and fee applied; at a bar's open, ``walk``
        is its tape)."""
        pos = self.positions.pop(instrument)
        if instrument in self.pending and self.pending[instrument].kind == "close":
            del self.pending[instrument]  # a protective exit came first
        price = self.fill_price(ref, pos.side < 0, pos.qty, walk)
        notional = pos.qty * price
        fee = self.fee_of(notional)
        gross = pos.side * pos.qty * (price - pos.entry_price)
        self.cash += gross - fee
        self.realised_gross += gross
        self.fees += fee
        net = gross - pos.entry_fee - fee + getattr(pos, "funding", 0.0)
        bps = net / pos.entry_notional * 1e4 if pos.entry_notional > 0 else 0.0
        self.trades += 1
        if net > 0:
            self.wins += 1
            self.gross_profit += net
        else:
            self.gross_loss -= net
        fill = Fill(**self.tags, ts=ts, exchange=pos.exchange, symbol=pos.symbol,
                    side="sell" if pos.side > 0 else "buy",
                    qty=pos.qty, price=price, ref_price=ref, notional=notional, fee=fee,
                    slippage_bps=_adverse_bps(price, ref, pos.side < 0), reason=reason, position_id=pos.position_id,
                    position_side=pos.side, realised_pnl=net, pnl_bps=bps, decision_ts=decision_ts, arm=pos.arm)
        return fill, ClosedTrade(pos.position_id, pos.arm, net, bps, ts, reason)

    # ---- funding
    def note_funding(self, instrument: str, snap: Optional[PerpSnap], before: Optional[int] = None) -> None:
        """Remember the funding announcements a bar carried (``before``: only those made earlier),
        the latest for each funding time; each is paid at its time (``settle_funding``)."""
        if snap is None:
            return
        notes = self.__dict__.setdefault("funding_next", {}).setdefault(instrument, {})
        done = self.__dict__.setdefault("funding_done", {}).get(instrument, -1)
        for t, ts, rate, mark in getattr(snap, "fundings", ()):
            if t > done and (before is None or ts < before) and (t not in notes or ts >= notes[t][0]):
                notes[t] = (ts, rate, mark)

    def settle_funding(self, instrument: str, bar_start: int) -> list[FundingPayment]:
        """Pay or receive the funding due at or before ``bar_start`` (call before the bar's fills),
        oldest funding time first, each once."""
        notes = self.__dict__.setdefault("funding_next", {}).get(instrument)
        if not notes:
            return []
        done = self.__dict__.setdefault("funding_done", {})
        out = []
        for t in sorted(t for t in notes if t <= bar_start):
            _, rate, mark = notes.pop(t)
            if t <= done.get(instrument, -1):
                continue
            done[instrument] = t
            pos = self.positions.get(instrument)
            if pos is None:
                continue
            mark = mark if mark is not None else self.marks.get(instrument, pos.entry_price)
            amount = -pos.side * pos.qty * mark * rate
            self.cash += amount
            self.funding = getattr(self, "funding", 0.0) + amount
            pos.funding = getattr(pos, "funding", 0.0) + amount
            out.append(FundingPayment(**self.tags, ts=t, exchange=pos.exchange, symbol=pos.symbol,
                                      position_id=pos.position_id, position_side=pos.side, qty=pos.qty,
                                      mark_price=mark, rate=rate, amount=amount))
        return out

    # ---- marks
    def mark(self, instrument: str, price: float) -> None:
        self.marks[instrument] = price

    def unrealised(self) -> float:
        return sum(p.unrealised(self.marks.get(i, p.entry_price)) for i, p in self.positions.items())

    def exposure(self) -> float:
        return sum(p.qty * self.marks.get(i, p.entry_price) for i, p in self.positions.items())

    def equity(self) -> float:
        return self.cash + self.unrealised()

    def open_count(self) -> int:
        """Open positions plus pending entries (what max_positions counts)."""
        return len(self.positions) + sum(1 for o in self.pending.values() if o.kind == "open")

    def mark_to_exit_bps(self, pos: Position, mark: float) -> float:
        """Net PnL in bps of closing ``pos`` at ``mark`` now (exit slippage, both fees and funding included)."""
        price = self.slipped(mark, buy=pos.side < 0)
        gross = pos.side * pos.qty * (price - pos.entry_price)
        net = gross - pos.entry_fee - self.fee_of(pos.qty * price) + getattr(pos, "funding", 0.0)
        return net / pos.entry_notional * 1e4 if pos.entry_notional > 0 else 0.0


def _adverse_bps(price: float, ref: float, buy: bool) -> float:
    """How much worse than ``ref`` the fill was, in bps (>= 0)."""
    return ((price / ref - 1.0) if buy else (1.0 - price / ref)) * 1e4 if ref > 0 else 0.0
