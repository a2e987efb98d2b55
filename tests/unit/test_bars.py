"""Unit tests for operators/bars.py, rollups.py and volume_profiles.py: one bar from a hand-made
tape, parent orders and cohorts, the value area, and roll-ups that equal a bar computed straight
from the trades.

Numbers are chosen so that every sum is exact in binary floating point (prices on a 0.5 grid,
amounts on a 0.25 grid) and worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from operators.bars import TIMEFRAMES, Bar, BarConfig, BarState, make_bar, tf_ms
from operators.rollups import RollupState, close_until, merge, rollup
from operators.volume_profiles import (
    PROFILE_MAX_BINS, Profile, add_profiles, default_bin, value_area,
)

T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
MIN = 60_000
SYM = "A/USDT:USDT"
CFG = BarConfig(profile_bins=((SYM, 1.0),))  # 1-unit price bins: bin index = floor(price)


def tape(rows, start=T0) -> pl.DataFrame:
    """rows: (ts offset ms, seq, price, amount, is_buy[, trader]) -> a chunk-like trade frame."""
    return pl.DataFrame(
        {
            "id": [str(r[1]) for r in rows],
            "ts": [start + r[0] for r in rows],
            "seq": [r[1] for r in rows],
            "price": [float(r[2]) for r in rows],
            "amount": [float(r[3]) for r in rows],
            "is_buy": [bool(r[4]) for r in rows],
            "trader": [r[5] if len(r) > 5 else None for r in rows],
            "recv_ts": [start + r[0] + 5 for r in rows],
        },
        schema={"id": pl.String, "ts": pl.Int64, "seq": pl.Int64, "price": pl.Float64, "amount": pl.Float64,
                "is_buy": pl.Boolean, "trader": pl.String, "recv_ts": pl.Int64},
    )


def bar_of(df, start=T0, length=MIN, state=None, cfg=CFG) -> Bar:
    return make_bar(df, "x", SYM, start, length, state if state is not None else BarState(), cfg)


# the hand-made minute; in (ts, seq) order:
#  #  ts     price  amt  side   notional   running delta   parent order
#  1  1000   100    2    buy    200          2             A (ts 1000, buy)   A = 200+101 = 301
#  2  1000   101    1    buy    101          3             A
#  3  5000    99    4    sell   396         -1             B (ts 5000, sell)  B = 396+98 = 494
#  4  5000    98    1    sell    98         -2             B
#  5  9000   102    0.5  sell    51         -2.5           C                  C = 51
#  6  20000  100.5  3    sell   301.5       -5.5           D                  D = 301.5
#  7  20000  103    1    buy    103         -4.5           E (side changed)   E = 103
#  8  30000  101.5  2    buy    203         -2.5           F                  F = 203
MINUTE = [
    (1_000, 1, 100.0, 2.0, True),
    (1_000, 2, 101.0, 1.0, True),
    (5_000, 3, 99.0, 4.0, False),
    (5_000, 4, 98.0, 1.0, False),
    (9_000, 5, 102.0, 0.5, False),
    (20_000, 6, 100.5, 3.0, False),
    (20_000, 7, 103.0, 1.0, True),
    (30_000, 8, 101.5, 2.0, True),
]


def test_ohlcv_delta_and_largest_trade_by_hand():
    b = bar_of(tape(MINUTE))
    assert (b.exchange, b.symbol, b.tf, b.start, b.end) == ("x", SYM, "1m", T0, T0 + MIN)
    assert (b.open, b.high, b.low, b.close) == (100.0, 103.0, 98.0, 101.5)
    assert b.volume == 14.5  # 2+1+4+1+0.5+3+1+2
    assert b.notional == 1453.5  # 200+101+396+98+51+301.5+103+203
    assert b.vwap == pytest.approx(1453.5 / 14.5, rel=1e-15)
    assert b.trades == 8
    assert (b.buy_volume, b.sell_volume) == (6.0, 8.5)
    assert b.delta == -2.5
    assert (b.min_delta, b.max_delta) == (-5.5, 3.0)
    assert (b.largest_trade, b.largest_notional) == (4.0, 396.0)


def test_shuffled_rows_give_the_same_bar():
    df = tape(MINUTE)
    want = bar_of(df)
    for seed in range(5):
        got = bar_of(df.sample(fraction=1.0, shuffle=True, seed=seed))
        assert got == want
    # and the order used is (ts, seq), not arrival: a reversed frame still opens at 100 and closes at 101.5
    rev = bar_of(df.reverse())
    assert (rev.open, rev.close, rev.min_delta, rev.max_delta) == (100.0, 101.5, -5.5, 3.0)


def test_same_ts_uses_seq_for_open_and_close():
    # both trades at the same ms: seq decides which is first
    df = tape([(500, 9, 50.0, 1.0, True), (500, 3, 40.0, 1.0, True), (900, 12, 45.0, 1.0, False),
               (900, 11, 47.0, 1.0, False)])
    b = bar_of(df)
    assert (b.open, b.close) == (40.0, 45.0)


def test_running_delta_extremes_do_not_include_zero():
    # all buys: running delta 1, 3, 6 -> min 1 (not 0); all sells: -1, -3 -> max -1 (not 0)
    up = bar_of(tape([(1, 1, 10.0, 1.0, True), (2, 2, 10.0, 2.0, True), (3, 3, 10.0, 3.0, True)]))
    assert (up.min_delta, up.max_delta, up.delta) == (1.0, 6.0, 6.0)
    down = bar_of(tape([(1, 1, 10.0, 1.0, False), (2, 2, 10.0, 2.0, False)]))
    assert (down.min_delta, down.max_delta, down.delta) == (-3.0, -1.0, -3.0)
    assert (down.buy_volume, down.sell_volume) == (0.0, 3.0)


def test_parent_orders_and_cohorts_by_hand():
    b = bar_of(tape(MINUTE))
    # orders A..F (see the table): 301 buy, 494 sell, 51 sell, 301.5 sell, 103 buy, 203 buy
    assert b.parent_orders == 6
    # sorted 51, 103, 203, 301, 301.5, 494
    # median (linear) = (203 + 301) / 2 = 252
    # p95: position 0.95 * 5 = 4.75 -> 301.5 + 0.75 * (494 - 301.5) = 445.875
    assert b.amateur_threshold == pytest.approx(252.0)
    assert b.pro_threshold == pytest.approx(445.875)
    # pros: 494 sell -> gross 494, net -494, S_top = -1
    assert (b.pro_orders, b.pros_gross, b.pros_net) == (1, 494.0, -494.0)
    assert b.s_top == -1.0
    # amateurs (<= 252): 51 sell, 103 buy, 203 buy -> gross 357, net 255, S_bot = 255/357
    assert (b.amateur_orders, b.amateurs_gross, b.amateurs_net) == (3, 357.0, 255.0)
    assert b.s_bot == pytest.approx(255 / 357)
    assert b.s_mood == pytest.approx(-1 - 255 / 357)


def test_parent_order_boundaries_ts_side_and_trader():
    rows = [
        (1_000, 1, 100.0, 1.0, True), (1_000, 2, 100.0, 2.0, True),  # one order: 300
        (1_000, 3, 100.0, 1.0, False),  # side changes: 100
        (2_000, 4, 100.0, 0.5, False),  # ts changes: 50
        (3_000, 5, 100.0, 1.0, True, "A"), (3_000, 6, 100.0, 1.0, True, "A"),  # trader A: 200
        (3_000, 7, 100.0, 1.5, True, "B"),  # trader changes: 150
        (4_000, 8, 100.0, 0.25, True), (4_000, 9, 100.0, 0.25, False), (4_000, 10, 100.0, 0.25, True),  # 25,25,25
    ]
    b = bar_of(tape(rows), cfg=BarConfig(profile_bins=((SYM, 1.0),), amateur_quantile=0.5, pro_quantile=0.9))
    # orders: 300, 100, 50, 200, 150, 25, 25, 25 -> 8 orders
    assert b.parent_orders == 8
    # sorted 25 25 25 50 100 150 200 300: median = (50 + 100) / 2 = 75
    # p90 position 0.9 * 7 = 6.3 -> 200 + 0.3 * 100 = 230
    assert b.amateur_threshold == pytest.approx(75.0)
    assert b.pro_threshold == pytest.approx(230.0)
    assert (b.pro_orders, b.pros_gross, b.pros_net) == (1, 300.0, 300.0)
    # amateurs: 50 sell, 25 buy, 25 sell, 25 buy -> gross 125, net -25
    assert (b.amateur_orders, b.amateurs_gross, b.amateurs_net) == (4, 125.0, -25.0)


def test_cohort_thresholds_come_from_the_rolling_history():
    st = BarState()
    b1 = bar_of(tape(MINUTE), state=st)
    assert b1.amateur_threshold == pytest.approx(252.0)
    # next minute: orders 1000 buy (100 x 10) and 50 sell (100 x 0.5)
    m2 = tape([(1_000, 1, 100.0, 10.0, True), (2_000, 2, 100.0, 0.5, False)], start=T0 + MIN)
    b2 = bar_of(m2, start=T0 + MIN, state=st)
    # pool = 51 103 203 301 301.5 494 (minute 1) + 1000 50 -> sorted 50 51 103 203 301 301.5 494 1000
    # median = (203 + 301) / 2 = 252; p95 position 0.95 * 7 = 6.65 -> 494 + 0.65 * 506 = 822.9
    assert b2.amateur_threshold == pytest.approx(252.0)
    assert b2.pro_threshold == pytest.approx(822.9)
    assert (b2.pros_gross, b2.pros_net, b2.s_top) == (1000.0, 1000.0, 1.0)
    assert (b2.amateurs_gross, b2.amateurs_net, b2.s_bot) == (50.0, -50.0, -1.0)
    assert b2.s_mood == 2.0
    # without the history the same minute would see only [50, 1000]: median 525
    alone = bar_of(m2, start=T0 + MIN)
    assert alone.amateur_threshold == pytest.approx(525.0)

    # an hour after minute 1 it leaves the window: pool = 1000, 50 (minute 2) + 200 (this one)
    m3 = tape([(1_000, 1, 100.0, 2.0, True)], start=T0 + 60 * MIN)
    b3 = bar_of(m3, start=T0 + 60 * MIN, state=st)
    # sorted 50 200 1000: median 200, p95 position 1.9 -> 200 + 0.9 * 800 = 920
    assert b3.amateur_threshold == pytest.approx(200.0)
    assert b3.pro_threshold == pytest.approx(920.0)
    assert (b3.pro_orders, b3.pros_gross, b3.s_top) == (0, 0.0, 0.0)  # no pros: S_top is 0, not NaN
    assert (b3.amateur_orders, b3.amateurs_net, b3.s_bot) == (1, 200.0, 1.0)
    assert b3.s_mood == -1.0


def test_cohort_pool_is_capped_oldest_bars_first():
    cfg = BarConfig(profile_bins=((SYM, 1.0),), cohort_max_orders=7)
    st = BarState()
    bar_of(tape(MINUTE), state=st, cfg=cfg)  # 6 orders
    m2 = tape([(1_000, 1, 100.0, 10.0, True), (2_000, 2, 100.0, 0.5, False)], start=T0 + MIN)
    b2 = bar_of(m2, start=T0 + MIN, state=st, cfg=cfg)
    # 6 + 2 orders would exceed the cap of 7: minute 1 goes, the pool is [50, 1000] -> median 525
    assert b2.amateur_threshold == pytest.approx(525.0)
    assert b2.pro_threshold == pytest.approx(50 + 0.95 * 950)


def test_pro_address_list_makes_a_small_order_pro():
    cfg = BarConfig(profile_bins=((SYM, 1.0),), pro_addresses=frozenset({"0xwhale"}))
    rows = [(1_000, 1, 100.0, 1.0, True), (2_000, 2, 100.0, 2.0, False), (3_000, 3, 100.0, 3.0, True),
            (4_000, 4, 100.0, 0.5, False, "0xwhale")]
    b = bar_of(tape(rows), cfg=cfg)
    # orders 100 buy, 200 sell, 300 buy, 50 sell (whale); sorted 50 100 200 300
    # median 150; p95 position 2.85 -> 200 + 0.85 * 100 = 285
    assert b.amateur_threshold == pytest.approx(150.0)
    assert b.pro_threshold == pytest.approx(285.0)
    # pros: 300 buy (by size) + 50 sell (by address) -> gross 350, net 250
    assert (b.pro_orders, b.pros_gross, b.pros_net) == (2, 350.0, 250.0)
    # amateurs: 100 buy only (the whale's 50 is pro, not amateur)
    assert (b.amateur_orders, b.amateurs_gross, b.amateurs_net) == (1, 100.0, 100.0)
    assert b.s_top == pytest.approx(250 / 350)
    assert b.s_mood == pytest.approx(250 / 350 - 1.0)


# ---------------------------------------------------------------------------------------------
# volume profile and value area


def va(bins: dict, fraction: float) -> tuple[int, int, int]:
    """value_area of a {bin index: volume} profile."""
    return value_area(Profile.from_dict(bins), fraction)


def reference_value_area(profile: dict, fraction: float) -> tuple[int, int, int]:
    """The value area as one bin-at-a-time loop (the implementation before it was vectorised):
    the reference the numpy version must match exactly."""
    lo_i, hi_i = min(profile), max(profile)
    vols = np.zeros(hi_i - lo_i + 1)
    for k, v in profile.items():
        vols[k - lo_i] = v
    poc = int(np.argmax(vols))
    target = fraction * vols.sum()
    lo = hi = poc
    inside = vols[poc]
    n = len(vols)
    while inside < target and (lo > 0 or hi < n - 1):
        up = vols[hi + 1] if hi < n - 1 else -1.0
        down = vols[lo - 1] if lo > 0 else -1.0
        if up >= down:
            hi += 1
            inside += up
        else:
            lo -= 1
            inside += down
    return poc + lo_i, hi + lo_i, lo + lo_i


def test_value_area_grows_towards_the_larger_side():
    # total 17, target 0.7 * 17 = 11.9; POC bin 2 (10); up 3 > down 2 -> add bin 3 -> 13 >= 11.9
    assert va({0: 1, 1: 2, 2: 10, 3: 3, 4: 1}, 0.7) == (2, 3, 2)
    # mirror image: grows down
    assert va({0: 1, 1: 3, 2: 10, 3: 2, 4: 1}, 0.7) == (2, 2, 1)
    # total 20, target 14: 6 -> add 5 (bin 13, larger than bin 11's 4) = 11 -> add 4 (bin 11 vs 1 above) = 15
    assert va({10: 1, 11: 4, 12: 6, 13: 5, 14: 1, 15: 3}, 0.7) == (12, 13, 11)


def test_value_area_ties():
    # POC tie: the lowest bin wins
    assert va({5: 4, 6: 1, 7: 4}, 0.3)[0] == 5
    # expansion tie: up wins. total 18, target 12.6: 10 -> (3 up vs 3 down) up -> 13
    assert va({0: 1, 1: 3, 2: 10, 3: 3, 4: 1}, 0.7) == (2, 3, 2)


def test_value_area_across_gaps_and_edges():
    # missing bins count as empty; at the top edge it can only grow down
    assert va({0: 2, 3: 1, 4: 8}, 0.9) == (4, 4, 0)  # 8 -> +1 (bin 3) = 9 -> +0 -> +0 -> +2 = 11 >= 9.9
    assert va({7: 5}, 0.7) == (7, 7, 7)
    # the whole profile when fraction is 1
    assert va({1: 1, 2: 1, 3: 5, 4: 1}, 1.0) == (3, 4, 1)


def test_value_area_equals_the_reference_loop_on_random_profiles():
    rng = np.random.default_rng(17)
    checked = 0
    for trial in range(3_000):
        n = int(rng.integers(1, 60 if trial % 2 else 400))
        if trial % 3 == 0:  # few distinct values: many ties, between sides and within one
            vols = rng.integers(0, 4, n).astype(float)
        else:  # real-valued volumes with gaps
            vols = rng.exponential(1.0, n) * (rng.random(n) < 0.8)
        profile = {int(k) - 50: float(vols[k]) for k in np.flatnonzero(vols)}
        if not profile:
            continue
        fraction = float(rng.choice([0.3, 0.5, 0.68, 0.7, 0.9, 1.0, rng.random()]))
        assert va(profile, fraction) == reference_value_area(profile, fraction), (profile, fraction)
        checked += 1
    assert checked > 2_500


def test_ordinary_bars_have_the_reference_value_area():
    # the bars of the roll-up tests, all three fractions: POC/VAH/VAL exactly as the loop gives them
    st = BarState()
    for m, f in enumerate(five_minutes(seed=11, minutes=30)):
        b = make_bar(f, "x", SYM, T0 + m * MIN, MIN, st, CFG)
        assert b.profile_scale == 1 and len(b.profile.vols) <= PROFILE_MAX_BINS
        assert (b.poc, b.vah, b.val) == reference_value_area(b.profile.to_dict(), CFG.value_area)


def test_bar_profile_poc_vah_val_by_hand():
    b = bar_of(tape(MINUTE))
    # bins of 1.0: 98:1  99:4  100:2+3=5  101:1+2=3  102:0.5  103:1; total 14.5, target 10.15
    assert b.profile.to_dict() == {98: 1.0, 99: 4.0, 100: 5.0, 101: 3.0, 102: 0.5, 103: 1.0}
    assert b.profile_bin == 1.0 and not b.profile_coarse
    # POC 100 (5); down 4 > up 3 -> 9; up 3 > down 1 -> 12 >= 10.15
    assert (b.poc, b.vah, b.val) == (100.0, 101.0, 99.0)


def test_default_bin_is_a_power_of_ten_near_the_given_bps():
    # 2 bps of 60000 = 12 -> 10; of 3000 = 0.6 -> 1; of 150 = 0.03 -> 0.01 (log10 0.03 = -1.52)
    assert default_bin(60_000.0, 2.0) == 10.0
    assert default_bin(3_000.0, 2.0) == 1.0
    assert default_bin(150.0, 2.0) == pytest.approx(0.01)
    # without an explicit bin make_bar uses the default for the first price, and keeps it
    st = BarState()
    b = make_bar(tape([(1, 1, 3_000.0, 1.0, True), (2, 2, 3_001.5, 1.0, True)]), "x", "E", T0, MIN, st, BarConfig())
    assert b.profile_bin == 1.0 and st.profile_bin == 1.0
    assert b.profile.to_dict() == {3000: 1.0, 3001: 1.0}


# ---------------------------------------------------------------------------------------------
# merge and roll-up


def five_minutes(seed=5, minutes=5, start=T0):
    """Per-minute trade frames on exact grids; minute 1 only buys, minute 3 only sells, so the
    running-delta extremes of the whole period are not those of any one minute."""
    rng = np.random.default_rng(seed)
    frames, seq = [], 0
    for m in range(minutes):
        n = int(rng.integers(6, 14))
        ts = np.sort(rng.integers(0, MIN, n))
        price = 100.0 + rng.integers(-12, 13, n) * 0.5
        amount = rng.integers(1, 12, n) * 0.25
        if m == 1:
            side = np.ones(n, bool)
        elif m == 3:
            side = np.zeros(n, bool)
        else:
            side = rng.random(n) < 0.5
        ts[2] = ts[1]  # a parent order of two fills
        side[2] = side[1]
        rows = [(int(ts[i]), seq + i, float(price[i]), float(amount[i]), bool(side[i])) for i in range(n)]
        seq += n
        frames.append(tape(rows, start=start + m * MIN))
    return frames


EXACT_FIELDS = ["open", "high", "low", "close", "volume", "notional", "vwap", "trades", "buy_volume", "sell_volume",
                "delta", "min_delta", "max_delta", "largest_trade", "largest_notional", "parent_orders", "poc",
                "vah", "val", "profile_bin", "profile"]


def test_a_5m_rollup_equals_the_bar_of_the_five_minutes_trades():
    frames = five_minutes()
    st, rs = BarState(), RollupState()
    ones, out = [], []
    for m, f in enumerate(frames):
        b = make_bar(f, "x", SYM, T0 + m * MIN, MIN, st, CFG)
        ones.append(b)
        got = rollup(rs, b, ["5m"], CFG.value_area)
        out.extend(got)
        assert (len(got) == 1) == (m == 4), "the 5m bar closes with its last minute, not before"
    (five,) = out
    ref = make_bar(pl.concat(frames), "x", SYM, T0, 5 * MIN, BarState(), CFG)
    assert (five.tf, five.start, five.end) == ("5m", T0, T0 + 5 * MIN)
    assert (ref.tf, ref.start, ref.end) == ("5m", T0, T0 + 5 * MIN)
    for f in EXACT_FIELDS:
        assert getattr(five, f) == getattr(ref, f), f
    # the test data make the running-delta merge matter
    assert five.min_delta != min(b.min_delta for b in ones) or five.max_delta != max(b.max_delta for b in ones)
    # cohorts add up over the sub-bars (each minute classified with its own rolling thresholds)
    for f in ("pro_orders", "amateur_orders", "pros_gross", "pros_net", "amateurs_gross", "amateurs_net"):
        assert getattr(five, f) == pytest.approx(sum(getattr(b, f) for b in ones)), f
    assert five.s_top == pytest.approx(sum(b.pros_net for b in ones) / sum(b.pros_gross for b in ones))
    assert five.s_bot == pytest.approx(sum(b.amateurs_net for b in ones) / sum(b.amateurs_gross for b in ones))
    assert five.s_mood == pytest.approx(five.s_top - five.s_bot)
    # the last sub-bar's thresholds are the period's
    assert (five.pro_threshold, five.amateur_threshold) == (ones[-1].pro_threshold, ones[-1].amateur_threshold)


def test_merge_of_two_hand_bars():
    a = bar_of(tape([(1, 1, 10.0, 2.0, True), (2, 2, 12.0, 1.0, False)]))  # deltas 2, 1
    b = bar_of(tape([(1, 3, 11.0, 4.0, False), (2, 4, 9.0, 1.0, True)], start=T0 + MIN), start=T0 + MIN)  # -4, -3
    m = merge(a, b, "5m", T0, T0 + 5 * MIN, 0.7)
    # running delta over both: 2, 1, -3, -2 -> min -3, max 2
    assert (m.min_delta, m.max_delta, m.delta) == (-3.0, 2.0, -2.0)
    assert (m.open, m.high, m.low, m.close) == (10.0, 12.0, 9.0, 9.0)
    assert (m.volume, m.notional, m.trades) == (8.0, 20.0 + 12.0 + 44.0 + 9.0, 4)
    assert m.vwap == pytest.approx(85.0 / 8.0)
    assert m.profile.to_dict() == {9: 1.0, 10: 2.0, 11: 4.0, 12: 1.0}
    # POC 11 (4); total 8, target 5.6: down (2) vs up (1) -> down: 6 >= 5.6
    assert (m.poc, m.vah, m.val) == (11.0, 11.0, 10.0)
    assert (m.tf, m.start, m.end) == ("5m", T0, T0 + 5 * MIN)
    # the inputs are not modified
    assert a.profile.to_dict() == {10: 2.0, 12: 1.0} and a.tf == "1m"


def test_merge_refuses_different_profile_bins():
    a = bar_of(tape([(1, 1, 10.0, 1.0, True)]))
    b = bar_of(tape([(1, 2, 10.0, 1.0, True)], start=T0 + MIN), start=T0 + MIN,
               cfg=BarConfig(profile_bins=((SYM, 0.5),)))
    with pytest.raises(ValueError, match="profile bin"):
        merge(a, b, "5m", T0, T0 + 5 * MIN, 0.7)


def test_a_wide_bar_coarsens_and_says_so():
    # a bad symbol mix: prices 150 and 60,061 in one instrument. Its bin is 2 bps of 150 -> 0.01,
    # so the bar would span bins 15,000 .. 6,006,100. Bins 10^3 wider still span 15 .. 6,006
    # (5,992 > 2,000); 10^4 wider: 1 .. 600 -> profile_bin 0.01 x 10^4 = 100.
    st = BarState()
    b = make_bar(tape([(1, 1, 150.0, 3.0, True), (2, 2, 60_061.0, 1.0, False), (3, 3, 151.0, 1.0, True)]),
                 "x", "MIX", T0, MIN, st, BarConfig())
    assert st.profile_bin == 0.01  # the instrument's bin stays the fine one
    assert (b.profile_bin, b.profile_scale, b.profile_coarse) == (100.0, 10_000, True)
    assert b.profile.to_dict() == {1: 4.0, 600: 1.0} and len(b.profile.vols) == 600
    # POC bin 1 (4 of 5 = 0.8 >= 0.7): 100.0 for all three
    assert (b.poc, b.vah, b.val) == (100.0, 100.0, 100.0)
    # the next ordinary minute of the same instrument uses the fine bin again
    b2 = make_bar(tape([(1, 4, 150.0, 1.0, True), (2, 5, 150.25, 1.0, True)], start=T0 + MIN),
                  "x", "MIX", T0 + MIN, MIN, st, BarConfig())
    assert (b2.profile_bin, b2.profile_scale, b2.profile_coarse) == (0.01, 1, False)


def test_the_coarsening_starts_just_above_the_bin_cap():
    # 1-unit bins: 1000 .. 2999 is exactly PROFILE_MAX_BINS bins; one more bin coarsens by 10
    fits = bar_of(tape([(1, 1, 1_000.0, 1.0, True), (2, 2, 2_999.5, 1.0, True)]))
    assert PROFILE_MAX_BINS == 2_000 and len(fits.profile.vols) == 2_000
    assert (fits.profile_bin, fits.profile_coarse) == (1.0, False)
    wide = bar_of(tape([(1, 1, 1_000.0, 1.0, True), (2, 2, 3_000.0, 2.0, True)]))
    assert (wide.profile_bin, wide.profile_scale, wide.profile_coarse) == (10.0, 10, True)
    assert wide.profile.to_dict() == {100: 1.0, 300: 2.0}
    # POC bin 300 holds 2 of 3 < 0.7: the value area grows down through the empty bins to bin 100
    assert (wide.poc, wide.vah, wide.val) == (3_000.0, 3_000.0, 1_000.0)


def test_add_profiles_rebins_the_finer_onto_the_coarser_grid():
    fine = Profile.from_dict({95: 1.0, 104: 2.0, 111: 3.0})  # 1-unit bins
    coarse = Profile.from_dict({9: 5.0, 12: 0.5})  # 10-unit bins
    # fine bin 95 -> 9, 104 -> 10, 111 -> 11
    got, scale = add_profiles(fine, 1, coarse, 10)
    assert scale == 10 and got.to_dict() == {9: 6.0, 10: 2.0, 11: 3.0, 12: 0.5}
    assert add_profiles(coarse, 10, fine, 1)[0] == got
    # two fine profiles whose union spans more than the cap: bins 0 .. 2500 -> 10x wider, 0 .. 250
    got, scale = add_profiles(Profile.from_dict({0: 1.0, 5: 1.0}), 1, Profile.from_dict({2_500: 4.0}), 1)
    assert scale == 10 and got.to_dict() == {0: 2.0, 250: 4.0}
    # the inputs are not modified
    assert fine.to_dict() == {95: 1.0, 104: 2.0, 111: 3.0} and coarse.to_dict() == {9: 5.0, 12: 0.5}


def rollup_vs_direct(frames):
    """The 5m roll-up of per-minute bars, and the bar made directly from all the trades."""
    st, rs = BarState(), RollupState()
    ones, out = [], []
    for m, f in enumerate(frames):
        ones.append(make_bar(f, "x", SYM, T0 + m * MIN, MIN, st, CFG))
        out.extend(rollup(rs, ones[-1], ["5m"], CFG.value_area))
    (five,) = out
    return ones, five, make_bar(pl.concat(frames), "x", SYM, T0, 5 * MIN, BarState(), CFG)


COARSE_FIELDS = EXACT_FIELDS + ["profile_scale", "profile_coarse"]


def test_rollup_of_coarse_and_fine_minutes_equals_the_direct_bar():
    frames = five_minutes(seed=3)
    # prices are 94 .. 106; minute 2 also trades at 4,000.5: bins 94 .. 4,000 are more than 2,000,
    # so that minute uses 10-unit bins
    frames[2] = pl.concat([frames[2], tape([(59_000, 900, 4_000.5, 0.75, True)], start=T0 + 2 * MIN)])
    ones, five, ref = rollup_vs_direct(frames)
    assert [b.profile_scale for b in ones] == [1, 1, 10, 1, 1]
    assert (ref.profile_bin, ref.profile_scale, ref.profile_coarse) == (10.0, 10, True)
    for f in COARSE_FIELDS:
        assert getattr(five, f) == getattr(ref, f), f
    assert five.profile.to_dict()[400] == 0.75 and five.vah >= five.poc >= five.val


def test_a_rollup_coarsens_when_its_merged_range_exceeds_the_cap():
    frames = five_minutes(seed=4)
    # prices are 94 .. 106; minute 1 also trades at 1.5 (bins 1 .. 106), minute 3 at 2,050 (bins
    # 94 .. 2,050: 1,957): each fits, but the five minutes span bins 1 .. 2,050: 10-unit bins 0 .. 205
    frames[1] = pl.concat([frames[1], tape([(59_000, 900, 1.5, 0.5, True)], start=T0 + MIN)])
    frames[3] = pl.concat([frames[3], tape([(59_000, 901, 2_050.0, 0.25, False)], start=T0 + 3 * MIN)])
    ones, five, ref = rollup_vs_direct(frames)
    assert [b.profile_scale for b in ones] == [1, 1, 1, 1, 1]
    assert (five.profile_bin, five.profile_scale, five.profile_coarse) == (10.0, 10, True)
    assert (five.profile.lo, five.profile.hi) == (0, 205)
    for f in COARSE_FIELDS:
        assert getattr(five, f) == getattr(ref, f), f


def test_merge_with_a_genuinely_different_instrument_bin_still_refuses():
    a = bar_of(tape([(1, 1, 10.0, 1.0, True)]))  # bin 1
    b = bar_of(tape([(1, 2, 10.0, 1.0, True)], start=T0 + MIN), start=T0 + MIN,
               cfg=BarConfig(profile_bins=((SYM, 3.0),)))  # bin 3: not a power of ten of 1
    with pytest.raises(ValueError, match="profile bin"):
        merge(a, b, "5m", T0, T0 + 5 * MIN, 0.7)


def test_rollup_of_15_minutes_into_5m_and_15m():
    frames = five_minutes(seed=9, minutes=15)
    st, rs = BarState(), RollupState()
    closed = []
    for m, f in enumerate(frames):
        got = rollup(rs, make_bar(f, "x", SYM, T0 + m * MIN, MIN, st, CFG), ["5m", "15m"], 0.7)
        closed.append([(b.tf, b.start) for b in got])
    assert closed[4] == [("5m", T0)]
    assert closed[9] == [("5m", T0 + 5 * MIN)]
    assert closed[14] == [("5m", T0 + 10 * MIN), ("15m", T0)]  # same end: shorter first
    assert all(c == [] for i, c in enumerate(closed) if i not in (4, 9, 14))
    assert rs.open == {}


def test_rollup_closes_a_period_when_a_later_minute_arrives_and_close_until():
    frames = five_minutes(seed=2, minutes=8)
    st, rs = BarState(), RollupState()
    bars = {m: make_bar(frames[m], "x", SYM, T0 + m * MIN, MIN, st, CFG) for m in (0, 1, 2, 7)}
    for m in (0, 1, 2):
        assert rollup(rs, bars[m], ["5m", "15m"], 0.7) == []
    # minutes 3 and 4 were quiet; minute 7 belongs to the next 5m period
    got = rollup(rs, bars[7], ["5m", "15m"], 0.7)
    assert [(b.tf, b.start, b.end) for b in got] == [("5m", T0, T0 + 5 * MIN)]
    ref = make_bar(pl.concat(frames[:3]), "x", SYM, T0, 5 * MIN, BarState(), CFG)
    for f in EXACT_FIELDS:
        assert getattr(got[0], f) == getattr(ref, f), f
    assert set(rs.open) == {"5m", "15m"}
    assert rs.open["5m"].start == T0 + 5 * MIN and rs.open["15m"].start == T0
    assert rs.last_end == T0 + 8 * MIN

    # close_until: nothing ends at or before T0 + 10m - 1
    assert close_until(rs, T0 + 10 * MIN - 1, 0.7) == []
    done = close_until(rs, T0 + 10 * MIN, 0.7)
    assert [(b.tf, b.start) for b in done] == [("5m", T0 + 5 * MIN)]
    assert done[0].volume == bars[7].volume and done[0].open == bars[7].open
    # a period of one minute has that minute's value area
    assert (done[0].poc, done[0].vah, done[0].val) == (bars[7].poc, bars[7].vah, bars[7].val)
    assert set(rs.open) == {"15m"}
    done = close_until(rs, 2**62, 0.7)  # EOF
    assert [(b.tf, b.start, b.end) for b in done] == [("15m", T0, T0 + 15 * MIN)]
    ref15 = make_bar(pl.concat([frames[m] for m in (0, 1, 2, 7)]), "x", SYM, T0, 15 * MIN, BarState(), CFG)
    for f in EXACT_FIELDS:
        assert getattr(done[0], f) == getattr(ref15, f), f
    assert rs.open == {}


def test_close_until_orders_by_end_then_timeframe():
    rs = RollupState()
    st = BarState()
    b = make_bar(five_minutes(minutes=1)[0], "x", SYM, T0, MIN, st, CFG)
    rollup(rs, b, ["1h", "5m", "15m"], 0.7)
    done = close_until(rs, 2**62, 0.7)
    assert [x.tf for x in done] == ["5m", "15m", "1h"]
    assert [x.end for x in done] == [T0 + 5 * MIN, T0 + 15 * MIN, T0 + 60 * MIN]


def test_timeframe_names():
    assert tf_ms("5m") == 300_000 and tf_ms("1d") == 86_400_000
    assert set(TIMEFRAMES) == {"1m", "5m", "15m", "1h", "4h", "1d"}
    with pytest.raises(ValueError, match="7m"):
        tf_ms("7m")
