"""operators.risk: exit levels, intrabar exit checks (stop first), guards and their pauses."""

import copy
import json
import pickle

import pytest

from operators.records import DAY_MS
from operators.risk import (
    RiskEvent, RiskState, check_exit, drawdown, nearest, next_utc_day, stop_levels, target_levels,
    time_stop_due, trailing_active, utc_day,
)
from operators.strategy_config import StrategyConfig

# ---------------------------------------------------------------- helpers
T0 = 19_675 * DAY_MS  # 2023-11-14 00:00 UTC
OFF = dict(stop_loss_pct=0.0, take_profit_pct=0.0, trailing_activation_pct=0.0, trailing_distance_pct=0.0,
           atr_sl_mult=0.0, atr_tp_mult=0.0, time_stop_bars=0)


def cfg(**kw):
    return StrategyConfig(**{**OFF, **kw})


def bar_exit(c, side, entry, best, o, h, l, atr=None):
    return check_exit(c, side, entry, best, atr, o, h, l)


# ---------------------------------------------------------------- levels
def test_stop_loss_is_measured_from_entry_not_peak():
    c = cfg(stop_loss_pct=0.15)
    assert stop_levels(c, 1, 100.0, 200.0, None) == [("stop_loss", pytest.approx(85.0))]
    # up 100%, then down 15% from the peak (200 -> 170): no stop
    assert bar_exit(c, 1, 100.0, 200.0, 180.0, 181.0, 170.0) is None
    # down 15% from entry: stopped at 85
    hit = bar_exit(c, 1, 100.0, 100.0, 95.0, 96.0, 85.0)
    assert hit.reason == "stop_loss" and hit.price == pytest.approx(85.0)
    # shorts mirror it
    hit = bar_exit(c, -1, 100.0, 50.0, 110.0, 115.0, 109.0)
    assert hit.reason == "stop_loss" and hit.price == pytest.approx(115.0)


def test_trailing_stop_activates_then_trails_the_peak():
    c = cfg(trailing_activation_pct=0.10, trailing_distance_pct=0.05)
    assert not trailing_active(c, 1, 100.0, 109.0)
    assert stop_levels(c, 1, 100.0, 109.0, None) == []
    assert bar_exit(c, 1, 100.0, 109.0, 101.0, 102.0, 90.0) is None      # not active: no stop at all
    assert trailing_active(c, 1, 100.0, 120.0)
    assert bar_exit(c, 1, 100.0, 120.0, 118.0, 119.0, 114.5) is None      # 120 * 0.95 = 114
    hit = bar_exit(c, 1, 100.0, 120.0, 118.0, 119.0, 113.9)
    assert hit.reason == "trailing_stop" and hit.price == pytest.approx(114.0)
    # short: trough 80 (activated at <= 90), stop at 84
    hit = bar_exit(c, -1, 100.0, 80.0, 82.0, 84.5, 81.0)
    assert hit.reason == "trailing_stop" and hit.price == pytest.approx(84.0)


def test_nearest_stop_is_in_force():
    c = cfg(stop_loss_pct=0.02, atr_sl_mult=2.0, trailing_activation_pct=0.01, trailing_distance_pct=0.005)
    lv = stop_levels(c, 1, 100.0, 103.0, atr=0.5)
    assert dict(lv) == {"stop_loss": pytest.approx(98.0), "atr_stop": pytest.approx(99.0),
                        "trailing_stop": pytest.approx(102.485)}
    assert nearest(lv, 1, "stop")[0] == "trailing_stop"
    assert nearest(stop_levels(c, -1, 100.0, 100.0, atr=0.5), -1, "stop") == ("atr_stop", pytest.approx(101.0))
    tg = target_levels(cfg(take_profit_pct=0.04, atr_tp_mult=3.0), 1, 100.0, atr=0.5)
    assert nearest(tg, 1, "target") == ("atr_take_profit", pytest.approx(101.5))


def test_take_profit_and_atr_exits():
    c = cfg(take_profit_pct=0.03)
    hit = bar_exit(c, 1, 100.0, 100.0, 101.0, 103.5, 100.5)
    assert hit.reason == "take_profit" and hit.price == pytest.approx(103.0)
    c = cfg(atr_sl_mult=2.0, atr_tp_mult=3.0)
    assert bar_exit(c, 1, 100.0, 100.0, 100.0, 101.0, 99.5, atr=0.4) is None     # levels 99.2 / 101.2
    hit = bar_exit(c, 1, 100.0, 100.0, 100.0, 101.0, 99.1, atr=0.4)
    assert hit.reason == "atr_stop" and hit.price == pytest.approx(99.2)
    hit = bar_exit(c, 1, 100.0, 100.0, 100.0, 101.3, 99.5, atr=0.4)
    assert hit.reason == "atr_take_profit" and hit.price == pytest.approx(101.2)
    assert bar_exit(c, 1, 100.0, 100.0, 100.0, 200.0, 1.0, atr=None) is None      # no ATR: no ATR exits


def test_same_bar_ambiguity_resolves_stop_first():
    c = cfg(stop_loss_pct=0.02, take_profit_pct=0.02)
    hit = bar_exit(c, 1, 100.0, 100.0, 100.0, 103.0, 97.0)
    assert hit.reason == "stop_loss" and hit.price == pytest.approx(98.0)
    hit = bar_exit(c, -1, 100.0, 100.0, 100.0, 103.0, 97.0)
    assert hit.reason == "stop_loss" and hit.price == pytest.approx(102.0)


def test_gap_through_a_level_fills_at_the_open():
    c = cfg(stop_loss_pct=0.02, take_profit_pct=0.02)
    hit = bar_exit(c, 1, 100.0, 100.0, 95.0, 104.0, 94.0)     # opened below the stop
    assert hit.reason == "stop_loss" and hit.price == 95.0 and hit.level == pytest.approx(98.0)
    hit = bar_exit(c, 1, 100.0, 100.0, 105.0, 106.0, 97.0)    # opened above the target: the open came first
    assert hit.reason == "take_profit" and hit.price == 105.0


def test_time_stop_in_primary_bars():
    c = cfg(time_stop_bars=3)
    assert not time_stop_due(c, T0, T0 + 14 * 60_000, 300_000)
    assert time_stop_due(c, T0, T0 + 15 * 60_000, 300_000)
    assert not time_stop_due(cfg(), T0, T0 + 10**9, 300_000)


# ---------------------------------------------------------------- guards
def test_day_helpers_and_drawdown():
    assert utc_day(T0 + 5) == 19_675 and next_utc_day(T0 + 5) == T0 + DAY_MS
    assert next_utc_day(T0) == T0 + DAY_MS
    assert drawdown(90.0, 100.0) == pytest.approx(0.1) and drawdown(110.0, 100.0) == 0.0


def test_kill_switch_trips_once_and_holds_until_reset():
    c = cfg(daily_loss_limit=0.0)
    r = RiskState(peak=10_000.0)
    r.advance(T0, 10_000.0)
    assert r.on_mark(c, T0 + 60_000, 10_500.0) == [] and r.peak == 10_500.0
    assert r.on_mark(c, T0 + 120_000, 9_500.0) == []                     # 9.5% down from 10,500
    trips = r.on_mark(c, T0 + 180_000, 9_450.0)                          # 10.0%
    assert [(t.kind, t.reason) for t in trips] == [("kill_switch", "drawdown_limit")]
    assert r.halted and r.blocked(T0 + 10 * DAY_MS) == ["drawdown_limit"]
    assert r.on_mark(c, T0 + 240_000, 9_400.0) == []                     # no second event
    r.advance(T0 + 2 * DAY_MS, 9_400.0)
    assert r.blocked(T0 + 2 * DAY_MS) == ["drawdown_limit"]             # a new day does not lift it
    detail = r.reset(T0 + 2 * DAY_MS, 9_400.0)
    assert detail["old_peak"] == 10_500.0 and detail["new_peak"] == 9_400.0
    assert not r.halted and r.blocked(T0 + 2 * DAY_MS) == [] and r.peak == 9_400.0


def test_daily_loss_limit_pauses_until_next_utc_day():
    c = cfg(max_drawdown=0.0)
    r = RiskState(peak=10_000.0)
    r.advance(T0 + 3_600_000, 10_000.0)
    assert r.on_mark(c, T0 + 3_660_000, 9_710.0) == []                   # -2.9%
    trips = r.on_mark(c, T0 + 3_720_000, 9_690.0)                        # -3.1%
    assert trips[0].kind == "daily_loss_limit" and trips[0].detail["paused_until"] == T0 + DAY_MS
    assert r.blocked(T0 + DAY_MS - 1) == ["daily_loss_limit"]
    ends = r.advance(T0 + DAY_MS, 9_690.0)
    assert [(t.kind, t.reason) for t in ends] == [("pause_end", "daily_loss_limit")]
    assert r.blocked(T0 + DAY_MS) == [] and r.day_start_equity == 9_690.0


def test_mark_at_midnight_pauses_the_day_it_closes():
    r = RiskState(peak=10_000.0)
    r.advance(T0 - 60_000, 10_000.0)
    trips = r.on_mark(cfg(), T0, 9_000.0, day_ts=T0 - 60_000)           # bar 23:59-00:00
    assert any(t.kind == "daily_loss_limit" and t.detail["paused_until"] == T0 for t in trips)


def test_consecutive_losses_pause_until_next_day_and_a_win_resets_the_count():
    c = cfg()
    r = RiskState(peak=10_000.0)
    t = T0 + 3_600_000
    for i in range(4):
        assert r.on_trade_closed(c, t + i, "x:A", -1.0) == []
    assert r.on_trade_closed(c, t + 4, "x:A", 2.0) == [] and r.consecutive_losses == 0
    for i in range(4):
        r.on_trade_closed(c, t + 10 + i, "x:A", -1.0)
    trips = r.on_trade_closed(c, t + 20, "x:B", -1.0)
    assert [(x.kind, x.detail["losses"]) for x in trips] == [("consecutive_losses", 5)]
    assert r.blocked(t + 21) == ["consecutive_losses"] and r.paused_until == T0 + DAY_MS
    r.advance(T0 + DAY_MS, 10_000.0)
    assert r.blocked(T0 + DAY_MS) == []


def test_cooldown_counts_primary_bars_after_an_exit():
    c = cfg(cooldown_bars=2)
    r = RiskState(peak=1.0)
    r.on_trade_closed(c, T0, "x:A", 1.0)
    assert r.in_cooldown(c, "x:A", T0 + 9 * 60_000, 300_000)
    assert not r.in_cooldown(c, "x:A", T0 + 10 * 60_000, 300_000)
    assert not r.in_cooldown(c, "x:B", T0 + 60_000, 300_000)


def test_risk_state_and_event_are_plain_data():
    r = RiskState(peak=5.0)
    r.on_trade_closed(cfg(), T0, "x:A", -1.0)
    assert pickle.loads(pickle.dumps(r)) == r and copy.deepcopy(r) == r
    e = RiskEvent(origin="production", strategy_id="s", variant_id="v", config_hash="h", ts=T0, kind="kill_switch",
                  reason="drawdown_limit", detail=json.dumps({"drawdown": 0.11}))
    ev = e.as_event()
    assert ev.kind == "kill_switch" and ev.reason == "drawdown_limit" and ev.source == "strategy:s/v"
    assert json.loads(ev.detail) == {"drawdown": 0.11, "origin": "production", "strategy_id": "s",
                                     "variant_id": "v", "config_hash": "h"}
