"""Decisions: the tagged records (``Decision``, ``ArmSignal``), arm evaluation, gates, consensus
and sizing. Pure logic: no bytewax, no I/O. The thresholds are ``StrategyConfig``
(``operators.strategy_config``); the bandit that picks among eligible arms is ``operators.bandit``.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import msgspec

from operators.strategy_config import ARMS, COHORT_ARMS, StrategyConfig

ACTIONS = ("open_long", "open_short", "close", "hold", "none")
ORIGINS = ("production", "experimental")


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

class Tagged(msgspec.Struct, kw_only=True):
    """Every decision, fill, equity and event row says whose it is: origin (production or an
    experimental variant), strategy, variant and the config's hash."""

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


def best_p_win(predictions: dict, side: int) -> Optional[float]:
    """``p_win`` of the most confident prediction of the row (a cohort arm's win probability)."""
    if not predictions or side == 0:
        return None
    best = max(predictions.values(), key=lambda p: p.confidence)
    return p_win(best, side)


def entry_atr(features: dict) -> Optional[float]:
    """The row's ATR, recorded with an entry for the ATR stops (None unless finite and > 0)."""
    v = features.get("atr")
    try:
        v = float(v) if v is not None else None
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


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
