"""operators/venue_perp.py: ccxt funding-rate, open-interest and liquidation structures -> PerpUpdate,
or a reason string for anything unusable (never an exception, never a silent drop)."""

import math

import pytest

from operators.decode import DEAD_LETTER_REASONS
from operators.perp import PerpUpdate
from operators.venue_perp import (
    NORMALISERS,
    normalise_funding,
    normalise_liquidation,
    normalise_open_interest,
)
from operators.venue_trades import reason_code

BTC = "BTC/USDT:USDT"
TS = 1_718_870_412_348
RECV = 1_718_870_413_000
LINEAR = {"symbol": BTC, "contract": True, "swap": True, "linear": True, "inverse": False, "contractSize": 1.0}
OKX = {**LINEAR, "contractSize": 0.01}  # BTC-USDT-SWAP: one contract is 0.01 BTC
INVERSE = {"symbol": "BTC/USD:BTC", "contract": True, "swap": True, "linear": False, "inverse": True,
           "contractSize": 100.0}  # one contract is 100 USD


def funding(**kw):
    """A ccxt funding-rate structure as binanceusdm's fetch_funding_rate returns it."""
    return {"info": {}, "symbol": BTC, "markPrice": 60_010.5, "indexPrice": 60_000.0, "interestRate": 0.0001,
            "timestamp": TS, "datetime": "2024-06-20T08:00:12.348Z", "fundingRate": 0.0001,
            "fundingTimestamp": 1_718_899_200_000, "fundingDatetime": "2024-06-20T16:00:00.000Z",
            "nextFundingRate": None, "nextFundingTimestamp": None, **kw}


def oi(**kw):
    return {"info": {}, "symbol": BTC, "baseVolume": None, "quoteVolume": None, "openInterestAmount": 81_000.5,
            "openInterestValue": None, "timestamp": TS, "datetime": None, **kw}


def liq(**kw):
    """A ccxt liquidation structure as binanceusdm's watch_liquidations returns it (forceOrder)."""
    return {"info": {}, "symbol": BTC, "contracts": 0.25, "contractSize": 1.0, "price": 60_000.0, "side": "sell",
            "baseValue": 0.25, "quoteValue": 15_000.0, "timestamp": TS, "datetime": None, **kw}


# -- funding ---------------------------------------------------------------------------------------

def test_funding_rate_structure_becomes_a_funding_update():
    u = normalise_funding("binanceusdm", funding(), LINEAR, RECV)
    assert u == PerpUpdate(kind="funding", exchange="binanceusdm", symbol=BTC, ts=TS, rate=0.0001,
                           funding_time=1_718_899_200_000, mark_price=60_010.5, index_price=60_000.0,
                           source="ccxt:binanceusdm")
    assert u.seq is None  # placed among the trades by whoever receives it


def test_funding_time_falls_back_to_the_datetime_then_the_next_funding_time():
    u = normalise_funding("x", funding(fundingTimestamp=None), LINEAR, RECV)
    assert u.funding_time == 1_718_899_200_000  # from fundingDatetime
    u = normalise_funding("x", funding(fundingTimestamp=None, fundingDatetime=None,
                                       nextFundingTimestamp=1_718_928_000_000), LINEAR, RECV)
    assert u.funding_time == 1_718_928_000_000
    u = normalise_funding("x", funding(fundingTimestamp=None, fundingDatetime=None), LINEAR, RECV)
    assert u.funding_time is None and u.rate == 0.0001


def test_funding_without_a_timestamp_is_stamped_when_received_and_strings_are_numbers():
    # okx and hyperliquid funding have no timestamp; some parsers hand numbers over as strings
    u = normalise_funding("okx", funding(timestamp=None, fundingRate="-0.00025", markPrice=None,
                                         indexPrice="60000.1"), OKX, RECV)
    assert (u.ts, u.rate, u.mark_price, u.index_price) == (RECV, -0.00025, None, 60_000.1)


def test_funding_symbol_comes_from_the_market_when_the_structure_has_none():
    u = normalise_funding("x", funding(symbol=None), LINEAR, RECV)
    assert u.symbol == BTC
    assert normalise_funding("x", funding(symbol=None), None, RECV) == "missing_field: funding: symbol"


@pytest.mark.parametrize("raw, code, text", [
    (funding(fundingRate=None), "missing_field", "fundingRate"),
    (funding(fundingRate="n/a"), "wrong_type", "fundingRate must be a number"),
    (funding(fundingRate=True), "wrong_type", "fundingRate"),
    (funding(fundingRate=float("nan")), "non_finite", "fundingRate"),
    (funding(fundingRate=0.5), "wrong_type", "|rate| > 10%"),  # operators.perp.problem
    (funding(markPrice=0.0), "non_positive", "mark_price"),
    (funding(indexPrice=-1.0), "non_positive", "index_price"),
    (funding(markPrice=float("inf")), "non_finite", "markPrice"),
    (funding(timestamp=1_718_870_412), "ts_out_of_range", "outside"),  # seconds, not ms
    (funding(timestamp=1.5e12 + 0.5), "wrong_type", "timestamp must be integer ms"),
    (funding(timestamp="yesterday"), "wrong_type", "timestamp"),
    (funding(fundingTimestamp="soon"), "wrong_type", "fundingTimestamp"),
    (funding(fundingTimestamp=None, fundingDatetime="16:00"), "wrong_type", "fundingDatetime"),
    (["not", "a", "dict"], "wrong_type", "expected a ccxt funding dict"),
    (None, "wrong_type", "got NoneType"),
])
def test_malformed_funding_is_refused_with_a_reason(raw, code, text):
    got = normalise_funding("binanceusdm", raw, LINEAR, RECV)
    assert isinstance(got, str), got
    assert reason_code(got) == code and got.startswith(f"{code}: funding: ") and text in got


# -- open interest ---------------------------------------------------------------------------------

def test_open_interest_in_contracts_becomes_base_units():
    u = normalise_open_interest("binanceusdm", oi(openInterestValue=4.86e9), LINEAR, RECV)
    assert (u.kind, u.ts, u.open_interest, u.oi_value) == ("open_interest", TS, 81_000.5, 4.86e9)
    # okx: oi in contracts of 0.01 BTC (ccxt's baseVolume is oiCcy, the same in BTC)
    u = normalise_open_interest("okx", oi(openInterestAmount=2_800_476.0, baseVolume=28_004.76), OKX, RECV)
    assert u.open_interest == pytest.approx(28_004.76)


def test_open_interest_of_an_inverse_market_is_a_quote_value():
    u = normalise_open_interest("x", oi(openInterestAmount=1_000.0, symbol="BTC/USD:BTC"), INVERSE, RECV)
    assert (u.open_interest, u.oi_value) == (None, 100_000.0)
    u = normalise_open_interest("x", oi(openInterestAmount=1_000.0, openInterestValue=99_000.0, baseVolume=1.6,
                                        symbol="BTC/USD:BTC"), INVERSE, RECV)
    assert (u.open_interest, u.oi_value) == (1.6, 99_000.0)


def test_open_interest_value_alone_and_zero_are_usable():
    u = normalise_open_interest("x", oi(openInterestAmount=None, openInterestValue=1e6, timestamp=None), LINEAR, RECV)
    assert (u.ts, u.open_interest, u.oi_value) == (RECV, None, 1e6)
    assert normalise_open_interest("x", oi(openInterestAmount=0), LINEAR, RECV).open_interest == 0.0


@pytest.mark.parametrize("raw, market, code, text", [
    (oi(openInterestAmount=None), LINEAR, "missing_field", "openInterestAmount or openInterestValue"),
    (oi(openInterestAmount=-5.0), LINEAR, "non_finite", "open_interest -5.0"),  # perp.problem: >= 0
    (oi(openInterestAmount="lots"), LINEAR, "wrong_type", "openInterestAmount"),
    (oi(openInterestValue=float("nan")), LINEAR, "non_finite", "openInterestValue"),
    (oi(), {**LINEAR, "contractSize": None}, "bad_market", "contractSize"),
    (oi(), {**LINEAR, "contractSize": 0}, "bad_market", "contractSize"),
    (oi(timestamp=None, symbol=None), {}, "missing_field", "symbol"),
    ("81000", LINEAR, "wrong_type", "expected a ccxt open interest dict"),
])
def test_malformed_open_interest_is_refused_with_a_reason(raw, market, code, text):
    got = normalise_open_interest("x", raw, market, RECV)
    assert isinstance(got, str), got
    assert reason_code(got) == code and got.startswith(f"{code}: open_interest: ") and text in got


# -- liquidations ----------------------------------------------------------------------------------

def test_liquidation_becomes_an_update_with_the_forced_orders_side():
    u = normalise_liquidation("binanceusdm", liq(), LINEAR, RECV)
    assert u == PerpUpdate(kind="liquidation", exchange="binanceusdm", symbol=BTC, ts=TS, side="sell",
                           price=60_000.0, amount=0.25, source="ccxt:binanceusdm")
    assert u.notional == 15_000.0


def test_liquidation_sides_per_venue():
    # okx details[].side and binance's forceOrder S are the order's side
    assert normalise_liquidation("okx", liq(side="buy", contracts=3), OKX, RECV).side == "buy"
    assert normalise_liquidation("binanceusdm", liq(side="SELL"), LINEAR, RECV).side == "sell"
    # bybit publishes the liquidated position's side: "Buy" = a long was liquidated = a sell order
    assert normalise_liquidation("bybit", liq(side="buy"), LINEAR, RECV).side == "sell"
    assert normalise_liquidation("bybit", liq(side="sell"), LINEAR, RECV).side == "buy"
    # "long" / "short" name the position on any venue
    assert normalise_liquidation("x", liq(side="long"), LINEAR, RECV).side == "sell"
    assert normalise_liquidation("bybit", liq(side="short"), LINEAR, RECV).side == "buy"


def test_liquidation_amount_in_base_units_from_contracts_base_value_amount_or_quote_value():
    u = normalise_liquidation("okx", liq(contracts=13, baseValue=None), OKX, RECV)
    assert u.amount == pytest.approx(0.13)  # 13 contracts of 0.01 BTC
    u = normalise_liquidation("x", liq(contracts=300, symbol="BTC/USD:BTC"), INVERSE, RECV)
    assert u.amount == pytest.approx(300 * 100 / 60_000.0)  # inverse: contracts of 100 USD
    u = normalise_liquidation("x", liq(contracts=None, baseValue=0.4), LINEAR, RECV)
    assert u.amount == 0.4
    u = normalise_liquidation("x", liq(contracts=None, baseValue=None, amount="0.7"), LINEAR, RECV)
    assert u.amount == 0.7
    u = normalise_liquidation("x", liq(contracts=None, baseValue=None, quoteValue=30_000.0), LINEAR, RECV)
    assert u.amount == 0.5


@pytest.mark.parametrize("raw, code, text", [
    (liq(price=None), "missing_field", "price"),
    (liq(price=0), "non_positive", "price"),
    (liq(price="abc"), "wrong_type", "price"),
    (liq(side=None), "unknown_side", "None"),
    (liq(side="up"), "unknown_side", "'up'"),
    (liq(contracts=None, baseValue=None, quoteValue=None), "missing_field", "contracts, baseValue"),
    (liq(contracts=-1), "non_positive", "amount"),
    (liq(contracts=float("inf")), "non_finite", "contracts"),
    (liq(timestamp=False), "wrong_type", "timestamp"),
    (42, "wrong_type", "expected a ccxt liquidation dict"),
])
def test_malformed_liquidations_are_refused_with_a_reason(raw, code, text):
    got = normalise_liquidation("binanceusdm", raw, LINEAR, RECV)
    assert isinstance(got, str), got
    assert reason_code(got) == code and got.startswith(f"{code}: liquidation: ") and text in got


def test_reason_codes_are_dead_letter_reasons_or_the_ingest_ones():
    bad = [normalise_funding("x", funding(fundingRate=None), LINEAR, RECV),
           normalise_open_interest("x", oi(), {**LINEAR, "contractSize": None}, RECV),
           normalise_liquidation("x", liq(side="?"), LINEAR, RECV)]
    assert all(reason_code(r) in DEAD_LETTER_REASONS or reason_code(r) == "bad_market" for r in bad)
    assert set(NORMALISERS) == {"funding", "open_interest", "liquidation"}


def test_normalisers_never_raise_on_junk():
    junk = [None, 1, "x", [], {}, {"symbol": 5}, {"symbol": BTC, "timestamp": object()},
            {"symbol": BTC, "fundingRate": {}, "price": [], "contracts": object(), "side": 3,
             "openInterestAmount": math.nan}]
    for f in NORMALISERS.values():
        for raw in junk:
            assert isinstance(f("x", raw, LINEAR, RECV), (str, PerpUpdate))
