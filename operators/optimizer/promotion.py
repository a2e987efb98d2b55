"""Applying a promotion to production: a new engine on the winner's config, the book kept.

Open production positions on promotion: the book is kept. Positions, pending orders, cash,
equity curve, the risk state (peak, kill switch, pauses, cooldown clocks) and the bandit's
evidence carry over; the new config governs from the next bar on: its stops / targets /
trailing / time stop manage the positions already open (stops stay measured from each
position's ENTRY price and the ATR recorded at entry), its gates and sizing apply to new entries.
Nothing is force-closed (a lower ``max_positions`` only blocks new entries until the count falls).
"""

from __future__ import annotations

import copy
from typing import Optional

from operators.bandit import GaussianThompson
from operators.optimizer.results import Promotion
from operators.strategy import StrategyEngine
from operators.strategy_config import StrategyConfig


_UNSWAPPABLE = ("initial_equity",)


def apply_promotion(engine: StrategyEngine, promotion: Promotion) -> Optional[StrategyEngine]:
    """A NEW production engine running ``promotion.new_config`` with everything else of
    ``engine`` carried over (the old engine is not modified); None when the promotion is stale
    (production's config hash is no longer ``promotion.old_hash``). Call it at a bar boundary.

    Rule for open positions: keep the book. Positions, pending orders, cash, fees, marks, the
    equity curve, the risk state (peak, kill switch, pauses, last exits for cooldowns), pending
    bandit rewards and the decision counters carry over unchanged; the new config manages the
    open positions from the next bar (its stop loss / take profit / trailing / ATR multiples /
    time stop, still measured from each position's entry price and entry ATR) and gates and
    sizes new entries. Nothing is force-closed.

    Everything StrategyEngine derives from its config is rebuilt: ``cfg``, ``config_hash``,
    ``tags`` and the book's tags (later fills and equity carry the new hash), the book's fee and
    slippage, and the bandit: a new ``GaussianThompson`` from the new config (arms, priors,
    model optimism, epsilon) that keeps the learned evidence (n, sums, selections) of the arms
    both configs enable and the old generator's state (the random stream continues)."""
    if engine.config_hash != promotion.old_hash:
        return None
    new_cfg = config_from_dict(promotion.new_config)
    for name in _UNSWAPPABLE:
        if getattr(new_cfg, name) != getattr(engine.cfg, name):
            raise ValueError(f"apply_promotion: {name} differs ({getattr(engine.cfg, name)} -> "
                             f"{getattr(new_cfg, name)}); the book cannot change it mid-flight, restart instead")
    new = copy.deepcopy(engine)
    new.cfg = new_cfg
    new.config_hash = new_cfg.config_hash()
    new.tags = {"origin": engine.origin, "strategy_id": engine.strategy_id, "variant_id": engine.variant_id,
                "config_hash": new.config_hash}
    new.book.tags = dict(new.tags)
    new.book.fee_bps = new_cfg.fee_bps
    new.book.slippage_bps = new_cfg.slippage_bps
    old_b = new.bandit
    b = GaussianThompson.from_config(new_cfg)
    for arm in b.arms:
        if arm in old_b.n:
            b.n[arm] = old_b.n[arm]
            b.sum[arm] = old_b.sum[arm]
            b.sumsq[arm] = old_b.sumsq[arm]
            b.selections[arm] = old_b.selections[arm]
    b.rng = old_b.rng
    new.bandit = b
    return new


def config_from_dict(d: dict) -> StrategyConfig:
    """A StrategyConfig from ``to_dict()`` output, also after a JSON round trip (lists -> tuples)."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v
    return StrategyConfig(**{k: tup(v) for k, v in d.items()})
