"""Strategy configuration: ``StrategyConfig``, every threshold and switch of one strategy, validated
where it is declared (a pydantic dataclass), and the arm names it refers to.

A bad value or an unknown name raises ``pydantic.ValidationError`` (a ``ValueError``) naming the
field. The object is a frozen, hashable dataclass: ``dataclasses.fields``, ``asdict`` and
``replace`` work on it, it pickles and deep-copies, and ``config_hash`` identifies it in every row
it makes. What the arms, gates and sizing do with these values: ``operators.decision``; the
bandit's: ``operators.bandit``; exits and guards: ``operators.risk``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

ARMS: tuple[str, ...] = ("pros", "amateurs", "model_online", "model_onnx")
COHORT_ARMS: frozenset[str] = frozenset({"pros", "amateurs"})
MODEL_ARMS: frozenset[str] = frozenset({"model_online", "model_onnx"})

__all__ = ["ARMS", "COHORT_ARMS", "MODEL_ARMS", "StrategyConfig"]


def _in_unit_interval(v: float) -> float:
    if not 0 <= v <= 1:
        raise ValueError(f"must be in [0, 1], got {v!r}")
    return v


NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # a finite number >= 0
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, AfterValidator(_in_unit_interval)]
BelowOne = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # a price distance: 1 would be 100%


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class StrategyConfig:
    """Every threshold and switch of one strategy. Fractions are fractions (0.02 = 2%), bps are
    bps. A numeric exit or limit of 0 switches that exit or limit off.

    >>> cfg = StrategyConfig(conf_min=0.7).replace(s_min=0.2)
    >>> cfg.config_hash() == StrategyConfig(s_min=0.2, conf_min=0.7).config_hash()
    True
    """

    # -- arms
    arms: tuple[str, ...] = ARMS                         # enabled arms, in this order
    pros_feature: str = "s_top_ema"
    amateurs_feature: str = "s_bot_ema"
    amateurs_contrarian: bool = False
    model_online_models: tuple[str, ...] = ("river_lr",)
    model_onnx_models: tuple[str, ...] = ("onnx_ensemble",)
    # -- gates
    s_min: NonNegative = 0.12                            # S_MIN, cohort arms
    conf_min: Probability = 0.65                         # CONF_MIN, model arms
    alpha_min: NonNegative = 0.10                        # ALPHA_MIN, model arms
    side_eps: tuple[tuple[str, float], ...] = ()         # per-arm override of S_MIN / ALPHA_MIN
    no_trade_conf: Probability = 0.55                    # best model conf below -> low_conf_veto
    no_model_vetoes_cohort: bool = True                  # no prediction at all counts as below
    high_vol_rv: NonNegative = 0.80                      # annualised rv above which CONF_MIN rises
    high_vol_conf_bump: NonNegative = 0.05
    require_warm: bool = True                            # rows still warming up open nothing
    primary_tf: str = ""                                 # "" = accept the row's timeframe
    # -- multi-timeframe consensus
    consensus_enabled: bool = True
    consensus_shadow: bool = False                       # record would-be vetoes, do not block
    consensus_tf: str = "1h"
    consensus_feature: str = "ret_12"                    # read as features[f"{tf}_{feature}"]
    consensus_threshold: NonNegative = 0.002             # |log return| beyond 0.2% is "strong"
    # (no 1h model setting: nothing produces a 1h model, so a setting naming one was removed)
    # -- bandit
    bandit_prior_mean: float = 0.0
    bandit_prior_var: Positive = 0.04
    bandit_noise_var: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.25
    model_optimism: float = 0.10                         # added to the prior mean of model arms
    epsilon: Probability = 0.0
    reward_clip_bps: Positive = 50.0
    binary_reward: bool = False
    label_horizon: Annotated[int, Field(ge=1)] = 3       # primary bars until a reward matures
    # -- sizing
    sigma_target: NonNegative = 0.20
    pos_max: NonNegative = 1.0
    base_notional: NonNegative = 5_000.0
    vol_guard_enabled: bool = True
    sigma_cap: NonNegative = 0.80
    min_scale: Probability = 0.25
    kelly_enabled: bool = False
    kelly_fraction: NonNegative = 0.25
    kelly_payoff: Positive = 1.0                         # win/loss size ratio b in f* = p - q/b
    min_notional: NonNegative = 10.0
    # -- guards
    cooldown_bars: Count = 1                             # primary bars after an exit, per instrument
    max_positions: Count = 3                             # open + pending, all instruments
    max_drawdown: NonNegative = 0.10                     # kill switch, from the equity peak
    daily_loss_limit: NonNegative = 0.03                 # of the UTC day's starting equity
    max_consecutive_losses: Count = 5
    flatten_on_halt: bool = False                        # close everything when the kill switch trips
    # -- exits
    stop_loss_pct: BelowOne = 0.02                       # from the ENTRY price
    take_profit_pct: NonNegative = 0.04
    trailing_activation_pct: NonNegative = 0.01          # peak must gain this much first
    trailing_distance_pct: BelowOne = 0.005              # then stop at this distance from the peak
    atr_sl_mult: NonNegative = 2.0                       # x ATR at entry
    atr_tp_mult: NonNegative = 3.0
    time_stop_bars: Count = 12                           # primary bars
    exit_on_opposite: bool = True
    # -- paper execution
    fee_bps: NonNegative = 5.0                           # taker, per fill
    slippage_bps: NonNegative = 2.0                      # per fill, always against us
    initial_equity: Positive = 10_000.0
    seed: int = 0

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
        return arms

    @field_validator("side_eps")
    @classmethod
    def _known_side_eps_arms(cls, side_eps: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        for arm, _ in side_eps:
            if arm not in ARMS:
                raise ValueError(f"unknown arm {arm!r}; known: {list(ARMS)}")
        return side_eps

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
