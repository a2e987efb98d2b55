"""operators.strategy: the engine end to end on hand-built scored rows and 1m bars.

One test per acceptance point of the decisions issue (1-9), then exits, determinism and
snapshot round trips."""

import copy
import pickle

import msgspec
import numpy as np
import pytest

from operators.bars import Bar
from operators.decision import Decision
from operators.paper import EquityPoint, Fill, PaperBook
from operators.records import MINUTES_PER_YEAR
from operators.risk import RiskEvent
from operators.signals import Prediction, ScoredRow
from operators.stats import sharpe, simple_returns
from operators.strategy import StrategyEngine
from operators.strategy_config import StrategyConfig

# ---------------------------------------------------------------- helpers
DAY = 86_400_000
M, P = 60_000, 300_000
T0 = 19_675 * DAY + 3_600_000            # 2023-11-14 01:00 UTC
EX, SYM = "binanceusdm", "BTC/USDT:USDT"
NO_EXITS = dict(stop_loss_pct=0.0, take_profit_pct=0.0, trailing_activation_pct=0.0, trailing_distance_pct=0.0,
                atr_sl_mult=0.0, atr_tp_mult=0.0, time_stop_bars=0, exit_on_opposite=False)


def pred(p_up, p_down, model="river_lr"):
    return Prediction(model=model, version="t", p_down=p_down, p_flat=1.0 - p_up - p_down, p_up=p_up)


LONG = {"river_lr": pred(0.80, 0.10)}     # confidence 0.8, alpha 0.7
SHORT = {"river_lr": pred(0.10, 0.80)}


def row(end, *, preds=None, s_top=None, s_bot=None, rv=0.5, atr=None, trend=None, close=100.0, symbol=SYM,
        warm=True, tf="5m", overlay_ok=None):
    features = {"s_top_ema": s_top, "s_bot_ema": s_bot, "rv": rv, "atr": atr, "1h_ret_12": trend}
    return ScoredRow(exchange=EX, symbol=symbol, tf=tf, start=end - P, end=end, close=close, warm=warm,
                     regime="RANGING", features=features, overlay_ok=overlay_ok or {"1h": True},
                     predictions=dict(preds or {}))


def bar(start, o, h=None, l=None, c=None, symbol=SYM):
    h = max(o, c or o) if h is None else h
    l = min(o, c or o) if l is None else l
    c = o if c is None else c
    return Bar(exchange=EX, symbol=symbol, tf="1m", start=start, end=start + M, open=o, high=h, low=l, close=c,
               volume=1.0, notional=o, vwap=o, trades=1, buy_volume=0.5, sell_volume=0.5, delta=0.0, min_delta=0.0,
               max_delta=0.0, largest_trade=1.0, largest_notional=o, parent_orders=1, pro_orders=0,
               amateur_orders=0, pros_gross=0.0, pros_net=0.0, amateurs_gross=0.0, amateurs_net=0.0, s_top=0.0,
               s_bot=0.0, s_mood=0.0, pro_threshold=0.0, amateur_threshold=0.0, poc=o, vah=o, val=o,
               profile_bin=1.0)


def cfg(**kw):
    base = dict(NO_EXITS, fee_bps=0.0, slippage_bps=0.0, cooldown_bars=0)
    base.update(kw)
    return StrategyConfig(**base)


def of(records, cls):
    return [r for r in records if isinstance(r, cls)]


class Run:
    """An engine plus everything it emitted."""

    def __init__(self, c, **kw):
        self.e = StrategyEngine(c, **kw)
        self.records = []

    def score(self, r, quality=None):
        out = self.e.on_scored(r, quality, now_ms=r.end + 7)
        self.records += out
        decisions = of(out, Decision)
        assert len(decisions) == 1
        return decisions[0]

    def bars(self, *bs):
        out = []
        for b in bs:
            out += self.e.on_bar(b)
        self.records += out
        return out

    def open_long(self, t, price=100.0, preds=LONG, **row_kw):
        d = self.score(row(t, preds=preds, **row_kw))
        assert d.action in ("open_long", "open_short"), d
        fills = of(self.bars(bar(t, price, symbol=row_kw.get("symbol", SYM))), Fill)
        assert len(fills) == 1 and fills[0].reason == "entry"
        return fills[0]


# ---------------------------------------------------------------- 1) confidence gates
def test_1_model_trade_below_conf_min_is_vetoed_with_a_reason():
    r = Run(cfg())
    d = r.score(row(T0, preds={"river_lr": pred(0.62, 0.30)}))
    assert d.action == "none" and d.arm == "" and d.notional == 0.0
    assert d.reason == "no_eligible_arm" and "conf_below_min" in d.vetoes
    model = next(a for a in d.arms if a.arm == "model_online")
    assert not model.eligible and model.reasons == ("conf_below_min",) and model.value == pytest.approx(0.62)
    assert not r.e.book.pending
    # in high volatility CONF_MIN is 0.70: 0.68 passes at rv 0.5 and is vetoed at rv 1.2
    hv = Run(cfg()).score(row(T0, preds={"river_lr": pred(0.68, 0.2)}, rv=1.2))
    assert hv.action == "none" and hv.conf_min == pytest.approx(0.70) and "conf_below_min" in hv.vetoes
    assert Run(cfg()).score(row(T0, preds={"river_lr": pred(0.68, 0.2)}, rv=0.5)).action == "open_long"


def test_1_cohort_trade_in_the_no_trade_zone_is_vetoed_low_conf_veto():
    d = Run(cfg()).score(row(T0, s_top=0.5, preds={"river_lr": pred(0.52, 0.40)}))
    assert d.action == "none" and d.reason == "low_conf_veto" and "low_conf_veto" in d.vetoes
    assert "no_trade_zone" in d.gates_failed
    pros = next(a for a in d.arms if a.arm == "pros")
    assert pros.side == 1 and not pros.eligible and pros.reasons == ("low_conf_veto",)
    # the same flow with the best model at 0.60 (above the zone, below CONF_MIN) trades on pros
    ok = Run(cfg()).score(row(T0, s_top=0.5, preds={"river_lr": pred(0.60, 0.30)}))
    assert ok.action == "open_long" and ok.arm == "pros" and "no_trade_zone" in ok.gates_passed


# ---------------------------------------------------------------- 2) consensus
def test_2_consensus_vetoes_a_short_against_a_strong_1h_uptrend_and_shadow_mode_records_it():
    d = Run(cfg()).score(row(T0, preds=SHORT, trend=0.005))
    assert d.action == "none" and d.side == -1 and d.reason == "consensus_veto"
    assert "consensus" in d.gates_failed and d.shadow_vetoes == () and d.trend == pytest.approx(0.005)
    long_down = Run(cfg()).score(row(T0, preds=LONG, trend=-0.005))
    assert long_down.action == "none" and long_down.reason == "consensus_veto"
    assert Run(cfg()).score(row(T0, preds=SHORT, trend=-0.005)).action == "open_short"   # agrees
    assert Run(cfg()).score(row(T0, preds=SHORT, trend=0.001)).action == "open_short"    # not strong

    shadow = Run(cfg(consensus_shadow=True))
    s = shadow.score(row(T0, preds=SHORT, trend=0.005))
    assert s.action == "open_short" and s.shadow_vetoes == ("consensus_veto",) and s.vetoes == ()
    assert "consensus" not in s.gates_failed
    fills = of(shadow.bars(bar(T0, 100.0)), Fill)
    assert fills[0].side == "sell"


# ---------------------------------------------------------------- 3) volatility guard
def test_3_volatility_guard_scales_the_position_by_the_formula():
    calm = Run(cfg()).score(row(T0, preds=LONG, rv=0.5))
    assert calm.vol_scale == 1.0 and calm.notional == pytest.approx(0.2 / 0.5 * 0.7 * 5000)
    r = Run(cfg())
    d = r.score(row(T0, preds=LONG, rv=1.6))
    scale = max(0.25, 0.8 / 1.6)
    assert d.vol_scale == pytest.approx(scale)
    assert d.size_frac == pytest.approx(0.2 / 1.6 * 0.7)
    assert d.notional == pytest.approx(0.2 / 1.6 * 0.7 * scale * 5000)
    f = of(r.bars(bar(T0, 100.0)), Fill)[0]
    assert f.qty * f.price == pytest.approx(d.notional)
    # a full-size position (clamped at pos_max) is cut to scale x full size
    full = Run(cfg(sigma_target=5.0)).score(row(T0, preds=LONG, rv=1.6))
    assert full.size_frac == 1.0 and full.notional == pytest.approx(0.5 * 5000)
    extreme = Run(cfg(sigma_target=50.0)).score(row(T0, preds=LONG, rv=8.0))
    assert extreme.vol_scale == 0.25 and extreme.notional == pytest.approx(0.25 * 5000)


# ---------------------------------------------------------------- 4) bandit rewards from trades
def test_4_bandit_reward_matures_after_the_horizon_with_the_trade_pnl():
    r = Run(cfg())
    r.open_long(T0, 100.0)
    assert r.e.bandit.n["model_online"] == 0
    for k in range(1, 14):                                   # horizon 3 x 5m = 15 min after T0
        r.bars(bar(T0 + k * M, 100.0, c=100.2))
        assert r.e.bandit.n["model_online"] == 0
    r.bars(bar(T0 + 14 * M, 100.2, c=100.2))                 # ends at T0 + 15 min: matures
    assert r.e.bandit.n["model_online"] == 1 and r.e.rewards == []
    reward = 20.0 / 50.0                                     # +20 bps, clip 50 bps
    mean, var, n = r.e.bandit.posterior("model_online")
    prec = 1 / 0.04 + 1 / 0.25
    assert var == pytest.approx(1 / prec) and mean == pytest.approx((0.1 / 0.04 + reward / 0.25) / prec)


def test_4_bandit_learns_the_better_arm_inside_the_engine():
    """pros' flow predicts the next move, amateurs' is noise: pros' share and posterior rise."""
    c = cfg(arms=("pros", "amateurs"), no_model_vetoes_cohort=False, model_optimism=0.0, stop_loss_pct=0.0,
            time_stop_bars=3, label_horizon=3, consensus_enabled=False, max_positions=1)
    r = Run(c)
    rng = np.random.default_rng(4)
    price, t = 100.0, T0
    chosen = []
    for _ in range(160):
        move = rng.choice([-1.0, 1.0])
        s_top, s_bot = 0.4 * move, 0.4 * rng.choice([-1.0, 1.0])
        d = r.score(row(t, s_top=s_top, s_bot=s_bot, close=price))
        if d.action.startswith("open"):
            chosen.append(d.arm)
        for k in range(15):
            o = price
            price *= 1 + move * 0.0004
            r.bars(bar(t + k * M, o, c=price))
        t += 15 * M
    first, last = chosen[:40], chosen[-40:]
    assert last.count("pros") > first.count("pros") and last.count("pros") >= 34
    assert r.e.bandit.posterior("pros")[0] > 0.3 > r.e.bandit.posterior("amateurs")[0]


# ---------------------------------------------------------------- 5) kill switch
def test_5_drawdown_kill_switch_rejects_trades_until_reset():
    c = cfg(stop_loss_pct=0.04, base_notional=10_000.0, sigma_target=5.0, daily_loss_limit=0.0,
            max_consecutive_losses=0)
    r = Run(c)
    events = []
    for k in range(3):                                       # three 4% losses: 9,600 / 9,200 / 8,800
        t = T0 + k * 4 * P
        d = r.score(row(t, preds=LONG))
        assert d.action == "open_long", (k, d.reason)
        out = r.bars(bar(t, 100.0, h=100.0, l=95.0, c=95.5))
        assert [f.reason for f in of(out, Fill)] == ["entry", "stop_loss"]
        events += of(out, RiskEvent)
    assert r.e.equity() == pytest.approx(8_800.0)
    assert [(e.kind, e.reason) for e in events] == [("kill_switch", "drawdown_limit")]
    assert r.e.halted
    ev = events[0]
    assert ev.origin == "production" and ev.config_hash == c.config_hash()
    assert msgspec.json.decode(ev.detail)["drawdown"] == pytest.approx(0.12)
    eq = of(r.records, EquityPoint)[-1]
    assert eq.halted and eq.drawdown == pytest.approx(0.12)

    t = T0 + 20 * P
    d = r.score(row(t, preds=LONG))
    assert d.action == "none" and d.reason == "drawdown_limit" and "kill_switch" in d.gates_failed
    d = r.score(row(T0 + 2 * DAY, preds=LONG))               # days later: still halted
    assert d.reason == "drawdown_limit"
    reset = r.e.reset_kill_switch(T0 + 2 * DAY + M, by="operator:alice")
    assert reset.kind == "kill_switch_reset" and msgspec.json.decode(reset.detail)["by"] == "operator:alice"
    assert not r.e.halted
    d = r.score(row(T0 + 2 * DAY + P, preds=LONG))
    assert d.action == "open_long"


# ---------------------------------------------------------------- 6) stop from entry, trailing
def test_6_stop_loss_is_from_entry_never_from_the_peak():
    r = Run(cfg(stop_loss_pct=0.15))
    r.open_long(T0, 100.0)
    out = r.bars(bar(T0 + M, 100.0, h=200.0, l=100.0, c=200.0),   # +100%
                 bar(T0 + 2 * M, 200.0, h=200.0, l=170.0, c=170.0))  # -15% from the peak
    assert of(out, Fill) == [] and r.e.book.positions
    out = r.bars(bar(T0 + 3 * M, 170.0, h=170.0, l=86.0, c=86.0))
    assert of(out, Fill) == []                                     # 86 > 85
    out = r.bars(bar(T0 + 4 * M, 86.0, h=86.0, l=84.0, c=84.0))
    (f,) = of(out, Fill)
    assert f.reason == "stop_loss" and f.price == pytest.approx(85.0) and f.ts == T0 + 4 * M
    assert f.realised_pnl == pytest.approx(f.qty * (85.0 - 100.0))

    r2 = Run(cfg(stop_loss_pct=0.15))
    r2.open_long(T0, 100.0)
    (f,) = of(r2.bars(bar(T0 + M, 99.0, h=99.0, l=80.0, c=81.0)), Fill)
    assert f.reason == "stop_loss" and f.price == pytest.approx(85.0)


def test_6_trailing_stop_activates_then_trails_from_the_peak():
    r = Run(cfg(trailing_activation_pct=0.10, trailing_distance_pct=0.05))
    r.open_long(T0, 100.0)
    out = r.bars(bar(T0 + M, 100.0, h=109.0, l=100.0, c=108.0),
                 bar(T0 + 2 * M, 108.0, h=108.0, l=95.0, c=96.0))   # not activated: no stop
    assert of(out, Fill) == []
    out = r.bars(bar(T0 + 3 * M, 96.0, h=120.0, l=96.0, c=119.0),    # activates, peak 120
                 bar(T0 + 4 * M, 119.0, h=119.0, l=114.5, c=115.0))  # 114 not touched
    assert of(out, Fill) == []
    (f,) = of(r.bars(bar(T0 + 5 * M, 115.0, h=116.0, l=113.0, c=113.0)), Fill)
    assert f.reason == "trailing_stop" and f.price == pytest.approx(114.0)


# ---------------------------------------------------------------- 7) paper fills
def test_7_fills_at_the_next_bar_open_with_fee_and_slippage():
    r = Run(cfg(fee_bps=5.0, slippage_bps=2.0))
    d = r.score(row(T0, preds=LONG, close=100.0))
    assert d.action == "open_long" and d.close == 100.0
    # the decision bar's own last minute (late) never fills the order
    assert of(r.bars(bar(T0 - M, 99.0, c=100.0)), Fill) == []
    (f,) = of(r.bars(bar(T0, 101.0, h=102.0, l=100.5, c=101.5)), Fill)
    assert f.ts == T0 and f.ref_price == 101.0 and f.price == pytest.approx(101.0 * 1.0002)
    assert f.price != 100.0
    assert f.fee == pytest.approx(f.qty * f.price * 0.0005) and f.fee > 0 and f.slippage_bps == pytest.approx(2.0)
    assert f.decision_ts == d.ts and f.position_id == d.position_id and f.arm == "model_online"
    assert f.qty * f.price == pytest.approx(d.notional)
    # the exit pays slippage the other way and its fee
    r.e.book.submit_close(f"{EX}:{SYM}", T0 + 2 * M, "opposite_signal")
    (x,) = of(r.bars(bar(T0 + 2 * M, 103.0)), Fill)
    assert x.side == "sell" and x.price == pytest.approx(103.0 * 0.9998)
    assert x.fee == pytest.approx(x.qty * x.price * 0.0005)
    assert x.realised_pnl == pytest.approx(f.qty * (x.price - f.price) - f.fee - x.fee)


# ---------------------------------------------------------------- 8) breakers
def test_8_consecutive_loss_breaker_pauses_until_the_next_utc_day():
    c = cfg(stop_loss_pct=0.01, base_notional=1_000.0, sigma_target=5.0)
    r = Run(c)
    events = []
    for k in range(5):
        t = T0 + k * 2 * P
        assert r.score(row(t, preds=LONG)).action == "open_long"
        events += of(r.bars(bar(t, 100.0, h=100.0, l=98.0, c=98.5)), RiskEvent)
    assert [(e.kind, msgspec.json.decode(e.detail)["losses"]) for e in events] == [("consecutive_losses", 5)]
    next_day = 19_676 * DAY
    assert r.e.paused_until == next_day
    d = r.score(row(T0 + 20 * P, preds=LONG))
    assert d.action == "none" and d.reason == "consecutive_losses"
    d = r.score(row(next_day - P, preds=LONG))
    assert d.reason == "consecutive_losses"
    out = r.e.on_scored(row(next_day, preds=LONG), None, next_day)
    assert [(e.kind, e.reason) for e in of(out, RiskEvent)] == [("pause_end", "consecutive_losses")]
    assert of(out, Decision)[0].action == "open_long"


def test_8_daily_loss_limit_pauses_until_the_next_utc_day():
    c = cfg(stop_loss_pct=0.04, base_notional=10_000.0, sigma_target=5.0)
    r = Run(c)
    r.score(row(T0, preds=LONG))
    out = r.bars(bar(T0, 100.0, h=100.0, l=95.0, c=96.0))          # -400 = -4% of the day's 10,000
    (ev,) = of(out, RiskEvent)
    assert ev.kind == "daily_loss_limit" and msgspec.json.decode(ev.detail)["paused_until"] == 19_676 * DAY
    assert not r.e.halted
    d = r.score(row(T0 + 6 * P, preds=LONG))
    assert d.action == "none" and d.reason == "daily_loss_limit" and "daily_loss" in d.gates_failed
    assert r.score(row(19_676 * DAY + P, preds=LONG)).action == "open_long"


# ---------------------------------------------------------------- 9) data quality
def test_9_data_gap_bar_opens_nothing_and_the_decision_records_it():
    r = Run(cfg())
    d = r.score(row(T0, preds=LONG), quality="data_gap")
    assert d.action == "none" and d.reason == "data_gap" and d.quality == "data_gap"
    assert "data_gap" in d.vetoes and "data_quality" in d.gates_failed
    assert not r.e.book.pending
    assert of(r.bars(bar(T0, 100.0)), Fill) == []
    # a data gap does not act on signals for an open position either
    r2 = Run(cfg(exit_on_opposite=True))
    r2.open_long(T0)
    d = r2.score(row(T0 + P, preds=SHORT), quality="data_gap")
    assert d.action == "hold" and not r2.e.book.pending
    assert r2.score(row(T0 + 2 * P, preds=SHORT), quality="ok").action == "close"


# ---------------------------------------------------------------- exits
def test_same_bar_ambiguity_resolves_stop_first():
    r = Run(cfg(stop_loss_pct=0.02, take_profit_pct=0.02))
    r.open_long(T0)
    (f,) = of(r.bars(bar(T0 + M, 100.0, h=103.0, l=97.0, c=101.0)), Fill)
    assert f.reason == "stop_loss" and f.price == pytest.approx(98.0) and f.realised_pnl < 0


def test_take_profit_and_atr_exits_in_the_engine():
    r = Run(cfg(take_profit_pct=0.02))
    r.open_long(T0)
    (f,) = of(r.bars(bar(T0 + M, 100.0, h=102.5, l=99.5, c=102.0)), Fill)
    assert f.reason == "take_profit" and f.price == pytest.approx(102.0)
    r = Run(cfg(atr_sl_mult=2.0, atr_tp_mult=3.0))
    r.open_long(T0, atr=0.5)
    assert r.e.book.positions[f"{EX}:{SYM}"].atr == 0.5
    (f,) = of(r.bars(bar(T0 + M, 100.0, h=100.5, l=98.9, c=99.0)), Fill)
    assert f.reason == "atr_stop" and f.price == pytest.approx(99.0)


def test_time_stop_closes_at_the_next_open_after_the_limit():
    r = Run(cfg(time_stop_bars=2))                       # 2 x 5m
    r.open_long(T0)
    out = r.bars(*[bar(T0 + k * M, 100.0) for k in range(1, 10)])   # last ends at T0 + 10 min
    assert of(out, Fill) == [] and r.e.book.pending[f"{EX}:{SYM}"].reason == "time_stop"
    (f,) = of(r.bars(bar(T0 + 10 * M, 100.5)), Fill)
    assert f.reason == "time_stop" and f.price == 100.5 and f.decision_ts == T0 + 10 * M


def test_opposite_signal_closes_at_the_next_open():
    r = Run(cfg(exit_on_opposite=True))
    entry = r.open_long(T0)
    r.bars(*[bar(T0 + k * M, 100.0) for k in range(1, 5)])
    d = r.score(row(T0 + P, preds=SHORT))
    assert d.action == "close" and d.reason == "opposite_signal" and d.position_id == entry.position_id
    assert r.score(row(T0 + P, preds=SHORT)).reason == "exit_pending"
    (f,) = of(r.bars(bar(T0 + P, 101.0)), Fill)
    assert f.reason == "opposite_signal" and f.price == 101.0 and f.decision_ts == T0 + P
    assert f.realised_pnl == pytest.approx(entry.qty * 1.0)
    same = Run(cfg(exit_on_opposite=True))
    same.open_long(T0)
    assert same.score(row(T0 + P, preds=LONG)).action == "hold"
    off = Run(cfg(exit_on_opposite=False))
    off.open_long(T0)
    assert off.score(row(T0 + P, preds=SHORT)).action == "hold"


# ---------------------------------------------------------------- other guards and records
def test_cooldown_max_positions_and_warmup():
    r = Run(cfg(cooldown_bars=2, max_positions=1, stop_loss_pct=0.01))
    r.open_long(T0)
    other = r.score(row(T0 + P, preds=LONG, symbol="ETH/USDT:USDT"))
    assert other.action == "none" and other.reason == "max_positions"
    r.bars(bar(T0 + M, 100.0, h=100.0, l=98.0, c=98.0))            # stopped at T0 + 1 min
    d = r.score(row(T0 + 2 * P, preds=LONG))
    assert d.reason == "cooldown"                                  # 9 min < 2 x 5 min
    assert r.score(row(T0 + 3 * P, preds=LONG)).action == "open_long"
    cold = Run(cfg()).score(row(T0, preds=LONG, warm=False))
    assert cold.action == "none" and cold.reason == "not_warm"


def test_rows_of_another_timeframe_get_a_decision_that_does_nothing():
    r = Run(cfg(primary_tf="5m"))
    d = r.score(row(T0, preds=LONG, tf="15m"))
    assert d.action == "none" and d.reason == "not_primary_tf" and d.arm == "" and d.bandit_draws == {}
    assert r.e.bandit.selections["model_online"] == 0
    assert r.score(row(T0, preds=LONG)).action == "open_long"


def test_flatten_on_halt_closes_positions_at_the_next_open():
    c = cfg(base_notional=10_000.0, sigma_target=5.0, daily_loss_limit=0.0, flatten_on_halt=True)
    r = Run(c)
    r.open_long(T0, 100.0)
    out = r.bars(bar(T0 + M, 100.0, h=100.0, l=88.0, c=88.0))
    assert [e.kind for e in of(out, RiskEvent)] == ["kill_switch"] and of(out, Fill) == []
    (f,) = of(r.bars(bar(T0 + 2 * M, 89.0)), Fill)
    assert f.reason == "kill_switch" and f.price == 89.0 and not r.e.book.positions


def test_order_is_cancelled_when_a_guard_trips_before_the_fill():
    c = cfg(base_notional=10_000.0, sigma_target=5.0, daily_loss_limit=0.0, max_consecutive_losses=0)
    r = Run(c)
    r.open_long(T0, 100.0, symbol="ETH/USDT:USDT")
    assert r.score(row(T0 + P, preds=LONG)).action == "open_long"  # BTC, pending
    out = r.bars(bar(T0 + P - M, 100.0, h=100.0, l=85.0, c=85.0, symbol="ETH/USDT:USDT"))  # -15%
    assert [e.kind for e in of(out, RiskEvent)] == ["kill_switch"]
    out = r.bars(bar(T0 + P, 100.0))
    assert of(out, Fill) == [] and [(e.kind, e.reason) for e in of(out, RiskEvent)] == [
        ("order_cancelled", "drawdown_limit")]
    assert all(x.instrument != f"{EX}:{SYM}" for x in r.e.rewards) and not r.e.book.pending


def test_one_equity_point_per_bar_and_tags_everywhere():
    r = Run(cfg(take_profit_pct=0.01), origin="experimental", strategy_id="ens", variant_id="v7")
    r.open_long(T0)
    r.bars(*[bar(T0 + k * M, 100.0 + 0.5 * k) for k in range(1, 6)])
    eqs = of(r.records, EquityPoint)
    assert len(eqs) == 6 and [e.ts for e in eqs] == [T0 + k * M + M for k in range(6)]
    assert [e.seq for e in eqs] == [1] * 6  # one mark per ts: the first (and last) of its ts
    for rec in r.records:
        assert (rec.origin, rec.strategy_id, rec.variant_id) == ("experimental", "ens", "v7")
        assert rec.config_hash == r.e.config_hash
    with pytest.raises(ValueError):
        StrategyEngine(cfg(), origin="live")


def test_summary_reports_pnl_trades_win_rate_sharpe_drawdown():
    r = Run(cfg(stop_loss_pct=0.02, take_profit_pct=0.02))
    r.open_long(T0)
    r.bars(bar(T0 + M, 100.0, h=102.5, l=100.0, c=102.0))          # +2%
    r.open_long(T0 + P)
    r.bars(bar(T0 + P + M, 100.0, h=100.0, l=97.0, c=97.5))        # -2%
    s = r.e.summary()
    assert s["trades"] == 2 and s["wins"] == 1 and s["win_rate"] == 0.5
    assert s["pnl"] == pytest.approx(s["equity"] - 10_000.0)
    qty1 = 1400 / 100.0
    assert s["pnl"] == pytest.approx(qty1 * 2.0 - qty1 * 2.0, abs=1e-9)
    assert s["max_drawdown"] > 0 and np.isfinite(s["sharpe"])
    assert s["bandit"]["model_online"]["selected"] == 2


# ---------------------------------------------------------------- determinism and snapshots
def scenario(seed, minutes=240, symbols=(SYM, "ETH/USDT:USDT")):
    """Pipeline-ordered items: each 1m bar of every symbol, and at every 5m boundary a scored row
    per symbol with random cohort flow and model probabilities."""
    rng = np.random.default_rng(seed)
    price = {s: 100.0 for s in symbols}
    items = []
    for m in range(minutes):
        t = T0 + m * M
        for s in symbols:
            o = price[s]
            c = o * float(np.exp(rng.normal(0, 0.002)))
            hi, lo = max(o, c) * (1 + abs(rng.normal(0, 0.001))), min(o, c) * (1 - abs(rng.normal(0, 0.001)))
            price[s] = c
            items.append(("bar", bar(t, o, hi, lo, c, symbol=s)))
        if (m + 1) % 5 == 0:
            for s in symbols:
                up = float(rng.uniform(0.05, 0.9))
                down = float(rng.uniform(0.0, 1.0 - up))
                up2 = float(rng.uniform(0.05, 0.9))
                preds = {"river_lr": pred(up, down), "onnx_ensemble": pred(up2, (1 - up2) * 0.8, "onnx_ensemble")}
                items.append(("row", row(t + M, preds=preds, s_top=float(rng.normal(0, 0.3)),
                                         s_bot=float(rng.normal(0, 0.3)), rv=float(rng.uniform(0.3, 1.2)),
                                         atr=price[s] * 0.003, trend=float(rng.normal(0, 0.003)),
                                         close=price[s], symbol=s)))
    return items


def play(engine, items):
    out = []
    for kind, x in items:
        out += engine.on_scored(x, None, x.end) if kind == "row" else engine.on_bar(x)
    return out


def encode(records):
    return [type(r).__name__.encode() + msgspec.json.encode(r) for r in records]


def test_summary_sharpe_is_the_one_sharpe_of_the_per_minute_equity_curve():
    e = StrategyEngine(StrategyConfig(seed=3))
    out = play(e, scenario(3, minutes=600))
    last = {}
    for p in of(out, EquityPoint):  # one equity per mark time: the last mark of that minute
        last[p.ts] = p.equity
    curve = [last[t] for t in sorted(last)]
    assert e.summary()["sharpe"] == pytest.approx(sharpe(simple_returns(curve), MINUTES_PER_YEAR), rel=1e-9)
    assert StrategyEngine(StrategyConfig()).sharpe() == 0.0  # undefined (no returns yet): 0


def test_the_engine_trades_through_the_execution_it_is_given():
    c = cfg()
    tags = {"origin": "production", "strategy_id": "ensemble", "variant_id": "base", "config_hash": c.config_hash()}
    own = PaperBook(50_000.0, 0.0, 0.0, tags)
    r = Run(c, execution=own)
    assert r.e.book is own and r.e.equity() == 50_000.0
    fill = r.open_long(T0)
    assert own.positions and fill.position_id == own.positions[f"{EX}:{SYM}"].position_id
    default = StrategyEngine(c).book  # default: a PaperBook from the config
    assert isinstance(default, PaperBook) and default.equity() == c.initial_equity and default.tags == tags


def test_determinism_same_inputs_and_seed_same_records():
    items = scenario(1)
    c = StrategyConfig(seed=42)
    a = play(StrategyEngine(c), items)
    b = play(StrategyEngine(c), items)
    assert encode(a) == encode(b)
    decisions = of(a, Decision)
    assert len(decisions) == sum(1 for k, _ in items if k == "row")              # exactly one per row
    assert len(of(a, EquityPoint)) == sum(1 for k, _ in items if k == "bar")
    assert len(of(a, Fill)) >= 4 and len({d.arm for d in decisions if d.arm}) >= 2
    other = play(StrategyEngine(StrategyConfig(seed=43)), items)
    assert [d.bandit_draws for d in of(other, Decision)] != [d.bandit_draws for d in decisions]


def test_pickle_and_deepcopy_of_a_running_engine_continue_identically():
    items = scenario(2)
    half = len(items) // 2
    e = StrategyEngine(StrategyConfig(seed=5), origin="experimental", variant_id="v1")
    first = play(e, items[:half])
    assert of(first, Fill)
    p = pickle.loads(pickle.dumps(e))
    d = copy.deepcopy(e)
    rest = encode(play(e, items[half:]))
    assert encode(play(p, items[half:])) == rest
    assert encode(play(d, items[half:])) == rest
    assert p.summary() == e.summary() == d.summary()


# ---------------------------------------------------------------- ids from the data (issue 11)
ETH = "ETH/USDT:USDT"


def _book_run(symbols, **kw):
    """Each symbol opens a long at T0, fills at T0's bar, and is stopped out three bars later."""
    r = Run(cfg(stop_loss_pct=0.01), **kw)
    for s in symbols:
        r.score(row(T0, preds=LONG, symbol=s))
    for k in range(4):
        for s in symbols:
            r.bars(bar(T0 + k * M, 100.0 if k < 3 else 98.0, symbol=s))
    return r


def test_position_ids_come_from_the_data_not_from_what_came_before():
    """A counter would number BTC's position 1 alone and 2 after ETH's: the id is a function of
    (book, instrument, decision time, side) only, so a run that starts later, resumes, or sees
    instruments in another order stores the same position under the same key."""
    alone = {f.position_id for f in of(_book_run([SYM]).records, Fill)}
    both = _book_run([ETH, SYM]).records
    btc = {f.position_id for f in of(both, Fill) if f.symbol == SYM}
    eth = {f.position_id for f in of(both, Fill) if f.symbol == ETH}
    assert len(alone) == 1 and btc == alone and len(eth) == 1 and eth != btc
    assert {d.position_id for d in of(both, Decision) if d.symbol == ETH} == eth  # decision -> its position
    other_book = {f.position_id for f in of(_book_run([SYM], origin="experimental", variant_id="v1").records, Fill)}
    assert other_book != alone  # another book's position is another position
    later = Run(cfg())
    later.score(row(T0 + P, preds=LONG))  # the same instrument decided a bar later
    assert later.e.book.pending[f"{EX}:{SYM}"].position_id not in alone
    assert all(0 < pid < 2**63 for pid in alone | eth)  # fits the UInt64 column (and an Int64)


def test_equity_seq_counts_the_marks_of_a_ts_and_the_last_one_wins():
    r = _book_run([ETH, SYM])
    eqs = of(r.records, EquityPoint)
    by_ts: dict = {}
    for e in eqs:
        by_ts.setdefault(e.ts, []).append(e.seq)
    assert by_ts and all(seqs == [1, 2] for seqs in by_ts.values())  # ETH's mark, then BTC's (the latest)
    # the same bars after other history (a resumed or later run) get the same seq
    late = Run(cfg())
    late.bars(*[bar(T0 - 50 * M + k * M, 100.0) for k in range(10)])
    assert [e.seq for e in of(late.bars(bar(T0, 100.0, symbol=ETH), bar(T0, 100.0)), EquityPoint)] == [1, 2]
