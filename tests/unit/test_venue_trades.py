"""operators/venue_trades.py: ccxt -> Trade normalisation on recorded-style payloads of the five venues."""

from __future__ import annotations

import copy
import math

import pytest

from operators.decode import DEAD_LETTER_REASONS
from operators.records import Trade
from operators.venue_trades import normalise, reason_code

RECV = 1_718_870_413_000


def _market(mid, symbol, base, quote, contract_size, *, linear=True, **extra):
    """A ccxt unified market (the fields normalisation and ccxt's parsers read)."""
    return {
        "id": mid, "symbol": symbol, "base": base, "quote": quote, "settle": quote if linear else base,
        "baseId": base, "quoteId": quote, "type": "swap", "spot": False, "margin": False, "swap": True,
        "future": False, "option": False, "active": True, "contract": True, "linear": linear,
        "inverse": not linear, "contractSize": contract_size, "expiry": None, "expiryDatetime": None,
        "strike": None, "optionType": None, "precision": {"amount": 1.0, "price": 0.1}, "limits": {},
        "info": {}, **extra,
    }


# -- recorded-style ccxt unified trades, each with its venue's raw message in 'info' ------------
# (what ccxt.pro 4.5 returns from watch_trades for these messages; test_fixtures_match_ccxt_parsers
# re-derives the unified fields from 'info' with ccxt's own parsers)

MARKETS = {
    # KuCoin futures: size is in lots; XBTUSDTM multiplier 0.001 BTC
    "kucoinfutures": _market("XBTUSDTM", "BTC/USDT:USDT", "BTC", "USDT", 0.001),
    "binanceusdm": _market("BTCUSDT", "BTC/USDT:USDT", "BTC", "USDT", 1.0, lowercaseId="btcusdt"),
    "bybit": _market("BTCUSDT", "BTC/USDT:USDT", "BTC", "USDT", 1.0),
    # OKX swaps: sz is in contracts; BTC-USDT-SWAP ctVal 0.01 BTC
    "okx": _market("BTC-USDT-SWAP", "BTC/USDT:USDT", "BTC", "USDT", 0.01),
    "hyperliquid": _market("0", "BTC/USDC:USDC", "BTC", "USDC", 1.0, baseName="BTC"),
}
OKX_INVERSE_MARKET = _market("BTC-USD-SWAP", "BTC/USD:BTC", "BTC", "USD", 100.0, linear=False)

_NO_FEE = {"cost": None, "currency": None}

FIXTURES = {
    # /contractMarket/execution:XBTUSDTM  (ts in ns)
    "kucoinfutures": {
        "info": {"makerUserId": "6287c3015c27f000017d0c2f", "symbol": "XBTUSDTM", "sequence": 85342071,
                 "side": "sell", "size": 12, "price": "67012.3", "takerOrderId": "6673e18c3a9bc900074e5f21",
                 "makerOrderId": "6673e17f2c6e8b0001a3d4b7", "takerUserId": "6372c3f1a2d4ec0001b8e2ad",
                 "tradeId": "6673e18c1d6e2800013b7c4e", "ts": 1718870412345678900},
        "id": "6673e18c1d6e2800013b7c4e", "order": None, "timestamp": 1718870412345,
        "datetime": "2024-06-20T08:00:12.345Z", "symbol": "BTC/USDT:USDT", "type": None, "takerOrMaker": None,
        "side": "sell", "price": 67012.3, "amount": 12.0, "cost": 804.1476, "fee": _NO_FEE, "fees": [],
    },
    # btcusdt@aggTrade (m=true: the buyer was the maker, so the taker sold)
    "binanceusdm": {
        "info": {"e": "aggTrade", "E": 1718870412350, "a": 2270914331, "s": "BTCUSDT", "p": "67011.90",
                 "q": "0.125", "f": 5079412001, "l": 5079412003, "T": 1718870412346, "m": True},
        "timestamp": 1718870412346, "datetime": "2024-06-20T08:00:12.346Z", "symbol": "BTC/USDT:USDT",
        "id": "2270914331", "order": None, "type": None, "side": "sell", "takerOrMaker": None,
        "price": 67011.9, "amount": 0.125, "cost": 8376.4875, "fee": _NO_FEE, "fees": [],
    },
    # publicTrade.BTCUSDT (S = taker side, i = execId UUID)
    "bybit": {
        "id": "7f5d3c1e-8a4b-5e2f-9c0d-1b2a3e4f5a6b",
        "info": {"T": 1718870412347, "s": "BTCUSDT", "S": "Buy", "v": "0.042", "p": "67012.40", "L": "PlusTick",
                 "i": "7f5d3c1e-8a4b-5e2f-9c0d-1b2a3e4f5a6b", "BT": False, "RPI": False, "seq": 252874196421},
        "timestamp": 1718870412347, "datetime": "2024-06-20T08:00:12.347Z", "symbol": "BTC/USDT:USDT",
        "order": None, "type": None, "side": "buy", "takerOrMaker": None, "price": 67012.4, "amount": 0.042,
        "cost": 2814.5208, "fee": _NO_FEE, "fees": [],
    },
    # trades channel: one message per taker order and price; tradeId = last id, count = fills
    "okx": {
        "info": {"instId": "BTC-USDT-SWAP", "tradeId": "1394851207", "px": "67013.1", "sz": "37", "side": "buy",
                 "ts": "1718870412348", "count": "3", "source": "0", "seqId": 41720349812},
        "timestamp": 1718870412348, "datetime": "2024-06-20T08:00:12.348Z", "symbol": "BTC/USDT:USDT",
        "id": "1394851207", "order": None, "type": None, "takerOrMaker": None, "side": "buy", "price": 67013.1,
        "amount": 37.0, "cost": 24794.847, "fee": _NO_FEE, "fees": [],
    },
    # trades channel: side B = the taker bought; users = [buyer, seller]
    "hyperliquid": {
        "info": {"coin": "BTC", "side": "B", "px": "67015.0", "sz": "0.01532", "time": 1718870412349,
                 "hash": "0x3f1e9a0c5b7d2e4f6a8c0e1b3d5f7a9c1e3b5d7f9a1c3e5b7d9f1a3c5e7b9d1f",
                 "tid": 902375812644135,
                 "users": ["0x5b5d51203a0f9079f8aeb098a6523a13f298c060",
                           "0x010461c14e146ac35fe42271bdc1134ee31c703a"]},
        "timestamp": 1718870412349, "datetime": "2024-06-20T08:00:12.349Z", "symbol": "BTC/USDC:USDC",
        "id": "902375812644135", "order": None, "type": None, "side": "buy", "takerOrMaker": None,
        "price": 67015.0, "amount": 0.01532, "cost": 1026.6698, "fee": _NO_FEE, "fees": [],
    },
}

# OKX inverse swap: 20 contracts of 100 USD
OKX_INVERSE = {
    "info": {"instId": "BTC-USD-SWAP", "tradeId": "712093384", "px": "67010.5", "sz": "20", "side": "sell",
             "ts": "1718870412352", "count": "1", "source": "0", "seqId": 20419437713},
    "timestamp": 1718870412352, "datetime": "2024-06-20T08:00:12.352Z", "symbol": "BTC/USD:BTC",
    "id": "712093384", "order": None, "type": None, "takerOrMaker": None, "side": "sell", "price": 67010.5,
    "amount": 20.0, "cost": 0.029846069, "fee": _NO_FEE, "fees": [],
}

# Hyperliquid, taker sold (side A)
HYPERLIQUID_SELL = {
    "info": {"coin": "BTC", "side": "A", "px": "67014.0", "sz": "0.5", "time": 1718870412355,
             "hash": "0x0000000000000000000000000000000000000000000000000000000000000000",
             "tid": 614523970112388,
             "users": ["0x31ca8395cf837de08b24da3f660e77761dfb974b",
                       "0xecb63caa47c7c4e77f60f1ce858cf28dc2b82b00"]},
    "timestamp": 1718870412355, "datetime": "2024-06-20T08:00:12.355Z", "symbol": "BTC/USDC:USDC",
    "id": "614523970112388", "order": None, "type": None, "side": "sell", "takerOrMaker": None,
    "price": 67014.0, "amount": 0.5, "cost": 33507.0, "fee": _NO_FEE, "fees": [],
}

# (amount in base units, side, trader) each venue's fixture must normalise to
EXPECTED = {
    "kucoinfutures": (0.012, "sell", None),  # 12 lots x 0.001 BTC
    "binanceusdm": (0.125, "sell", None),
    "bybit": (0.042, "buy", None),
    "okx": (0.37, "buy", None),  # 37 contracts x 0.01 BTC
    "hyperliquid": (0.01532, "buy", "0x5b5d51203a0f9079f8aeb098a6523a13f298c060"),  # the buyer
}


@pytest.mark.parametrize("venue", sorted(FIXTURES))
def test_normalise_each_venue(venue):
    raw = copy.deepcopy(FIXTURES[venue])
    t = normalise(venue, raw, MARKETS[venue], RECV)
    assert isinstance(t, Trade), t
    amount, side, trader = EXPECTED[venue]
    assert t.exchange == venue
    assert t.symbol == raw["symbol"]
    assert t.id == str(raw["id"]) and isinstance(t.id, str)
    assert t.ts == raw["timestamp"] and isinstance(t.ts, int)
    assert t.price == raw["price"]
    assert t.amount == pytest.approx(amount, rel=1e-12)
    assert t.side == side
    assert t.cost == pytest.approx(t.price * amount, rel=1e-12)
    assert t.trader == trader
    assert t.recv_ts == RECV
    assert raw == FIXTURES[venue]  # input untouched


def test_contract_size_venues_convert_contracts_to_base_units():
    # the same ccxt amount means different base quantities depending on contractSize
    ku = normalise("kucoinfutures", FIXTURES["kucoinfutures"], MARKETS["kucoinfutures"], RECV)
    okx = normalise("okx", FIXTURES["okx"], MARKETS["okx"], RECV)
    assert FIXTURES["kucoinfutures"]["amount"] == 12.0 and ku.amount == pytest.approx(0.012)
    assert FIXTURES["okx"]["amount"] == 37.0 and okx.amount == pytest.approx(0.37)
    # the notional equals what ccxt computed with contractSize (linear)
    assert ku.cost == pytest.approx(FIXTURES["kucoinfutures"]["cost"])
    assert okx.cost == pytest.approx(FIXTURES["okx"]["cost"])


def test_inverse_contracts_are_quote_units_divided_by_price():
    t = normalise("okx", OKX_INVERSE, OKX_INVERSE_MARKET, RECV)
    assert t.amount == pytest.approx(20 * 100 / 67010.5)  # 2000 USD of BTC
    assert t.cost == pytest.approx(2000.0)  # quote notional, not ccxt's base-currency cost
    assert t.side == "sell"


def test_spot_market_amount_is_unchanged():
    spot = {"symbol": "BTC/USDT", "spot": True, "contract": False, "contractSize": None}
    raw = dict(FIXTURES["bybit"], symbol="BTC/USDT")
    assert normalise("bybit", raw, spot, RECV).amount == 0.042


def test_hyperliquid_trader_is_the_takers_address():
    buy = normalise("hyperliquid", FIXTURES["hyperliquid"], MARKETS["hyperliquid"], RECV)
    sell = normalise("hyperliquid", HYPERLIQUID_SELL, MARKETS["hyperliquid"], RECV)
    assert buy.trader == FIXTURES["hyperliquid"]["info"]["users"][0]
    assert sell.side == "sell" and sell.trader == HYPERLIQUID_SELL["info"]["users"][1]
    # malformed users: the trade stays, without a trader
    odd = copy.deepcopy(HYPERLIQUID_SELL)
    odd["info"]["users"] = ["0xonlyone"]
    t = normalise("hyperliquid", odd, MARKETS["hyperliquid"], RECV)
    assert isinstance(t, Trade) and t.trader is None
    # other venues never get a trader, even with a users-like field
    by = copy.deepcopy(FIXTURES["bybit"])
    by["info"]["users"] = ["0xa", "0xb"]
    assert normalise("bybit", by, MARKETS["bybit"], RECV).trader is None


def test_taker_or_maker_in_public_trades_does_not_flip_the_side():
    # ccxt's side is already the taker side; binance's takerOrMaker describes the buyer
    raw = dict(FIXTURES["binanceusdm"], takerOrMaker="maker")
    assert normalise("binanceusdm", raw, MARKETS["binanceusdm"], RECV).side == "sell"


def test_integer_ids_and_float_timestamps_are_normalised():
    raw = dict(FIXTURES["bybit"], id=123456789, timestamp=1718870412347.0, side="BUY")
    t = normalise("bybit", raw, MARKETS["bybit"], RECV)
    assert t.id == "123456789" and t.ts == 1718870412347 and type(t.ts) is int and t.side == "buy"


@pytest.mark.parametrize("change, code", [
    ({"price": None}, "missing_field"),
    ({"id": None}, "missing_field"),
    ({"id": ""}, "missing_field"),
    ({"timestamp": None}, "missing_field"),
    ({"price": "abc"}, "wrong_type"),
    ({"timestamp": 1718870412.5}, "wrong_type"),
    ({"timestamp": "soon"}, "wrong_type"),
    ({"id": 1.5}, "wrong_type"),
    ({"amount": float("nan")}, "non_finite"),
    ({"price": float("inf")}, "non_finite"),
    ({"amount": -1.0}, "non_positive"),
    ({"price": 0}, "non_positive"),
    ({"side": "unknown"}, "unknown_side"),
    ({"side": None}, "unknown_side"),
    ({"timestamp": 1718870412}, "ts_out_of_range"),  # seconds, not ms
])
def test_malformed_trades_give_a_reason_instead_of_raising(change, code):
    raw = dict(FIXTURES["binanceusdm"], **change)
    r = normalise("binanceusdm", raw, MARKETS["binanceusdm"], RECV)
    assert isinstance(r, str) and reason_code(r) == code, r
    assert code in DEAD_LETTER_REASONS


def test_not_a_dict_and_bad_market_are_reasons_too():
    assert reason_code(normalise("okx", None, MARKETS["okx"], RECV)) == "not_a_trade"
    assert reason_code(normalise("okx", ["x"], MARKETS["okx"], RECV)) == "not_a_trade"
    for cs in (None, 0, -1, "abc", float("nan")):
        r = normalise("okx", FIXTURES["okx"], dict(MARKETS["okx"], contractSize=cs), RECV)
        assert reason_code(r) == "bad_market", (cs, r)
    no_symbol = {k: v for k, v in FIXTURES["okx"].items() if k != "symbol"}
    assert reason_code(normalise("okx", no_symbol, None, RECV)) == "missing_field"


def test_fixtures_match_ccxt_parsers():
    """The unified fields of every fixture are what ccxt itself derives from its 'info'."""
    import ccxt.pro as ccxtpro

    def parsers(ex):
        return {
            "kucoinfutures": ex.parse_trade, "okx": ex.parse_trade,
            "binanceusdm": getattr(ex, "parse_ws_trade", None), "bybit": getattr(ex, "parse_ws_trade", None),
            "hyperliquid": getattr(ex, "parse_ws_trade", None),
        }[ex.id]

    cases = [(v, FIXTURES[v], MARKETS[v]) for v in FIXTURES] + [("okx", OKX_INVERSE, OKX_INVERSE_MARKET)]
    for venue, fixture, market in cases:
        ex = getattr(ccxtpro, venue)()  # offline: no session is opened for parsing
        ex.set_markets([market])
        parsed = parsers(ex)(copy.deepcopy(fixture["info"]), market)
        for k in ("id", "timestamp", "symbol", "side", "price", "amount"):
            assert parsed[k] == fixture[k], (venue, k, parsed[k], fixture[k])
        assert parsed["cost"] == pytest.approx(fixture["cost"]), venue


def test_nan_safety_of_costs():
    t = normalise("okx", FIXTURES["okx"], MARKETS["okx"], RECV)
    assert math.isfinite(t.cost) and t.cost > 0
