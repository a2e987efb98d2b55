"""Perpetual-futures data: funding rates, open interest and liquidations. Pure logic, no bytewax;
imports nothing of ours (a leaf: trades, bars, features and the paper book all use it).

What travels (``PerpUpdate``), one observation of one instrument:

- ``funding``: the rate that will be paid at ``funding_time`` (ms), as the venue shows it at ``ts``,
  with the mark and index price when known. Longs pay shorts ``qty x mark x rate`` when the rate is
  positive (receive when negative), at every funding time they hold the position through.
- ``open_interest``: open contracts in base units (``open_interest``) and/or their quote value
  (``oi_value``), at ``ts``.
- ``liquidation``: a forced order: ``side`` is the liquidation ORDER's side ("sell": a long was
  liquidated; "buy": a short), ``price`` x ``amount`` its notional.

On Kafka they are in-band messages on the trade topic, keyed by instrument like its trades, with the
kind in a ``perp`` field (``{"perp": "funding", "exchange": ..., "symbol": ..., "ts": ..., "rate":
...}``); the synthetic source, replay files and the ccxt ingest produce them too.

How they reach bars without lookahead (``operators.chunk_news.carry_news``): an update is placed at its
position among the instrument's trades (``seq``: it came after every trade with a smaller seq). It
rides the 1m window of its own ts when that is not behind the watermark at its position, else the
window of the frontier there (like a late trade's count); one ahead of every trade waits until the
trades reach its ts. So a bar [start, end) sees only updates with ts < end, and which bar sees an
update does not depend on batch cuts, partitions or processes. Levels (funding, mark, OI) are the
latest by ts; liquidations are summed per bar (deduplicated by their content).
"""

from __future__ import annotations

import math
from typing import Optional

import msgspec

KINDS = ("funding", "open_interest", "liquidation")
FUNDING_TABLE, OI_TABLE, LIQ_TABLE = "funding_rates", "open_interest", "liquidations"


class PerpUpdate(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename={"kind": "perp"}):
    """One observation (see the module doc). On the wire the kind is the ``perp`` field."""

    kind: str
    exchange: str
    symbol: str
    ts: int
    rate: Optional[float] = None
    funding_time: Optional[int] = None
    mark_price: Optional[float] = None
    index_price: Optional[float] = None
    open_interest: Optional[float] = None
    oi_value: Optional[float] = None
    side: Optional[str] = None
    price: Optional[float] = None
    amount: Optional[float] = None
    source: str = ""
    seq: Optional[int] = None  # position among the instrument's trades (None: after its batch's trades)

    @property
    def instrument(self) -> str:
        return f"{self.exchange}:{self.symbol}"

    def dedup_key(self) -> str:
        """Same observation, same key (a redelivered liquidation must not count twice)."""
        return f"perp:{self.kind}:{self.ts}:{self.side}:{self.price}:{self.amount}:{self.rate}:{self.open_interest}"

    @property
    def notional(self) -> float:
        return (self.price or 0.0) * (self.amount or 0.0)


PERP_DECODER = msgspec.json.Decoder(PerpUpdate)
_ENC = msgspec.json.Encoder()


def encode(u: PerpUpdate) -> tuple[str, bytes]:
    """(Kafka key, message) for the trade topic; ``seq`` is a position in the reader's input, not sent."""
    return u.instrument, _ENC.encode(msgspec.structs.replace(u, seq=None))


def _bad_number(v: Optional[float], positive: bool) -> bool:
    return v is not None and (not math.isfinite(v) or (v <= 0 if positive else False))


def problem(u: PerpUpdate, min_ts: int, max_ts: int) -> Optional[tuple[str, str]]:
    """(dead-letter reason, detail) when ``u`` cannot be used, else None."""
    if u.kind not in KINDS:
        return "wrong_type", f"perp kind {u.kind!r} is not one of {', '.join(KINDS)}"
    if not u.exchange or not u.symbol:
        return "missing_field", "a perp update needs exchange and symbol"
    if not min_ts <= u.ts <= max_ts:
        return "ts_out_of_range", f"ts {u.ts} is outside [{min_ts}, {max_ts}]"
    need = {"funding": ("rate",), "open_interest": (), "liquidation": ("side", "price", "amount")}[u.kind]
    for name in need:
        if getattr(u, name) is None:
            return "missing_field", f"a {u.kind} update needs {name}"
    if u.kind == "open_interest" and u.open_interest is None and u.oi_value is None:
        return "missing_field", "an open_interest update needs open_interest or oi_value"
    if u.rate is not None and not math.isfinite(u.rate):
        return "non_finite", f"funding rate {u.rate} is not a finite number"
    if u.rate is not None and abs(u.rate) > 0.1:
        return "wrong_type", f"funding rate {u.rate}: |rate| > 10% per funding (a percentage, not a fraction?)"
    for name in ("mark_price", "index_price", "price", "amount"):
        if _bad_number(getattr(u, name), positive=True):
            return "non_positive", f"{name} {getattr(u, name)} must be a positive finite number"
    for name in ("open_interest", "oi_value"):
        v = getattr(u, name)
        if v is not None and (not math.isfinite(v) or v < 0):
            return "non_finite", f"{name} {v} must be a finite number >= 0"
    if u.side is not None and u.side not in ("buy", "sell"):
        return "unknown_side", f"liquidation side {u.side!r} is neither 'buy' nor 'sell'"
    return None


class PerpSnap(msgspec.Struct, frozen=True, kw_only=True):
    """What a bar knows of its instrument's perp data: the latest levels (by ts, among updates with
    ts < the bar's end) and the liquidations its window carried."""

    funding_rate: Optional[float] = None
    funding_time: Optional[int] = None
    funding_ts: Optional[int] = None
    mark_price: Optional[float] = None
    index_price: Optional[float] = None
    open_interest: Optional[float] = None
    oi_value: Optional[float] = None
    oi_ts: Optional[int] = None
    liq_buy: float = 0.0  # notional of liquidation buys (shorts liquidated) in the bar
    liq_sell: float = 0.0  # notional of liquidation sells (longs liquidated)
    liq_count: int = 0
    # the latest announcement (funding_time, ts, rate, mark) of each of the last two funding times:
    # a quiet minute before a funding time must not let the next time's first update hide this one's
    fundings: tuple = ()


def absorb(snap: Optional[PerpSnap], updates) -> PerpSnap:
    """``snap`` with ``updates`` applied: newer levels replace older ones, liquidations add up."""
    s = snap or PerpSnap()
    f = msgspec.structs.asdict(s)
    for u in sorted(updates, key=lambda u: (u.ts, u.kind)):
        if u.kind == "funding":
            by_time = {a[0]: a for a in f["fundings"]}
            old = by_time.get(u.funding_time)
            if u.funding_time is not None and (old is None or u.ts >= old[1]):
                by_time[u.funding_time] = (u.funding_time, u.ts, u.rate, u.mark_price)
                f["fundings"] = tuple(sorted(by_time.values())[-2:])
            if f["funding_ts"] is None or u.ts >= f["funding_ts"]:
                f.update(funding_rate=u.rate, funding_time=u.funding_time, funding_ts=u.ts)
                f["mark_price"] = u.mark_price if u.mark_price is not None else f["mark_price"]
                f["index_price"] = u.index_price if u.index_price is not None else f["index_price"]
        elif u.kind == "open_interest" and (f["oi_ts"] is None or u.ts >= f["oi_ts"]):
            f.update(open_interest=u.open_interest, oi_value=u.oi_value, oi_ts=u.ts)
        elif u.kind == "liquidation":
            f["liq_buy" if u.side == "buy" else "liq_sell"] += u.notional
            f["liq_count"] += 1
    return PerpSnap(**f)


def levels_only(snap: Optional[PerpSnap]) -> Optional[PerpSnap]:
    """The levels a next bar starts from (its liquidations are its own)."""
    if snap is None or not snap.liq_count:
        return snap
    return msgspec.structs.replace(snap, liq_buy=0.0, liq_sell=0.0, liq_count=0)


def merge(acc: Optional[PerpSnap], later: Optional[PerpSnap]) -> Optional[PerpSnap]:
    """Roll-up: ``acc`` (earlier minutes of a period) then ``later``: the later levels, summed
    liquidations."""
    if acc is None or later is None:
        return later if acc is None else acc
    return msgspec.structs.replace(later, liq_buy=acc.liq_buy + later.liq_buy, liq_sell=acc.liq_sell + later.liq_sell,
                                   liq_count=acc.liq_count + later.liq_count)


# ------------------------------------------------------------------------------------ features

#: (name, formula). None while the instrument has no such data (a spot tape, or before the first
#: update): these do not hold back ``warm``. b = the bar's PerpSnap, c = close, ret_1 = log(c / c[-1]).
CATALOG: list[tuple[str, str]] = [
    ("funding_bps", "latest funding rate x 1e4 (b.funding_rate)"),
    ("funding_chg_bps", "funding_bps - its value 8 bars ago"),
    ("basis_bps", "(mark / index - 1) x 1e4, from the latest funding update that had both"),
    ("oi_chg", "log(OI / OI of the previous bar), OI = open interest in base units (else its value)"),
    ("oi_chg_12", "log(OI / OI 12 bars ago)"),
    ("oi_price", "oi_chg x sign(ret_1): > 0 OI grows with the move (new positions), < 0 it shrinks (closing)"),
    ("liq_long_share", "notional of long liquidations (sell orders) in the bar / the bar's traded notional"),
    ("liq_short_share", "notional of short liquidations (buy orders) in the bar / the bar's traded notional"),
    ("liq_imbalance", "(short liq - long liq) / (short liq + long liq) in the bar; 0 without liquidations"),
]
NAMES: list[str] = [n for n, _ in CATALOG]
FORMULAS: dict[str, str] = dict(CATALOG)
_FUND_LAG, _OI_LAG = 8, 12


class PerpFeatures:
    """Incremental state of the perp features of one instrument and timeframe (plain, picklable)."""

    __slots__ = ("funding", "oi")

    def __init__(self) -> None:
        self.funding: tuple = ()  # the last _FUND_LAG + 1 funding_bps values (None kept)
        self.oi: tuple = ()  # the last _OI_LAG + 1 OI values

    def step(self, snap: Optional[PerpSnap], ret_1: Optional[float], notional: float) -> dict:
        s = snap or PerpSnap()
        fund = None if s.funding_rate is None else s.funding_rate * 1e4
        oi = s.open_interest if s.open_interest is not None else s.oi_value
        self.funding = (self.funding + (fund,))[-(_FUND_LAG + 1):]
        self.oi = (self.oi + (oi,))[-(_OI_LAG + 1):]
        f: dict = {"funding_bps": fund}
        old = self.funding[0] if len(self.funding) == _FUND_LAG + 1 else None
        f["funding_chg_bps"] = None if fund is None or old is None else fund - old
        f["basis_bps"] = (None if s.mark_price is None or s.index_price is None
                          else (s.mark_price / s.index_price - 1.0) * 1e4)
        f["oi_chg"] = _log_ratio(oi, self.oi[-2] if len(self.oi) >= 2 else None)
        f["oi_chg_12"] = _log_ratio(oi, self.oi[0] if len(self.oi) == _OI_LAG + 1 else None)
        f["oi_price"] = (None if f["oi_chg"] is None or ret_1 is None
                         else f["oi_chg"] * (1.0 if ret_1 > 0 else -1.0 if ret_1 < 0 else 0.0))
        if snap is None:
            f["liq_long_share"] = f["liq_short_share"] = f["liq_imbalance"] = None
        else:
            f["liq_long_share"] = s.liq_sell / notional if notional > 0 else 0.0
            f["liq_short_share"] = s.liq_buy / notional if notional > 0 else 0.0
            total = s.liq_buy + s.liq_sell
            f["liq_imbalance"] = (s.liq_buy - s.liq_sell) / total if total > 0 else 0.0
        return f


def _log_ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
    if x is None or y is None or x <= 0 or y <= 0:
        return None
    return math.log(x / y)
