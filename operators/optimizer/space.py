"""The optimizer's search space: what a variant can change, and its validation.

A variant is production's ``StrategyConfig`` with some fields replaced. ``Param(name, low, high,
step)`` declares a numeric field on the grid ``low, low+step, ... <= high`` (integers for integer
fields); ``Choice(name, options)`` any field by listing its values. Allowed: every gate and
threshold (``s_min``, ``conf_min``, ``alpha_min``, ``side_eps``, ``no_trade_conf``,
``high_vol_*``), the arms (``arms`` subsets, ``amateurs_contrarian``, the cohort features, the
model names), the bandit (``model_optimism``, priors, ``epsilon``, reward shape), consensus
(``consensus_*``; ``consensus_tf`` only among the overlay timeframes the pipeline computes),
sizing (``sigma_target``, ``pos_max``, vol guard, Kelly), ``cooldown_bars``, ``max_positions``
and every exit (``stop_loss_pct``, ``take_profit_pct``, ``trailing_*``, ATR multiples,
``time_stop_bars``, ``exit_on_opposite``). ``primary_tf`` only as "" or the pipeline's primary
timeframe: the engine decides on the rows the pipeline scores, and a variant on another primary
timeframe would need the pipeline to compute (and score) it. ``FIXED_FIELDS`` lists what can
never vary and why (execution model, book scale, seed, risk policy, label horizon). Validation
happens at start and names every problem at once (``SearchSpaceError``).

Constraint callables must be picklable (module-level functions): the optimizer's state is
snapshotted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

from pydantic import ValidationError

from operators.bars import TIMEFRAMES
from operators.feature_catalog import FEATURE_NAMES
from operators.strategy_config import ARMS, MODEL_ARMS, StrategyConfig


# Fields a variant may never change, and why (the message of the validation error).
FIXED_FIELDS: dict[str, str] = {
    "initial_equity": "execution model: every book starts from the same equity, or ROIs are not comparable",
    "fee_bps": "execution model: every book pays the same fees",
    "slippage_bps": "execution model: every book pays the same slippage",
    "base_notional": "book scale, not a strategy choice (vary pos_max or sigma_target for size)",
    "min_notional": "book scale, not a strategy choice",
    "seed": "variants share production's seed (common random numbers): a difference in results comes "
            "from the settings, not the dice",
    "max_drawdown": "risk policy set by the operator: a variant must not win by loosening the guards",
    "daily_loss_limit": "risk policy set by the operator: a variant must not win by loosening the guards",
    "max_consecutive_losses": "risk policy set by the operator: a variant must not win by loosening the guards",
    "flatten_on_halt": "risk policy set by the operator",
    "require_warm": "safety: rows still warming up have undefined features",
    "label_horizon": "tied to the pipeline's label horizon (bandit rewards mature with the labels)",
}


class SearchSpaceError(ValueError):
    """The optimizer's search space is invalid or has no feasible variant; the message lists every problem."""


@dataclass(frozen=True)
class Param:
    """A numeric StrategyConfig field on the grid ``low, low + step, ..., <= high`` (``high`` is
    included when it lies on the grid). Integer fields need integer low / high / step."""

    name: str
    low: float
    high: float
    step: float

    def values(self, integer: bool = False) -> tuple:
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        if integer:
            return tuple(int(round(self.low + i * self.step)) for i in range(n))
        return tuple(round(self.low + i * self.step, 12) for i in range(n))


@dataclass(frozen=True)
class Choice:
    """Any StrategyConfig field by listing its values (lists become tuples for tuple fields)."""

    name: str
    options: tuple


@dataclass(frozen=True)
class Constraint:
    """A named rule every variant must satisfy: ``check(cfg) -> bool``. The callable must be
    picklable (a module-level function): the optimizer's state is snapshotted."""

    name: str
    check: Callable[[StrategyConfig], bool]


def at_least_one_model_arm(cfg: StrategyConfig) -> bool:
    """At least one model arm is enabled (cohort arms alone are vetoed whenever no model speaks)."""
    return any(a in MODEL_ARMS for a in cfg.arms)


def trailing_locks_profit(cfg: StrategyConfig) -> bool:
    """When the trailing stop is on, its distance is below its activation gain, so a trailing stop
    that triggers right after activation still exits at or above the entry."""
    if cfg.trailing_distance_pct <= 0 or cfg.trailing_activation_pct <= 0:
        return True
    return cfg.trailing_distance_pct < cfg.trailing_activation_pct


DEFAULT_CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("at_least_one_model_arm", at_least_one_model_arm),
    Constraint("trailing_locks_profit", trailing_locks_profit),
)

Dim = Union[Param, Choice]


@dataclass(frozen=True)
class SearchSpace:
    """Declared dimensions plus constraints. ``validate`` once at start; ``dims`` are then the
    normalised (name, values) pairs the samplers draw from."""

    params: tuple[Dim, ...]
    constraints: tuple[Constraint, ...] = DEFAULT_CONSTRAINTS

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def validate(self, base: StrategyConfig, primary_tf: str, overlay_tfs: Iterable[str]) -> tuple:
        """Check every dimension against StrategyConfig and the pipeline's timeframes; returns the
        normalised dims ``((name, values), ...)``. Raises ``SearchSpaceError`` listing all
        problems."""
        overlay_tfs = tuple(overlay_tfs)
        problems: list[str] = []
        fields = {f.name: f for f in dataclasses.fields(StrategyConfig)}
        dims = []
        seen: set[str] = set()
        if not self.params:
            problems.append("the search space is empty: declare at least one Param or Choice")
        for p in self.params:
            if not isinstance(p, (Param, Choice)):
                problems.append(f"{p!r}: not a Param or Choice")
                continue
            label = f"{type(p).__name__} {p.name!r}"
            if p.name in seen:
                problems.append(f"{label}: declared twice")
                continue
            seen.add(p.name)
            if p.name not in fields:
                near = difflib.get_close_matches(p.name, list(fields), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                problems.append(f"{label}: unknown field (StrategyConfig has no setting {p.name!r}){hint}")
                continue
            if p.name in FIXED_FIELDS:
                problems.append(f"{label}: this field cannot vary: {FIXED_FIELDS[p.name]}")
                continue
            current = getattr(base, p.name)
            values, errs = (_param_values(p, current) if isinstance(p, Param) else _choice_values(p, current))
            problems += [f"{label}: {e}" for e in errs]
            if errs:
                continue
            for v in values:
                err = _field_problem(p.name, v, base, primary_tf, overlay_tfs)
                if err:
                    problems.append(f"{label}: value {v!r} {err}")
                    break
            dims.append((p.name, values))
        names: set[str] = set()
        for c in self.constraints:
            if not isinstance(c, Constraint) or not c.name or not callable(c.check):
                problems.append(f"constraint {c!r}: needs a non-empty name and a callable check(cfg) -> bool")
                continue
            if c.name in names:
                problems.append(f"constraint {c.name!r}: declared twice")
            names.add(c.name)
            try:
                pickle.dumps(c.check)
            except Exception:  # noqa: BLE001 - any pickling failure means the same thing
                problems.append(f"constraint {c.name!r}: its check cannot be pickled (a lambda or closure?); "
                                "the optimizer state is snapshotted: use a module-level function")
        if problems:
            raise SearchSpaceError("invalid optimizer search space:\n  - " + "\n  - ".join(problems))
        return tuple(dims)

    def grid_size(self, dims: tuple) -> int:
        return math.prod(len(v) for _, v in dims) if dims else 0


def _param_values(p: Param, current) -> tuple[tuple, list[str]]:
    errs = []
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        return (), [f"field is a {type(current).__name__}, not a number: use Choice(name, options)"]
    nums = {"low": p.low, "high": p.high, "step": p.step}
    for k, v in nums.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            errs.append(f"{k} must be a finite number, got {v!r}")
    if errs:
        return (), errs
    if p.low > p.high:
        errs.append(f"low {p.low} > high {p.high}")
    if p.step <= 0:
        errs.append(f"step must be > 0, got {p.step}")
    integer = isinstance(current, int)
    if integer:
        bad = [k for k, v in nums.items() if float(v) != int(v)]
        if bad:
            errs.append(f"integer field: {', '.join(bad)} must be whole numbers, got "
                        f"{', '.join(f'{k}={nums[k]}' for k in bad)}")
    if errs:
        return (), errs
    n = int(math.floor((p.high - p.low) / p.step + 1e-9)) + 1
    if n > 10_000:
        return (), [f"{n} grid values (step {p.step} too small for [{p.low}, {p.high}]); at most 10000"]
    return p.values(integer), []


def _choice_values(c: Choice, current) -> tuple[tuple, list[str]]:
    opts = c.options
    if isinstance(opts, (str, bytes)) or not isinstance(opts, (tuple, list)) or len(opts) == 0:
        return (), [f"options must be a non-empty list, got {opts!r}"]
    out = []
    for o in opts:
        v, err = _coerce(o, current)
        if err:
            return (), [f"option {o!r}: {err}"]
        if v in out:
            return (), [f"option {o!r} is listed twice"]
        out.append(v)
    return tuple(out), []


def _coerce(v, current) -> tuple[Any, str]:
    """``v`` as the type of the field's current value, or an error."""
    if isinstance(current, bool):
        return (v, "") if isinstance(v, bool) else (None, f"must be true/false (a switch), got {type(v).__name__}")
    if isinstance(current, int):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            return None, "must be a whole number"
        return int(v), ""
    if isinstance(current, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None, "must be a finite number"
        return float(v), ""
    if isinstance(current, str):
        return (v, "") if isinstance(v, str) else (None, "must be a string")
    if isinstance(current, tuple):
        if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)):
            return None, "must be a list"
        return tuple(tuple(x) if isinstance(x, list) else x for x in v), ""
    return v, ""


def _field_problem(name: str, v, base: StrategyConfig, primary_tf: str, overlay_tfs: tuple) -> str:
    """Why value ``v`` of field ``name`` cannot be a variant's ("" when it can)."""
    if name == "primary_tf" and v not in ("", primary_tf):
        return (f"is not the pipeline's primary timeframe {primary_tf!r}: the engine only sees the rows the "
                f"pipeline scores; a variant on another primary timeframe needs the pipeline to compute and "
                f"score it (change primary_tf in the settings instead); allowed: '' or {primary_tf!r}")
    if name == "consensus_tf" and v not in overlay_tfs:
        return (f"is not an overlay timeframe the pipeline computes ({list(overlay_tfs)}); add it to "
                f"overlay_tfs in the settings first" if v in TIMEFRAMES else
                f"is not a timeframe (known: {list(TIMEFRAMES)})")
    if name in ("pros_feature", "amateurs_feature", "consensus_feature") and v not in FEATURE_NAMES:
        return f"is not a feature the pipeline computes (known: {FEATURE_NAMES})"
    try:
        base.replace(**{name: v})
    except (ValueError, TypeError) as err:
        return f"is rejected by StrategyConfig: {_one_line(err)}"
    return ""


def _one_line(err: Exception) -> str:
    """An error's message on one line (a pydantic ``ValidationError`` spans several): one problem per line."""
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return str(err)


def default_space(overlay_tfs: Iterable[str] = ("15m", "1h")) -> SearchSpace:
    """The default space, around StrategyConfig's defaults (in brackets):

    - gates: s_min 0.06..0.24 by 0.03 [0.12]; conf_min 0.55..0.75 by 0.05 [0.65]; alpha_min
      0.05..0.25 by 0.05 [0.10]; no_trade_conf 0.45..0.65 by 0.05 [0.55];
    - arms: arms among 5 subsets that keep a model arm; amateurs followed or faded;
      model_optimism 0..0.3 by 0.05 [0.1];
    - consensus: consensus_threshold 0.001..0.004 by 0.001 [0.002]; consensus_tf among the
      pipeline's overlays;
    - exits: stop_loss_pct 0.5%..3% by 0.5% [2%]; take_profit_pct 1%..6% by 1% [4%];
      trailing_activation_pct 0.5%..2% by 0.5% [1%]; trailing_distance_pct 0.25%..1% by 0.25%
      [0.5%];
    - size and pace: pos_max 0.25..1 by 0.25 [1]; cooldown_bars 0..4 [1].

    Constraints: ``DEFAULT_CONSTRAINTS`` (a model arm enabled; trailing distance < activation).
    The primary timeframe is not varied: the pipeline scores one."""
    overlays = tuple(overlay_tfs)
    dims: list[Dim] = [
        Param("s_min", 0.06, 0.24, 0.03),
        Param("conf_min", 0.55, 0.75, 0.05),
        Param("alpha_min", 0.05, 0.25, 0.05),
        Param("no_trade_conf", 0.45, 0.65, 0.05),
        Param("model_optimism", 0.0, 0.3, 0.05),
        Choice("arms", (ARMS, ("pros", "model_online", "model_onnx"), ("model_online", "model_onnx"),
                        ("pros", "amateurs", "model_online"), ("pros", "model_online"))),
        Choice("amateurs_contrarian", (False, True)),
        Param("consensus_threshold", 0.001, 0.004, 0.001),
        Param("stop_loss_pct", 0.005, 0.03, 0.005),
        Param("take_profit_pct", 0.01, 0.06, 0.01),
        Param("trailing_activation_pct", 0.005, 0.02, 0.005),
        Param("trailing_distance_pct", 0.0025, 0.01, 0.0025),
        Param("pos_max", 0.25, 1.0, 0.25),
        Param("cooldown_bars", 0, 4, 1),
    ]
    if len(overlays) > 1:
        dims.append(Choice("consensus_tf", overlays))
    return SearchSpace(tuple(dims))
