"""operators.strategy_config (the config), operators.decision (arms and gates, consensus, sizing) and
operators.bandit (rewards, the Thompson bandit)."""

import copy
import pickle

import numpy as np
import pytest

from operators.bandit import GaussianThompson, reward_from_bps
from operators.decision import (
    consensus, effective_conf_min, evaluate_arms, kelly_cap, size_position, target_fraction,
    vol_guard_scale,
)
from operators.signals import Prediction
from operators.strategy_config import StrategyConfig


# ---------------------------------------------------------------- helpers
def pred(model="river_lr", p_up=0.8, p_down=0.1):
    return Prediction(model=model, version="t", p_down=p_down, p_flat=1.0 - p_up - p_down, p_up=p_up)


def feats(s_top=None, s_bot=None, rv=0.5, trend=None, **extra):
    f = {"s_top_ema": s_top, "s_bot_ema": s_bot, "rv": rv, "1h_ret_12": trend}
    f.update(extra)
    return f


CFG = StrategyConfig()


# ---------------------------------------------------------------- config
def test_defaults_follow_spec():
    c = StrategyConfig()
    assert (c.s_min, c.conf_min, c.alpha_min, c.no_trade_conf) == (0.12, 0.65, 0.10, 0.55)
    assert c.model_optimism == 0.1 and c.epsilon == 0.0
    assert c.fee_bps == 5.0 and c.label_horizon == 3
    assert (c.max_drawdown, c.daily_loss_limit, c.max_consecutive_losses) == (0.10, 0.03, 5)
    assert c.arms == ("pros", "amateurs", "model_online", "model_onnx")
    assert c.model_online_models == ("river_lr",) and c.model_onnx_models == ("onnx_ensemble",)


def test_config_hash_is_short_stable_and_sensitive():
    a, b = StrategyConfig(), StrategyConfig()
    assert a.config_hash() == b.config_hash()
    assert len(a.config_hash()) == 12 and int(a.config_hash(), 16) >= 0
    assert a.replace(s_min=0.13).config_hash() != a.config_hash()
    assert a.replace(seed=1).config_hash() != a.config_hash()
    assert pickle.loads(pickle.dumps(a)).config_hash() == a.config_hash()


@pytest.mark.parametrize("bad", [{"arms": ("pros", "whales")}, {"conf_min": 1.5}, {"fee_bps": -1.0},
                                 {"bandit_prior_var": 0.0}, {"side_eps": (("nobody", 0.1),)},
                                 {"label_horizon": 0}])
def test_config_validation_names_the_field(bad):
    with pytest.raises(ValueError) as e:
        StrategyConfig(**bad)
    assert any(k in str(e.value) for k in bad)


# ---------------------------------------------------------------- arms and gates
def test_cohort_arm_eligibility_uses_s_min_and_sign():
    v = evaluate_arms(CFG, feats(s_top=0.30, s_bot=-0.05), {"river_lr": pred(p_up=0.6, p_down=0.3)})
    pros, am = v.get("pros"), v.get("amateurs")
    assert pros.eligible and pros.side == 1 and pros.strength == pytest.approx(0.30)
    assert not am.eligible and "below_s_min" in am.reasons and am.side == -1


def test_amateurs_contrarian_flips_the_side():
    cfg = CFG.replace(amateurs_contrarian=True)
    v = evaluate_arms(cfg, feats(s_bot=0.4), {"river_lr": pred()})
    assert v.get("amateurs").side == -1
    assert evaluate_arms(CFG, feats(s_bot=0.4), {"river_lr": pred()}).get("amateurs").side == 1


def test_model_arm_below_conf_min_is_ineligible_with_reason():
    v = evaluate_arms(CFG, feats(), {"river_lr": pred(p_up=0.60, p_down=0.30)})
    arm = v.get("model_online")
    assert not arm.eligible and arm.reasons == ("conf_below_min",)
    v = evaluate_arms(CFG, feats(), {"river_lr": pred(p_up=0.66, p_down=0.30)})
    assert v.get("model_online").eligible and v.get("model_online").side == 1
    # alpha below ALPHA_MIN: p_up 0.66, p_down 0.60 is impossible; use a flat-heavy split
    v = evaluate_arms(CFG.replace(conf_min=0.4), feats(), {"river_lr": pred(p_up=0.45, p_down=0.40)})
    assert v.get("model_online").reasons == ("alpha_below_min",)
    assert evaluate_arms(CFG, feats(), {}).get("model_onnx").reasons == ("no_prediction",)


def test_conf_min_rises_in_high_volatility():
    assert effective_conf_min(CFG, 0.5) == 0.65
    assert effective_conf_min(CFG, 0.81) == pytest.approx(0.70)
    p = {"river_lr": pred(p_up=0.68, p_down=0.2)}
    assert evaluate_arms(CFG, feats(rv=0.5), p).get("model_online").eligible
    hv = evaluate_arms(CFG, feats(rv=1.2), p)
    assert hv.conf_min == pytest.approx(0.70) and hv.get("model_online").reasons == ("conf_below_min",)


def test_no_trade_zone_vetoes_cohort_arms_with_low_conf_veto():
    v = evaluate_arms(CFG, feats(s_top=0.5), {"river_lr": pred(p_up=0.52, p_down=0.40)})
    assert v.best_conf == pytest.approx(0.52)
    assert not v.get("pros").eligible and v.get("pros").reasons == ("low_conf_veto",)
    assert v.low_conf_vetoed
    v = evaluate_arms(CFG, feats(s_top=0.5), {"river_lr": pred(p_up=0.58, p_down=0.30)})
    assert v.get("pros").eligible and not v.low_conf_vetoed
    # no model at all: vetoed by default, allowed when configured
    assert evaluate_arms(CFG, feats(s_top=0.5), {}).get("pros").reasons == ("low_conf_veto",)
    assert evaluate_arms(CFG.replace(no_model_vetoes_cohort=False), feats(s_top=0.5), {}).get("pros").eligible


def test_side_eps_overrides_one_arm_only():
    cfg = CFG.replace(side_eps=(("pros", 0.4),))
    v = evaluate_arms(cfg, feats(s_top=0.3, s_bot=0.3), {"river_lr": pred()})
    assert not v.get("pros").eligible and v.get("amateurs").eligible


def test_model_arm_takes_the_most_confident_of_its_models():
    cfg = CFG.replace(model_online_models=("river_lr", "river_arf"))
    v = evaluate_arms(cfg, feats(), {"river_lr": pred("river_lr", 0.7, 0.2), "river_arf": pred("river_arf", 0.1, 0.85)})
    arm = v.get("model_online")
    assert arm.model == "river_arf" and arm.side == -1 and arm.value == pytest.approx(0.85)
    assert arm.p_win == pytest.approx(0.85 / 0.95)


def test_disabled_arm_is_never_eligible():
    cfg = CFG.replace(arms=("model_online",))
    v = evaluate_arms(cfg, feats(s_top=0.9), {"river_lr": pred()})
    assert v.get("pros").reasons == ("disabled",) and v.eligible == ["model_online"]


# ---------------------------------------------------------------- consensus
def test_consensus_vetoes_against_a_strong_1h_trend():
    up, down = feats(trend=0.005), feats(trend=-0.005)
    assert consensus(CFG, -1, up, {"1h": True}, {}).veto
    assert not consensus(CFG, 1, up, {"1h": True}, {}).veto
    assert consensus(CFG, 1, down, {}, {}).veto
    assert not consensus(CFG, 1, feats(trend=-0.001), {}, {}).veto          # not strong
    assert not consensus(CFG, 1, down, {"1h": False}, {}).veto              # stale overlay: neutral
    assert not consensus(CFG, 1, feats(trend=None), {}, {}).veto


def test_there_is_no_1h_model_setting_and_predictions_do_not_sway_the_consensus():
    """Nothing produces a 1h model, so the setting that named one is gone (issue 12): naming it is
    an error, and a prediction under any name changes no consensus."""
    with pytest.raises(ValueError, match="consensus_model"):  # pydantic: an unexpected keyword argument
        CFG.replace(consensus_model="1h_onnx_ensemble")
    p = {"1h_onnx_ensemble": pred("1h_onnx_ensemble", p_up=0.1, p_down=0.8)}
    assert not consensus(CFG, 1, feats(trend=0.0), {}, p).veto


# ---------------------------------------------------------------- sizing
def test_target_fraction_formula_and_clamp():
    assert target_fraction(CFG, 1, 0.5, 0.4) == pytest.approx(0.2 / 0.4 * 0.5)
    assert target_fraction(CFG, -1, 0.5, 0.4) == pytest.approx(-0.25)
    assert target_fraction(CFG, 1, 0.9, 0.05) == 1.0          # clamped at pos_max
    assert target_fraction(CFG, -1, 0.9, 0.05) == -1.0


def test_vol_guard_scale_formula():
    assert vol_guard_scale(CFG, 0.5) == 1.0
    assert vol_guard_scale(CFG, 1.6) == pytest.approx(0.5)          # 0.8 / 1.6
    assert vol_guard_scale(CFG, 8.0) == pytest.approx(0.25)         # floor min_scale
    assert vol_guard_scale(CFG.replace(vol_guard_enabled=False), 8.0) == 1.0


def test_size_position_applies_the_guard_after_the_clamp():
    s = size_position(CFG, 1, 0.7, 1.6, None, 10_000)
    assert s.frac == pytest.approx(0.2 / 1.6 * 0.7)
    assert s.vol_scale == pytest.approx(0.5)
    assert s.notional == pytest.approx(0.2 / 1.6 * 0.7 * 0.5 * 5000)
    full = size_position(CFG.replace(sigma_target=5.0), 1, 0.7, 1.6, None, 10_000)
    assert full.frac == 1.0 and full.notional == pytest.approx(0.5 * 5000)
    assert size_position(CFG, 1, 0.7, None, None, 10_000).reason == "no_volatility"


def test_fractional_kelly_caps_the_size():
    cfg = CFG.replace(kelly_enabled=True, kelly_fraction=0.5, sigma_target=5.0)
    assert kelly_cap(cfg, 0.6) == pytest.approx(0.5 * (0.6 - 0.4))
    s = size_position(cfg, 1, 0.7, 0.5, 0.6, 10_000)
    assert s.notional == pytest.approx(0.1 * 10_000)                # Kelly 1000 < vol target 5000
    assert size_position(cfg, 1, 0.7, 0.5, 0.45, 10_000).reason == "kelly_nonpositive"
    assert kelly_cap(CFG, 0.6) is None                              # off by default


def test_rewards_are_clipped_and_scaled():
    assert reward_from_bps(CFG, 25.0) == pytest.approx(0.5)
    assert reward_from_bps(CFG, 500.0) == 1.0 and reward_from_bps(CFG, -500.0) == -1.0
    b = CFG.replace(binary_reward=True)
    assert reward_from_bps(b, 3.0) == 1.0 and reward_from_bps(b, -0.1) == -1.0


# ---------------------------------------------------------------- bandit
def test_posterior_is_the_normal_normal_update():
    b = GaussianThompson(("pros", "model_online"), prior_mean=0.0, prior_var=0.04, noise_var=0.25, model_optimism=0.1)
    assert b.posterior("pros") == (0.0, pytest.approx(0.04), 0)
    assert b.posterior("model_online")[0] == pytest.approx(0.1)
    for r in (0.5, 0.3):
        b.update("pros", r)
    prec = 1 / 0.04 + 2 / 0.25
    mean, var, n = b.posterior("pros")
    assert n == 2 and var == pytest.approx(1 / prec) and mean == pytest.approx((0.8 / 0.25) / prec)


def test_select_only_among_eligible_and_is_seeded():
    a = GaussianThompson(("pros", "amateurs", "model_online"), seed=7)
    b = GaussianThompson(("pros", "amateurs", "model_online"), seed=7)
    picks_a = [a.select(["pros", "amateurs"]) for _ in range(50)]
    picks_b = [b.select(["amateurs", "pros"]) for _ in range(50)]
    assert picks_a == picks_b
    assert {p[0] for p in picks_a} <= {"pros", "amateurs"}
    assert a.select([]) == (None, {})
    c = GaussianThompson(("pros", "amateurs", "model_online"), seed=8)
    assert [c.select(["pros", "amateurs"]) for _ in range(50)] != picks_a


def _simulate(b, true_means, rounds, rng, noise=0.5):
    arms = list(true_means)
    chosen = []
    for _ in range(rounds):
        arm, _ = b.select(arms)
        r = float(np.clip(rng.normal(true_means[arm], noise), -1, 1))
        b.update(arm, r)
        chosen.append(arm)
    return chosen


def test_better_arm_gains_share_and_posterior_mean():
    env = {"pros": 0.25, "amateurs": -0.05, "model_online": 0.0}
    b = GaussianThompson(tuple(env), seed=3, model_optimism=0.0)
    rng = np.random.default_rng(11)
    early = _simulate(b, env, 30, rng)
    mean_early = b.posterior("pros")[0]
    late = _simulate(b, env, 600, rng)[-200:]
    share_early = early.count("pros") / len(early)
    share_late = late.count("pros") / len(late)
    assert share_late > share_early and share_late > 0.8
    assert b.posterior("pros")[0] > mean_early
    assert b.posterior("pros")[0] == pytest.approx(0.25, abs=0.08)


def test_model_optimism_prefers_the_model_first_then_yields_to_a_better_arm():
    arms = ("pros", "model_online")
    fresh = GaussianThompson(arms, seed=5, model_optimism=0.1)
    first = [fresh.select(arms)[0] for _ in range(2000)]
    neutral = GaussianThompson(arms, seed=5, model_optimism=0.0)
    first_neutral = [neutral.select(arms)[0] for _ in range(2000)]
    share_model = first.count("model_online") / 2000
    assert share_model > 0.58                                            # ~0.64 expected
    assert share_model > first_neutral.count("model_online") / 2000 + 0.08
    b = GaussianThompson(arms, seed=5, model_optimism=0.1)
    chosen = _simulate(b, {"pros": 0.4, "model_online": 0.0}, 500, np.random.default_rng(2))
    assert chosen[-100:].count("pros") > 85
    assert b.posterior("pros")[0] > b.posterior("model_online")[0]


def test_epsilon_explores_uniformly():
    b = GaussianThompson(("pros", "amateurs"), seed=1, epsilon=1.0, model_optimism=0.0)
    for _ in range(300):
        b.update("pros", 1.0)
        b.update("amateurs", -1.0)
    picks = [b.select(["pros", "amateurs"])[0] for _ in range(1000)]
    assert 400 < picks.count("amateurs") < 600
    greedy = GaussianThompson(("pros", "amateurs"), seed=1, epsilon=0.0)
    greedy.n, greedy.sum = dict(b.n), dict(b.sum)
    assert all(greedy.select(["pros", "amateurs"])[0] == "pros" for _ in range(200))


def test_bandit_state_pickles_and_continues_identically():
    b = GaussianThompson(("pros", "model_online"), seed=9)
    for i in range(20):
        arm, _ = b.select(["pros", "model_online"])
        b.update(arm, 0.1 * (i % 3 - 1))
    c, d = pickle.loads(pickle.dumps(b)), copy.deepcopy(b)
    seq = [b.select(["pros", "model_online"]) for _ in range(30)]
    assert [c.select(["pros", "model_online"]) for _ in range(30)] == seq
    assert [d.select(["pros", "model_online"]) for _ in range(30)] == seq
