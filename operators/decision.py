"""Decisions (SPEC §6): strategy configuration, arm evaluation, gates, consensus, sizing and the
Gaussian Thompson-sampling bandit. Pure logic: no bytewax, no I/O.

One scored primary row (``operators.signals.ScoredRow``) is turned into per-arm signals:

- ``pros``      follows ``features[cfg.pros_feature]`` (default ``s_top_ema``, the span-5 EMA of
                S_top). The EMA is used rather than the raw bar value because S_MIN = 0.12 comes
                from Ensemble 1.0, whose cohort state was a rolling measure; a single 5m bar's
                net/gross of the few pro orders in it crosses 0.12 almost always. Set
                ``pros_feature="s_top"`` for the raw value.
- ``amateurs``  follows ``features[cfg.amateurs_feature]`` (default ``s_bot_ema``). Ensemble 1.0
                takes every arm's direction as sign(signal), so amateurs are followed, not faded;
                ``amateurs_contrarian=True`` flips it (a variant the optimizer can try). The bandit
                already stops choosing an arm that loses.
- ``model_online`` / ``model_onnx`` use a Prediction from ``row.predictions``:
                ``model_online_models`` (default ``("river_lr",)``) and ``model_onnx_models``
                (default ``("onnx_ensemble",)``). With several names the arm uses the most
                confident prediction present, so ``("river_lr", "river_arf")`` means "the better
                of the River models at this bar".

Eligibility: a cohort arm needs |S| >= its side threshold (``S_MIN`` 0.12 unless ``side_eps``
overrides it for that arm); a model arm needs confidence >= CONF_MIN (0.65, +0.05 when the
row's ``rv`` is above ``high_vol_rv``) and alpha >= its side threshold (``ALPHA_MIN`` 0.10 unless
overridden). No-trade zone: when the best model confidence in the row is below
``no_trade_conf`` (0.55) -- or there is no model prediction at all and
``no_model_vetoes_cohort`` -- cohort arms are ineligible with reason ``low_conf_veto``.

Rewards for the bandit are the decision's net PnL in bps over ``label_horizon`` primary bars,
clipped to +-``reward_clip_bps`` and divided by it, so rewards live in [-1, 1] and the optimism
(0.1) and the prior variances are on that scale. ``binary_reward`` gives +1 for a win and -1 for
anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional

import msgspec
import numpy as np

ARMS: tuple[str, ...] = ("pros", "amateurs", "model_online", "model_onnx")
COHORT_ARMS: frozenset[str] = frozenset({"pros", "amateurs"})
MODEL_ARMS: frozenset[str] = frozenset({"model_online", "model_onnx"})

ACTIONS = ("open_long", "open_short", "close", "hold", "none")
ORIGINS = ("production", "experimental")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StrategyConfig:
    """Every threshold and switch of one strategy. Fractions are fractions (0.02 = 2%), bps are
    bps. A numeric exit or limit of 0 switches that exit or limit off."""

    # -- arms
    arms: tuple[str, ...] = ARMS                         # enabled arms, in this order
    pros_feature: str = "s_top_ema"
    amateurs_feature: str = "s_bot_ema"
    amateurs_contrarian: bool = False
    model_online_models: tuple[str, ...] = ("river_lr",)
    model_onnx_models: tuple[str, ...] = ("onnx_ensemble",)
    # -- gates
    s_min: float = 0.12                                  # S_MIN, cohort arms
    conf_min: float = 0.65                               # CONF_MIN, model arms
    alpha_min: float = 0.10                              # ALPHA_MIN, model arms
    side_eps: tuple[tuple[str, float], ...] = ()         # per-arm override of S_MIN / ALPHA_MIN
    no_trade_conf: float = 0.55                          # best model conf below -> low_conf_veto
    no_model_vetoes_cohort: bool = True                  # no prediction at all counts as below
    high_vol_rv: float = 0.80                            # annualised rv above which CONF_MIN rises
    high_vol_conf_bump: float = 0.05
    require_warm: bool = True                            # rows still warming up open nothing
    primary_tf: str = ""                                 # "" = accept the row's timeframe
    # -- multi-timeframe consensus
    consensus_enabled: bool = True
    consensus_shadow: bool = False                       # record would-be vetoes, do not block
    consensus_tf: str = "1h"
    consensus_feature: str = "ret_12"                    # read as features[f"{tf}_{feature}"]
    consensus_threshold: float = 0.002                   # |log return| beyond 0.2% is "strong"
    # (no 1h model setting: nothing produces a 1h model, so a setting naming one was removed; issue 12)
    # -- bandit
    bandit_prior_mean: float = 0.0
    bandit_prior_var: float = 0.04
    bandit_noise_var: float = 0.25
    model_optimism: float = 0.10                         # added to the prior mean of model arms
    epsilon: float = 0.0
    reward_clip_bps: float = 50.0
    binary_reward: bool = False
    label_horizon: int = 3                               # primary bars until a reward matures
    # -- sizing
    sigma_target: float = 0.20
    pos_max: float = 1.0
    base_notional: float = 5_000.0
    vol_guard_enabled: bool = True
    sigma_cap: float = 0.80
    min_scale: float = 0.25
    kelly_enabled: bool = False
    kelly_fraction: float = 0.25
    kelly_payoff: float = 1.0                            # win/loss size ratio b in f* = p - q/b
    min_notional: float = 10.0
    # -- guards
    cooldown_bars: int = 1                               # primary bars after an exit, per instrument
    max_positions: int = 3                               # open + pending, all instruments
    max_drawdown: float = 0.10                           # kill switch, from the equity peak
    daily_loss_limit: float = 0.03                       # of the UTC day's starting equity
    max_consecutive_losses: int = 5
    flatten_on_halt: bool = False                        # close everything when the kill switch trips
    # -- exits
    stop_loss_pct: float = 0.02                          # from the ENTRY price
    take_profit_pct: float = 0.04
    trailing_activation_pct: float = 0.01                # peak must gain this much first
    trailing_distance_pct: float = 0.005                 # then stop at this distance from the peak
    atr_sl_mult: float = 2.0                             # x ATR at entry
    atr_tp_mult: float = 3.0
    time_stop_bars: int = 12                             # primary bars
    exit_on_opposite: bool = True
    # -- paper execution
    fee_bps: float = 5.0                                 # taker, per fill
    slippage_bps: float = 2.0                            # per fill, always against us
    initial_equity: float = 10_000.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"StrategyConfig.arms: unknown arm(s) {unknown}; known: {list(ARMS)}")
        for arm, _ in self.side_eps:
            if arm not in ARMS:
                raise ValueError(f"StrategyConfig.side_eps: unknown arm {arm!r}; known: {list(ARMS)}")
        nonneg = ("s_min", "alpha_min", "high_vol_rv", "high_vol_conf_bump", "consensus_threshold",
                  "bandit_noise_var", "sigma_target", "pos_max", "base_notional", "sigma_cap",
                  "kelly_fraction", "min_notional", "max_drawdown", "daily_loss_limit",
                  "stop_loss_pct", "take_profit_pct", "trailing_activation_pct",
                  "trailing_distance_pct", "atr_sl_mult", "atr_tp_mult", "fee_bps", "slippage_bps",
                  "cooldown_bars", "max_positions", "max_consecutive_losses", "time_stop_bars")
        for name in nonneg:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"StrategyConfig.{name} must be a finite number >= 0, got {v!r}")
        for name in ("conf_min", "no_trade_conf", "epsilon", "min_scale"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"StrategyConfig.{name} must be in [0, 1], got {v!r}")
        if self.bandit_prior_var <= 0 or self.bandit_noise_var <= 0:
            raise ValueError("StrategyConfig.bandit_prior_var and bandit_noise_var must be > 0")
        if self.reward_clip_bps <= 0:
            raise ValueError(f"StrategyConfig.reward_clip_bps must be > 0, got {self.reward_clip_bps}")
        if self.label_horizon < 1:
            raise ValueError(f"StrategyConfig.label_horizon must be >= 1, got {self.label_horizon}")
        if self.initial_equity <= 0:
            raise ValueError(f"StrategyConfig.initial_equity must be > 0, got {self.initial_equity}")
        if self.kelly_payoff <= 0:
            raise ValueError(f"StrategyConfig.kelly_payoff must be > 0, got {self.kelly_payoff}")
        if self.trailing_distance_pct >= 1 or self.stop_loss_pct >= 1:
            raise ValueError("StrategyConfig: stop_loss_pct and trailing_distance_pct must be < 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short stable hash (12 hex digits of SHA-256 over the sorted-key JSON of every field)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def replace(self, **changes) -> "StrategyConfig":
        return dataclasses.replace(self, **changes)

    def side_threshold(self, arm: str) -> float:
        for a, v in self.side_eps:
            if a == arm:
                return v
        return self.s_min if arm in COHORT_ARMS else self.alpha_min

    def model_names(self, arm: str) -> tuple[str, ...]:
        return self.model_online_models if arm == "model_online" else self.model_onnx_models


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

class Tagged(msgspec.Struct, kw_only=True):
    """Every decision, fill, equity and event row says whose it is (SPEC §6)."""

    origin: str  # production | experimental
    strategy_id: str
    variant_id: str
    config_hash: str


class ArmSignal(msgspec.Struct, frozen=True, kw_only=True):
    arm: str
    side: int                   # +1 long, -1 short, 0 none
    strength: float             # |S| for cohort arms, alpha for model arms
    eligible: bool
    reasons: tuple = ()         # why not eligible (empty when eligible)
    value: Optional[float] = None       # the raw signal (S) or confidence (model arms)
    model: str = ""             # model arms: the prediction used
    p_win: Optional[float] = None       # model arms: P(side) / (p_up + p_down)


class Decision(Tagged, kw_only=True):
    ts: int                     # decision time = the scored bar's end (ms)
    decided_at: int             # wall clock when decided (latency accounting)
    exchange: str
    symbol: str
    tf: str
    bar_start: int
    close: float
    action: str                 # open_long | open_short | close | hold | none
    side: int                   # side of the chosen arm's signal (0: none)
    arm: str                    # chosen arm ("" when none)
    reason: str                 # the primary reason (veto, exit reason, "in_position"...)
    arms: tuple = ()            # ArmSignal per enabled arm
    gates_passed: tuple = ()
    gates_failed: tuple = ()
    vetoes: tuple = ()          # every reason that blocked an entry
    shadow_vetoes: tuple = ()   # would-be vetoes recorded in shadow mode (trade not blocked)
    quality: str = ""           # data-quality flag passed by the caller
    best_conf: Optional[float] = None
    conf_min: float = 0.0       # the CONF_MIN in force (after the high-vol bump)
    rv: Optional[float] = None
    trend: Optional[float] = None       # the consensus overlay's trend feature
    size_frac: float = 0.0      # signed clamp(sigma_target / rv * alpha, +-pos_max)
    vol_scale: float = 1.0
    kelly: Optional[float] = None       # fractional-Kelly cap as a fraction of equity
    notional: float = 0.0       # order notional (quote currency); qty is fixed at the fill
    position_id: int = 0        # the position opened / closed (0: none)
    bandit_draws: dict = {}     # arm -> Thompson sample (eligible arms)
    latency_ms: float = 0.0     # wall ms from the 1m window close to this decision (set by the caller)


# --------------------------------------------------------------------------------------------
# arms and gates
# --------------------------------------------------------------------------------------------

def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _finite(x) -> Optional[float]:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def best_confidence(predictions: dict) -> Optional[float]:
    """The highest confidence among the row's predictions (None when there is none)."""
    confs = [p.confidence for p in predictions.values()]
    return max(confs) if confs else None


def effective_conf_min(cfg: StrategyConfig, rv: Optional[float]) -> float:
    """CONF_MIN, raised by ``high_vol_conf_bump`` when rv is above ``high_vol_rv``."""
    if rv is not None and rv > cfg.high_vol_rv:
        return cfg.conf_min + cfg.high_vol_conf_bump
    return cfg.conf_min


def p_win(pred, side: int) -> Optional[float]:
    """P(move in ``side``) given a move: p_up / (p_up + p_down) for a long."""
    den = pred.p_up + pred.p_down
    if den <= 0 or side == 0:
        return None
    return (pred.p_up if side > 0 else pred.p_down) / den


def cohort_arm(cfg: StrategyConfig, arm: str, value: Optional[float], low_conf: bool) -> ArmSignal:
    if arm not in cfg.arms:
        return ArmSignal(arm=arm, side=0, strength=0.0, eligible=False, reasons=("disabled",), value=value)
    if value is None:
        return ArmSignal(arm=arm, side=0, strength=0.0, eligible=False, reasons=("missing_signal",))
    side = _sign(value)
    if arm == "amateurs" and cfg.amateurs_contrarian:
        side = -side
    strength = min(1.0, abs(value))
    reasons = []
    if side == 0:
        reasons.append("no_side")
    if strength < cfg.side_threshold(arm):
        reasons.append("below_s_min")
    if low_conf:
        reasons.append("low_conf_veto")
    return ArmSignal(arm=arm, side=side, strength=strength, eligible=not reasons, reasons=tuple(reasons),
                     value=value)


def model_arm(cfg: StrategyConfig, arm: str, predictions: dict, conf_min: float) -> ArmSignal:
    if arm not in cfg.arms:
        return ArmSignal(arm=arm, side=0, strength=0.0, eligible=False, reasons=("disabled",))
    present = [(name, predictions[name]) for name in cfg.model_names(arm) if name in predictions]
    if not present:
        return ArmSignal(arm=arm, side=0, strength=0.0, eligible=False, reasons=("no_prediction",))
    # most confident of the configured models; ties keep the configured order
    name, pred = max(present, key=lambda np_: np_[1].confidence)
    side, conf, alpha = pred.side, pred.confidence, pred.alpha
    reasons = []
    if side == 0:
        reasons.append("no_side")
    if conf < conf_min:
        reasons.append("conf_below_min")
    if alpha < cfg.side_threshold(arm):
        reasons.append("alpha_below_min")
    return ArmSignal(arm=arm, side=side, strength=alpha, eligible=not reasons, reasons=tuple(reasons),
                     value=conf, model=name, p_win=p_win(pred, side))


@dataclass(frozen=True)
class ArmView:
    """All arms of one row plus what the gates needed to know."""

    arms: tuple[ArmSignal, ...]
    best_conf: Optional[float]
    conf_min: float
    rv: Optional[float]
    low_conf: bool              # the no-trade zone is active for cohort arms

    def get(self, arm: str) -> ArmSignal:
        for a in self.arms:
            if a.arm == arm:
                return a
        raise KeyError(arm)

    @property
    def eligible(self) -> list[str]:
        return [a.arm for a in self.arms if a.eligible]

    @property
    def low_conf_vetoed(self) -> bool:
        """True when some cohort arm was eligible but for the no-trade zone."""
        return any(a.arm in COHORT_ARMS and a.reasons == ("low_conf_veto",) for a in self.arms)


def evaluate_arms(cfg: StrategyConfig, features: dict, predictions: dict) -> ArmView:
    """Side, strength, eligibility and reasons of every arm (enabled arms in ``cfg.arms`` order,
    then disabled ones)."""
    rv = _finite(features.get("rv"))
    conf_min = effective_conf_min(cfg, rv)
    best = best_confidence(predictions)
    low_conf = (best < cfg.no_trade_conf) if best is not None else cfg.no_model_vetoes_cohort
    out = []
    order = list(cfg.arms) + [a for a in ARMS if a not in cfg.arms]
    for arm in order:
        if arm == "pros":
            out.append(cohort_arm(cfg, arm, _finite(features.get(cfg.pros_feature)), low_conf))
        elif arm == "amateurs":
            out.append(cohort_arm(cfg, arm, _finite(features.get(cfg.amateurs_feature)), low_conf))
        else:
            out.append(model_arm(cfg, arm, predictions, conf_min))
    return ArmView(arms=tuple(out), best_conf=best, conf_min=conf_min, rv=rv, low_conf=low_conf)


@dataclass(frozen=True)
class Consensus:
    trend: Optional[float]      # the overlay feature (None: missing or stale -> neutral)
    veto: bool                  # the proposed side is strongly contradicted


def consensus(cfg: StrategyConfig, side: int, features: dict, overlay_ok: dict, predictions: dict) -> Consensus:
    """Multi-timeframe consensus: a long is contradicted when the overlay trend is below
    -threshold, a short when it is above +threshold. A stale or missing overlay is neutral.
    (``predictions`` is not read: the pipeline scores the primary timeframe only, there is no
    overlay model to consult.)"""
    ok = overlay_ok.get(cfg.consensus_tf, True) is not False
    trend = _finite(features.get(f"{cfg.consensus_tf}_{cfg.consensus_feature}")) if ok else None
    veto = False
    if side > 0:
        veto = trend is not None and trend < -cfg.consensus_threshold
    elif side < 0:
        veto = trend is not None and trend > cfg.consensus_threshold
    return Consensus(trend=trend, veto=veto)


# --------------------------------------------------------------------------------------------
# sizing
# --------------------------------------------------------------------------------------------

def vol_guard_scale(cfg: StrategyConfig, rv: float) -> float:
    """max(min_scale, sigma_cap / rv) when rv > sigma_cap (and the guard is on), else 1."""
    if cfg.vol_guard_enabled and rv > cfg.sigma_cap > 0:
        return max(cfg.min_scale, cfg.sigma_cap / rv)
    return 1.0


def target_fraction(cfg: StrategyConfig, side: int, alpha: float, rv: float) -> float:
    """Signed clamp(sigma_target / rv * alpha, +-pos_max)."""
    raw = cfg.sigma_target / rv * alpha
    return side * max(-cfg.pos_max, min(cfg.pos_max, raw))


def kelly_cap(cfg: StrategyConfig, p: Optional[float]) -> Optional[float]:
    """Fractional Kelly f = kelly_fraction * (p - (1 - p) / b), as a fraction of equity (may be
    <= 0, which means "no bet"); None when there is no probability or Kelly is off."""
    if not cfg.kelly_enabled or p is None:
        return None
    return cfg.kelly_fraction * (p - (1.0 - p) / cfg.kelly_payoff)


@dataclass(frozen=True)
class Sizing:
    frac: float                 # signed fraction of base_notional before the guard
    vol_scale: float
    kelly: Optional[float]
    notional: float             # absolute order notional; 0 when not tradable
    reason: str = ""            # why the notional is 0


def size_position(cfg: StrategyConfig, side: int, alpha: float, rv: Optional[float],
                  p: Optional[float], equity: float) -> Sizing:
    """position = clamp(sigma_target / rv * alpha, +-pos_max) * base_notional, times the
    volatility guard scale (applied after the clamp, so the guard always shrinks a full-size
    position), capped by fractional Kelly * equity when Kelly is on."""
    if rv is None or rv <= 0:
        return Sizing(0.0, 1.0, None, 0.0, "no_volatility")
    frac = target_fraction(cfg, side, alpha, rv)
    scale = vol_guard_scale(cfg, rv)
    notional = abs(frac) * scale * cfg.base_notional
    k = kelly_cap(cfg, p)
    if k is not None:
        if k <= 0:
            return Sizing(frac, scale, k, 0.0, "kelly_nonpositive")
        notional = min(notional, k * equity)
    if notional <= 0 or notional < cfg.min_notional:
        return Sizing(frac, scale, k, 0.0, "size_too_small")
    return Sizing(frac, scale, k, notional)


# --------------------------------------------------------------------------------------------
# bandit
# --------------------------------------------------------------------------------------------

def reward_from_bps(cfg: StrategyConfig, pnl_bps: float) -> float:
    """The bandit's reward for a decision that made ``pnl_bps`` (net) over its horizon."""
    if cfg.binary_reward:
        return 1.0 if pnl_bps > 0 else -1.0
    c = cfg.reward_clip_bps
    return max(-c, min(c, pnl_bps)) / c


class GaussianThompson:
    """Gaussian Thompson sampling with a known observation noise: arm k has a N(m_k, v_k) prior
    (m_k = prior_mean + model_optimism for model arms) and rewards ~ N(theta_k, noise_var). The
    posterior after n rewards with sum s is N(mean, var) with
    1/var = 1/v_k + n/noise_var and mean = var * (m_k/v_k + s/noise_var).

    The optimism is part of the prior, so it fades as evidence comes in: a model arm is preferred
    at the start and loses to an arm that is clearly better. ``select`` samples every eligible arm
    and takes the largest draw; with probability epsilon it picks an eligible arm uniformly
    instead. The generator is a numpy ``Generator`` kept in the object (picklable, deep-copyable),
    so the same seed and the same calls give the same choices.

    >>> b = GaussianThompson(("pros", "model_online"), seed=1)
    >>> arm, draws = b.select(["pros", "model_online"])
    >>> arm in draws and sorted(draws) == ["model_online", "pros"]
    True
    """

    def __init__(self, arms, *, prior_mean: float = 0.0, prior_var: float = 0.04, noise_var: float = 0.25,
                 model_optimism: float = 0.1, epsilon: float = 0.0, seed: int = 0,
                 model_arms=MODEL_ARMS) -> None:
        self.arms: tuple[str, ...] = tuple(arms)
        self.model_arms = frozenset(model_arms)
        self.prior_mean = float(prior_mean)
        self.prior_var = float(prior_var)
        self.noise_var = float(noise_var)
        self.model_optimism = float(model_optimism)
        self.epsilon = float(epsilon)
        self.rng = np.random.default_rng(seed)
        self.n: dict[str, int] = {a: 0 for a in self.arms}
        self.sum: dict[str, float] = {a: 0.0 for a in self.arms}
        self.sumsq: dict[str, float] = {a: 0.0 for a in self.arms}
        self.selections: dict[str, int] = {a: 0 for a in self.arms}

    @classmethod
    def from_config(cls, cfg: StrategyConfig) -> "GaussianThompson":
        return cls(cfg.arms, prior_mean=cfg.bandit_prior_mean, prior_var=cfg.bandit_prior_var,
                   noise_var=cfg.bandit_noise_var, model_optimism=cfg.model_optimism, epsilon=cfg.epsilon,
                   seed=cfg.seed)

    def prior(self, arm: str) -> float:
        return self.prior_mean + (self.model_optimism if arm in self.model_arms else 0.0)

    def posterior(self, arm: str) -> tuple[float, float, int]:
        """(mean, variance, n) of the arm's mean reward."""
        n = self.n[arm]
        precision = 1.0 / self.prior_var + n / self.noise_var
        var = 1.0 / precision
        mean = var * (self.prior(arm) / self.prior_var + self.sum[arm] / self.noise_var)
        return mean, var, n

    def select(self, eligible, rng: Optional[np.random.Generator] = None) -> tuple[Optional[str], dict]:
        """(chosen arm, {arm: draw}) among ``eligible`` (arms unknown to the bandit are ignored);
        (None, {}) when nothing is eligible. Draws are taken in the bandit's arm order."""
        rng = self.rng if rng is None else rng
        cands = [a for a in self.arms if a in set(eligible)]
        if not cands:
            return None, {}
        draws = {}
        for a in cands:
            mean, var, _ = self.posterior(a)
            draws[a] = float(rng.normal(mean, math.sqrt(var)))
        if self.epsilon > 0 and rng.random() < self.epsilon:
            chosen = cands[int(rng.integers(len(cands)))]
        else:
            chosen = max(cands, key=lambda a: draws[a])  # first of equal draws
        self.selections[chosen] += 1
        return chosen, draws

    def update(self, arm: str, reward: float) -> None:
        if arm not in self.n:
            return
        r = float(reward)
        self.n[arm] += 1
        self.sum[arm] += r
        self.sumsq[arm] += r * r

    def snapshot(self) -> dict:
        """{arm: {"mean", "var", "n", "selected"}} for reporting."""
        out = {}
        for a in self.arms:
            mean, var, n = self.posterior(a)
            out[a] = {"mean": mean, "var": var, "n": n, "selected": self.selections[a]}
        return out
