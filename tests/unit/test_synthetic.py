"""Unit tests for operators/synthetic.py: a seeded, resumable tape with regimes, sweeps and heavy
tails, on the tick grid."""

from __future__ import annotations

import numpy as np
import pytest

from operators import synthetic as syn

T0 = 1_704_067_200_000
MIN = 60_000
BTC = syn.spec_for("BTC/USDT:USDT", rate=1.0)
COLS = ["ts", "id", "price", "amount", "is_buy", "offset"]


def same_tape(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_tape_other_seed_other_tape():
    a, sa = syn.generate(BTC, 7, T0, 30)
    b, sb = syn.generate(BTC, 7, T0, 30)
    c, _ = syn.generate(BTC, 8, T0, 30)
    assert sorted(a) == sorted(COLS)
    assert len(a["ts"]) > 500  # 1 order/s for 30 min, some of them several fills
    assert same_tape(a, b) and sa == sb
    assert not same_tape(a, c)
    # other symbols get their own stream even with the same seed
    e, _ = syn.generate(syn.spec_for("ETH/USDT:USDT", rate=1.0), 7, T0, 30)
    assert len(e["ts"]) != len(a["ts"]) or not np.array_equal(e["ts"], a["ts"])


@pytest.mark.parametrize("k", [1, 13, 29])
def test_resume_from_the_returned_state_continues_the_same_tape(k):
    whole, end_whole = syn.generate(BTC, 5, T0, 30)
    first, st = syn.generate(BTC, 5, T0, k)
    rest, end_rest = syn.generate(BTC, 5, T0, 30 - k, st)
    joined = {c: np.concatenate([first[c], rest[c]]) for c in COLS}
    assert same_tape(whole, joined)
    assert end_whole == end_rest
    assert st.minute == k and end_rest.minute == 30


def test_columns_are_consistent():
    cols, st = syn.generate(BTC, 1, T0, 20)
    n = len(cols["ts"])
    assert all(len(cols[c]) == n for c in COLS)
    assert np.array_equal(cols["id"], np.arange(1, n + 1))  # ids start at 1 and are consecutive
    assert np.array_equal(cols["offset"], np.arange(n))
    assert st.next_id == n + 1 and st.offset == n
    assert (np.diff(cols["ts"]) >= 0).all()  # time order
    assert cols["ts"].min() >= T0 and cols["ts"].max() < T0 + 20 * MIN
    minute = (cols["ts"] - T0) // MIN
    assert set(minute.tolist()) <= set(range(20))
    assert (cols["amount"] > 0).all() and (cols["price"] > 0).all()
    assert cols["is_buy"].dtype == bool and 0.2 < cols["is_buy"].mean() < 0.8


def test_all_three_regimes_occur_over_a_long_tape():
    spec = syn.spec_for("SOL/USDT:USDT", rate=0.05)  # few trades: the regime lives in the state
    st = syn.initial_state(spec)
    seen = []
    for _ in range(3_000):
        _, st = syn.generate_minute(spec, 11, T0, st)
        seen.append(st.regime)
    counts = np.bincount(seen, minlength=3)
    assert set(seen) == {syn.RANGE, syn.TREND, syn.VOLATILE}
    assert (counts > 50).all(), counts  # each one for a while, not a single blip
    # regimes are sticky: far fewer switches than minutes
    switches = sum(a != b for a, b in zip(seen, seen[1:]))
    assert 5 < switches < 200


def test_volatile_regime_is_more_active_and_more_volatile():
    spec = syn.spec_for("BTC/USDT:USDT", rate=0.5)
    st = syn.initial_state(spec)
    n_by, ret_by = {0: [], 1: [], 2: []}, {0: [], 1: [], 2: []}
    for _ in range(3_000):
        cols, nxt = syn.generate_minute(spec, 11, T0, st)
        n_by[nxt.regime].append(len(cols["ts"]))
        ret_by[nxt.regime].append(abs(np.log(nxt.price / st.price)))
        st = nxt
    assert np.mean(n_by[syn.VOLATILE]) > 1.5 * np.mean(n_by[syn.RANGE])
    assert np.mean(ret_by[syn.VOLATILE]) > 2 * np.mean(ret_by[syn.RANGE])


def _sweeps(cols, tick):
    """Runs of >= 3 consecutive fills with the same ts and side whose prices step by one tick
    away from the book (up for buys, down for sells)."""
    ts, buy, px = cols["ts"], cols["is_buy"], cols["price"]
    runs, i, n = [], 0, len(ts)
    while i < n:
        j = i
        while j + 1 < n and ts[j + 1] == ts[i] and buy[j + 1] == buy[i]:
            j += 1
        if j - i + 1 >= 3:
            step = np.diff(px[i:j + 1]) * (1 if buy[i] else -1)
            if np.allclose(step, tick, atol=tick * 1e-6):
                runs.append((i, j))
        i = j + 1
    return runs


def test_large_orders_sweep_several_price_levels():
    cols, _ = syn.generate(BTC, 3, T0, 60)
    runs = _sweeps(cols, BTC.tick)
    assert len(runs) >= 10
    # a sweep is one order split evenly: all fills of a run have the same amount
    for i, j in runs[:10]:
        assert np.allclose(cols["amount"][i:j + 1], cols["amount"][i])
    # and the bigger the order, the more levels: sweeps carry more than single fills
    in_sweep = np.zeros(len(cols["ts"]), bool)
    for i, j in runs:
        in_sweep[i:j + 1] = True
    order_size = {i: cols["amount"][i:j + 1].sum() for i, j in runs}
    assert np.median(list(order_size.values())) > 5 * np.median(cols["amount"][~in_sweep])


def test_trade_sizes_are_heavy_tailed():
    cols, _ = syn.generate(BTC, 4, T0, 60)
    amount = cols["amount"]
    assert amount.max() / np.median(amount) > 30
    # a Pareto-like tail: the top 1% carry a large share of the volume
    top = np.sort(amount)[-max(1, len(amount) // 100):]
    assert top.sum() / amount.sum() > 0.1
    assert amount.min() >= BTC.min_amount / 5 - 1e-12


@pytest.mark.parametrize("symbol", ["BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT", "DOGE/USDT:USDT"])
def test_prices_are_on_the_tick_grid(symbol):
    spec = syn.spec_for(symbol, rate=1.0)
    cols, _ = syn.generate(spec, 2, T0, 20)
    ticks = cols["price"] / spec.tick
    assert np.allclose(ticks, np.round(ticks), rtol=0, atol=1e-6)
    # and printed with no float noise: round-tripping through the tick's decimals changes nothing
    decimals = max(0, int(-np.floor(np.log10(spec.tick))) + 1)
    assert np.array_equal(np.round(cols["price"], decimals), cols["price"])
    # near the instrument's reference price after 20 minutes
    assert 0.8 * spec.price < np.median(cols["price"]) < 1.25 * spec.price


def test_spec_for_unknown_symbols_is_deterministic_and_rate_override():
    a, b = syn.spec_for("FOO/USDT:USDT"), syn.spec_for("FOO/USDT:USDT")
    assert a == b and a.price > 0 and a.tick > 0
    assert syn.spec_for("BTC/USDT:USDT").price == 60_000.0
    assert syn.spec_for("BTC/USDT:USDT", rate=3.0).rate == 3.0
