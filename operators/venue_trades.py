"""Venue trades: ccxt trades -> contract ``Trade``s (or a refusal), and the ``--feeds`` spec.

Pure: no I/O, no ccxt import, no bytewax, so a run that only parses ``exchange:SYM,SYM`` specs
(``parse_symbols``) does not pay for importing ccxt. ``dataflows/venue_feed.py`` drives this from a
live ccxt.pro exchange; what decides *what* a trade is lives here, *whether* something is missing
in ``operators/venue_gaps.py`` and *how long* to wait in ``operators/venue_outages.py``, so all of
it can be tested with plain dicts.

What ccxt hands over, and what we do with it (ccxt 4.5 conventions, checked against its
``parse_trade``/``parse_ws_trade`` for the five venues):

- ``amount``: for contract markets ccxt's unified amount is in *contracts*; ``market['contractSize']``
  converts a contract to base units (linear) or to quote units (inverse; ccxt's own ``safe_trade``
  uses ``amount * contractSize / price`` there). We apply that rule to every contract market, so
  the venues whose contract is not 1 base unit -- kucoinfutures (``multiplier``, e.g. 0.001 BTC
  for XBTUSDTM) and okx swaps (``ctVal``, e.g. 0.01 BTC for BTC-USDT-SWAP) -- come out in base
  units, and binanceusdm, bybit linear and hyperliquid (contractSize 1) are unchanged.
- ``side``: for public trades ccxt's ``side`` is already the taker (aggressor) side on all five
  venues (binance derives it from ``m`` reversed, bybit ``S``, okx ``side``, kucoin ``side``,
  hyperliquid ``side`` A/B). ``takerOrMaker`` in a *public* trade does not describe the taker:
  binance's REST parser sets it from "was the buyer the maker". So we never flip the side on it.
- ``cost`` is recomputed as ``price * amount`` (quote notional) because ccxt's cost is in base
  currency for inverse markets.
- ``trader``: only hyperliquid publishes addresses: ``info['users'] == [buyer, seller]``; the
  trader is the taker's address (buyer when side is buy, else seller).

>>> t = normalise("okx", {"id": "7", "timestamp": 1718870412348, "symbol": "BTC/USDT:USDT",
...     "side": "buy", "price": 60000.0, "amount": 3.0, "info": {}},
...     {"symbol": "BTC/USDT:USDT", "contract": True, "linear": True, "contractSize": 0.01}, 0)
>>> round(t.amount, 10), round(t.cost, 6)
(0.03, 1800.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from operators.records import MIN_TS_MS, Trade


def parse_symbols(spec: str) -> dict[str, list[str]]:
    """``"binanceusdm:BTC/USDT:USDT,ETH/USDT:USDT;bybit:BTC/USDT:USDT"`` -> {exchange: [symbols]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        ex, sep, syms = part.partition(":")
        if not sep or not syms:
            raise ValueError(f"expected 'exchange:SYM1,SYM2' in {part!r}")
        out.setdefault(ex.strip(), []).extend(s.strip() for s in syms.split(",") if s.strip())
    if not out:
        raise ValueError("no exchange:symbols given")
    return out


def instrument_key(exchange: str, symbol: str) -> str:
    """The instrument key used everywhere downstream: ``"exchange:symbol"``."""
    return f"{exchange}:{symbol}"


# ---------------------------------------------------------------------------------------------
# normalisation


def normalise(exchange_id: str, ccxt_trade: Any, market: Optional[dict], recv_ts: int) -> Union[Trade, str]:
    """One ccxt unified trade -> a contract ``Trade``, or a reason string ``"<code>: <detail>"``.

    ``code`` is one of ``operators.decode.DEAD_LETTER_REASONS`` or ``bad_market`` /
    ``not_a_trade``. Never raises on bad data.
    """
    if not isinstance(ccxt_trade, dict):
        return f"not_a_trade: expected a ccxt trade dict, got {type(ccxt_trade).__name__}"
    t = ccxt_trade
    market = market if isinstance(market, dict) else {}
    symbol = t.get("symbol") or market.get("symbol")
    if not symbol or not isinstance(symbol, str):
        return "missing_field: symbol"

    tid = t.get("id")
    if isinstance(tid, bool) or tid is None or tid == "":
        return "missing_field: id"
    if isinstance(tid, float):
        if not tid.is_integer():
            return f"wrong_type: id must be a string or integer, got {tid!r}"
        tid = int(tid)
    if not isinstance(tid, (str, int)):
        return f"wrong_type: id must be a string or integer, got {type(tid).__name__}"
    tid = str(tid)

    ts = _as_int_ms(t.get("timestamp"))
    if isinstance(ts, str):
        return ts
    if ts < MIN_TS_MS:
        return f"ts_out_of_range: timestamp={ts} is before 2010 (seconds instead of ms?)"

    price = _as_positive_float("price", t.get("price"))
    if isinstance(price, str):
        return price
    amount = _as_positive_float("amount", t.get("amount"))
    if isinstance(amount, str):
        return amount

    side = t.get("side")
    side = side.lower() if isinstance(side, str) else side
    if side not in ("buy", "sell"):
        return f"unknown_side: side must be 'buy' or 'sell', got {t.get('side')!r}"

    base_amount = to_base_amount(amount, price, market)
    if isinstance(base_amount, str):
        return base_amount

    trader = taker_address(exchange_id, t.get("info"), side)
    return Trade(exchange=exchange_id, symbol=symbol, id=tid, ts=ts, price=price, amount=base_amount,
                 side=side, cost=price * base_amount, trader=trader, recv_ts=recv_ts)


def to_base_amount(amount: float, price: float, market: dict) -> Union[float, str]:
    """ccxt amount -> base units: contracts * contractSize (linear), * contractSize / price
    (inverse: contractSize is in quote units there). Spot or contractSize 1: unchanged."""
    is_contract = bool(market.get("contract") or market.get("swap") or market.get("future"))
    if not is_contract:
        return amount
    cs = market.get("contractSize")
    try:
        cs = float(cs)
    except (TypeError, ValueError):
        return f"bad_market: contract market {market.get('symbol')!r} has no usable contractSize ({cs!r})"
    if not math.isfinite(cs) or cs <= 0:
        return f"bad_market: contract market {market.get('symbol')!r} has contractSize {cs!r}"
    if market.get("inverse"):
        return amount * cs / price
    return amount * cs


def taker_address(exchange_id: str, info: Any, side: str) -> Optional[str]:
    """The taker's address where the venue publishes one (hyperliquid: users = [buyer, seller])."""
    if exchange_id != "hyperliquid" or not isinstance(info, dict):
        return None
    users = info.get("users")
    if not isinstance(users, (list, tuple)) or len(users) != 2:
        return None
    addr = users[0] if side == "buy" else users[1]
    return addr if isinstance(addr, str) and addr else None


def reason_code(reason: str) -> str:
    """``"non_positive: ..."`` -> ``"non_positive"``."""
    return reason.split(":", 1)[0]


def _as_int_ms(v: Any) -> Union[int, str]:
    if v is None or v == "":
        return "missing_field: timestamp"
    if isinstance(v, bool):
        return f"wrong_type: timestamp must be integer ms, got {v!r}"
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer():
            return int(v)
        return f"wrong_type: timestamp must be integer ms, got {v!r}"
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return f"wrong_type: timestamp must be integer ms, got {v!r}"


def _as_positive_float(name: str, v: Any) -> Union[float, str]:
    if v is None or v == "":
        return f"missing_field: {name}"
    if isinstance(v, bool):
        return f"wrong_type: {name} must be a number, got {v!r}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return f"wrong_type: {name} must be a number, got {v!r}"
    if not math.isfinite(x):
        return f"non_finite: {name}={v!r}"
    if x <= 0:
        return f"non_positive: {name}={v!r} must be > 0"
    return x


@dataclass(frozen=True)
class RejectedTrade:
    """A ccxt trade ``normalise`` refused (the ccxt path's counterpart of a dead letter)."""

    instrument: str
    reason: str
    payload: str


