"""Venue perp data: ccxt funding-rate, open-interest and liquidation structures -> ``PerpUpdate``.

Each normaliser returns an ``operators.perp.PerpUpdate`` or a reason string
``"<code>: <kind>: <detail>"`` (like ``operators.venue_trades.normalise`` for trades: the caller
turns a refusal into a ``RejectedTrade``, i.e. a dead letter, never a silent drop). Pure: no I/O,
no ccxt import, no bytewax.

What ccxt hands over (ccxt 4.5 unified structures) and what we take:

- funding rate (``fetch_funding_rate`` / ``watch_funding_rate``): ``fundingRate`` (required),
  ``fundingTimestamp`` (when that rate is paid; else ``fundingDatetime``, else
  ``nextFundingTimestamp``), ``markPrice``, ``indexPrice``, ``timestamp``.
- open interest (``fetch_open_interest``): ``openInterestAmount`` is in *contracts* (okx: ``oi``,
  kucoinfutures: lots), so base units are ``openInterestAmount x contractSize`` on linear markets
  (binanceusdm, bybit and hyperliquid have contractSize 1, okx and kucoinfutures do not);
  inverse markets count contracts in quote units, so there the amount is a quote value and the
  base amount is only ccxt's ``baseVolume`` when given. ``openInterestValue`` is the quote value.
- liquidation (``watch_liquidations`` / ``fetch_liquidations``): ``price``, ``contracts``
  (converted to base units like a trade's amount, ``operators.venue_trades.to_base_amount``), else
  ``baseValue``, else ``amount`` (base), else ``quoteValue / price``; ``side`` is the
  liquidation ORDER's side in ``PerpUpdate`` ("sell": a long was liquidated). binanceusdm's
  ``forceOrder`` ``S`` and okx's ``details[].side`` are order sides; bybit's liquidation streams
  publish the *position* side ("Buy": a long was liquidated), which ccxt passes through, so it is
  flipped (``LIQUIDATION_SIDE_IS_POSITION``); "long" / "short" mean the position on any venue.

Times: a structure without ``timestamp`` (okx and hyperliquid funding, hyperliquid open interest)
is stamped with ``recv_ts``, the time it was received. Every update then passes
``operators.perp.problem`` (finite positive prices, |rate| <= 10%, ts after 2010, ...); how far
ahead of now a ts may be is the pipeline's check (``max_future_ms``).

>>> u = normalise_liquidation("bybit", {"symbol": "BTC/USDT:USDT", "price": 60000.0, "contracts": 0.5,
...     "side": "buy", "timestamp": 1718870412348}, {"contract": True, "linear": True, "contractSize": 1.0}, 0)
>>> u.side, u.amount, u.notional   # bybit "Buy" = a long liquidated = a sell order
('sell', 0.5, 30000.0)
"""

from __future__ import annotations

import math
from datetime import datetime
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from operators.perp import PerpUpdate, problem
from operators.records import MIN_TS_MS
from operators.venue_trades import to_base_amount

#: Venues whose liquidation ``side`` (as ccxt passes it on) is the liquidated POSITION's side,
#: not the forced order's: bybit v5 ``liquidation`` / ``allLiquidation`` ("Buy": a long position
#: was liquidated).
LIQUIDATION_SIDE_IS_POSITION: Mapping[str, bool] = MappingProxyType({"bybit": True})

_MAX_TS = 2**62  # the future bound is the pipeline's (max_future_ms); here only units are checked

Result = Union[PerpUpdate, str]


class _Refused(Exception):
    """Internal: the reason an input cannot be used (``"<code>: <detail>"``)."""


def normalise_funding(exchange_id: str, raw: Any, market: Optional[dict], recv_ts: int,
                      source: Optional[str] = None) -> Result:
    """A ccxt funding-rate structure -> a ``funding`` PerpUpdate, or a reason string."""
    return _guard("funding", exchange_id, raw, market, recv_ts, source, _funding)


def normalise_open_interest(exchange_id: str, raw: Any, market: Optional[dict], recv_ts: int,
                            source: Optional[str] = None) -> Result:
    """A ccxt open-interest structure -> an ``open_interest`` PerpUpdate, or a reason string."""
    return _guard("open_interest", exchange_id, raw, market, recv_ts, source, _open_interest)


def normalise_liquidation(exchange_id: str, raw: Any, market: Optional[dict], recv_ts: int,
                          source: Optional[str] = None) -> Result:
    """A ccxt liquidation structure -> a ``liquidation`` PerpUpdate, or a reason string."""
    return _guard("liquidation", exchange_id, raw, market, recv_ts, source, _liquidation)


#: kind -> normaliser (the feed's dispatch)
NORMALISERS: Mapping[str, Callable[..., Result]] = MappingProxyType({
    "funding": normalise_funding, "open_interest": normalise_open_interest, "liquidation": normalise_liquidation})


def _guard(kind: str, exchange_id: str, raw: Any, market: Optional[dict], recv_ts: int, source: Optional[str],
           build: Callable[..., dict]) -> Result:
    """Common frame: shape and symbol checks, the kind's fields, then ``perp.problem``. Never raises
    on bad data."""
    what = kind.replace("_", " ")
    if not isinstance(raw, dict):
        return f"wrong_type: {kind}: expected a ccxt {what} dict, got {type(raw).__name__}"
    market = market if isinstance(market, dict) else {}
    symbol = raw.get("symbol") or market.get("symbol")
    if not symbol or not isinstance(symbol, str):
        return f"missing_field: {kind}: symbol"
    try:
        fields = build(exchange_id, raw, market)
        ts = _ms("timestamp", raw.get("timestamp"))
    except _Refused as err:
        code, _, detail = str(err).partition(": ")
        return f"{code}: {kind}: {detail}"
    u = PerpUpdate(kind=kind, exchange=exchange_id, symbol=symbol, ts=recv_ts if ts is None else ts,
                   source=source if source is not None else f"ccxt:{exchange_id}", **fields)
    bad = problem(u, MIN_TS_MS, _MAX_TS)
    if bad is not None:
        return f"{bad[0]}: {kind}: {bad[1]}"
    return u


def _funding(exchange_id: str, raw: dict, market: dict) -> dict:
    rate = _num("fundingRate", raw.get("fundingRate"))
    if rate is None:
        raise _Refused("missing_field: fundingRate")
    when = _ms("fundingTimestamp", raw.get("fundingTimestamp"))
    if when is None:
        when = _iso_ms("fundingDatetime", raw.get("fundingDatetime"))
    if when is None:
        when = _ms("nextFundingTimestamp", raw.get("nextFundingTimestamp"))
    return {"rate": rate, "funding_time": when, "mark_price": _num("markPrice", raw.get("markPrice")),
            "index_price": _num("indexPrice", raw.get("indexPrice"))}


def _open_interest(exchange_id: str, raw: dict, market: dict) -> dict:
    contracts = _num("openInterestAmount", raw.get("openInterestAmount"))
    value = _num("openInterestValue", raw.get("openInterestValue"))
    base = _num("baseVolume", raw.get("baseVolume"))
    if contracts is not None and _is_contract(market):
        size = _contract_size(market)
        if market.get("inverse"):  # contracts of a quote amount: a value, not base units
            value = contracts * size if value is None else value
        else:
            base = contracts * size
    elif contracts is not None:
        base = contracts
    if base is None and value is None:
        raise _Refused("missing_field: openInterestAmount or openInterestValue")
    return {"open_interest": base, "oi_value": value}


def _liquidation(exchange_id: str, raw: dict, market: dict) -> dict:
    price = _num("price", raw.get("price"))
    if price is None:
        raise _Refused("missing_field: price")
    if price <= 0:
        raise _Refused(f"non_positive: price={raw.get('price')!r} must be > 0")
    side = liquidation_order_side(exchange_id, raw.get("side"))
    contracts = _num("contracts", raw.get("contracts"))
    if contracts is not None:
        amount = to_base_amount(contracts, price, market)
        if isinstance(amount, str):
            raise _Refused(amount)
    else:
        amount = _num("baseValue", raw.get("baseValue"))
        if amount is None:
            amount = _num("amount", raw.get("amount"))
        if amount is None:
            quote = _num("quoteValue", raw.get("quoteValue"))
            amount = quote / price if quote is not None else None
        if amount is None:
            raise _Refused("missing_field: contracts, baseValue, amount or quoteValue")
    return {"side": side, "price": price, "amount": amount}


def liquidation_order_side(exchange_id: str, side: Any) -> str:
    """ccxt's liquidation ``side`` on ``exchange_id`` -> the forced order's side ("buy" / "sell")."""
    s = side.strip().lower() if isinstance(side, str) else side
    if s in ("long", "short"):  # the liquidated position
        return "sell" if s == "long" else "buy"
    if s in ("buy", "sell"):
        if LIQUIDATION_SIDE_IS_POSITION.get(exchange_id):
            return "sell" if s == "buy" else "buy"
        return s
    raise _Refused(f"unknown_side: side must be buy/sell/long/short, got {side!r}")


def _is_contract(market: dict) -> bool:
    return bool(market.get("contract") or market.get("swap") or market.get("future"))


def _contract_size(market: dict) -> float:
    cs = market.get("contractSize")
    try:
        size = float(cs)
    except (TypeError, ValueError):
        raise _Refused(f"bad_market: contract market {market.get('symbol')!r} has no usable contractSize "
                       f"({cs!r})") from None
    if not math.isfinite(size) or size <= 0:
        raise _Refused(f"bad_market: contract market {market.get('symbol')!r} has contractSize {cs!r}")
    return size


def _num(name: str, v: Any) -> Optional[float]:
    """An optional number (ccxt gives floats, sometimes numeric strings); None when absent."""
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise _Refused(f"wrong_type: {name} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise _Refused(f"wrong_type: {name} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise _Refused(f"non_finite: {name}={v!r}")
    return x


def _ms(name: str, v: Any) -> Optional[int]:
    """Optional integer milliseconds (an int, an integral float or a digit string)."""
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise _Refused(f"wrong_type: {name} must be integer ms, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    raise _Refused(f"wrong_type: {name} must be integer ms, got {v!r}")


def _iso_ms(name: str, v: Any) -> Optional[int]:
    """Optional ISO 8601 time (ccxt's ``...Datetime`` fields, UTC) -> ms."""
    if v is None or v == "":
        return None
    try:
        dt = datetime.fromisoformat(v) if isinstance(v, str) else None
    except ValueError:
        dt = None
    if dt is None or dt.tzinfo is None:
        raise _Refused(f"wrong_type: {name} must be an ISO 8601 time with a zone, got {v!r}")
    return round(dt.timestamp() * 1000)
