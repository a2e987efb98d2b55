"""The bandit that picks among the eligible arms: Gaussian Thompson sampling
(``GaussianThompson``) and the reward it learns from (``reward_from_bps``). Pure logic.

Rewards are the decision's net PnL in bps over ``label_horizon`` primary bars, clipped to
+-``reward_clip_bps`` and divided by it, so rewards live in [-1, 1] and the optimism (0.1) and the
prior variances are on that scale. ``binary_reward`` gives +1 for a win and -1 for anything else.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from operators.strategy_config import MODEL_ARMS, StrategyConfig

__all__ = ["reward_from_bps", "GaussianThompson"]


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
