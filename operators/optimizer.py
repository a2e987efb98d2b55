"""Live optimizer (SPEC §7, issue 6): paper variants of the production strategy on the same stream,
honest scoring, gated promotion. Pure logic: no bytewax, no I/O, no clock (event time comes in
with the records and as ``now_ms``).

How it fits
-----------
The portfolio stage owns the production ``StrategyEngine``; the ``Optimizer`` owns up to
``max_variants`` more engines (origin ``experimental``, production's ``strategy_id``,
variant ids ``v0001``, ``v0002``...), each with its own paper book on the same rows and bars.
Variants never see production's book and production never sees theirs: the portfolio feeds
every engine the same inputs and hands ALL resulting records (production's too) to
``observe``. ``metrics(now_ms)`` gives one ``VariantMetrics`` row per variant plus one for
production (table ``variant_metrics``); ``maybe_promote(now_ms)`` returns at most one
``Promotion``, which the portfolio applies to production at a bar boundary with
``apply_promotion`` and follows with ``refill(now_ms)``. With ``enabled=False`` nothing is
built and every call returns at once ("off means off").

Search space: what a variant can change
---------------------------------------
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

Sampling
--------
``random``: each dimension uniform over its grid values / options, from a numpy Generator seeded
by ``OptimizerConfig.seed`` and kept in the state. ``grid``: the k-th variant is the k-th point
of a scrambled Halton sequence (seeded) mapped onto the grid, a deterministic walk whose every
prefix is spread evenly over each dimension and the joint space -- a subset of the full grid
without enumerating it. Draws that equal production, a variant tried before, or that violate a
constraint are skipped. ``near``: perturb a config (the promoted winner) by at most
``near_steps`` grid steps per Param (clipped to [low, high]) and switch each Choice with
probability 1/4.

Metrics (all from the records, per strategy; ``operators.stats`` has the formulas)
-----------------------------------------------------------------------------------
- equity curve: one value per distinct mark time (a 1m bar end), the LAST mark of that time
  (``EquityPoint``s of several instruments share a ts); a mark older than the newest time
  updates the newest value, like ``StrategyEngine.sharpe``. Per-minute simple returns, the open
  minute included. Sharpe = mean / sd(ddof=1) x sqrt(periods_per_year); Sortino = mean /
  downside deviation (target 0, over all returns) x sqrt(periods_per_year).
- ROI = last equity / initial_equity - 1; max drawdown over every mark, from a peak that starts at
  initial_equity (as the engine's risk state).
- trades, win rate, average PnL, profit factor: exit ``Fill``s (``realised_pnl`` is the trade's
  net PnL, both fees); a trade closes when its exit fill is observed.
- flip rate: per instrument, decisions with side 0 dropped, share of consecutive signalled
  decisions whose side changed; pooled over instruments (flips / pairs).
- latency p50 / p99: ``Decision.latency_ms`` of the last ``latency_window`` decisions.
- psr, dsr: the paired test of the variant against production (issue 12). Both equity curves
  are sampled at the end of every primary bar (the last mark of the bar wins) from the variant's
  start, so the two per-bar return series cover the SAME bars; ``stats.sharpe_difference_test``
  (Ledoit & Wolf 2008: HAC delta-method test of the Sharpe difference, small-sample Student t)
  gives the one-sided p-value of "the variant's Sharpe is higher". psr = 1 - p; dsr = 1 - p / w_k,
  deflated for the search: variant k (the k-th ever drawn) may spend the share w_k =
  ``stats.trial_weight(k, max_variants)`` of the error budget alpha = 1 - ``psr_threshold``
  (1/32 each for the first 16, 1/64 for the next 16, ...; the weights sum to 1), so dsr >=
  psr_threshold means p <= alpha * w_k, and the chance that any skill-less variant is ever promoted
  stays below alpha however long the search runs (weighted Bonferroni). This replaces PSR/DSR
  against production's *estimated* Sharpe as a fixed benchmark, which ignored that production's
  Sharpe is measured with error on the same bars (and the pairing that cancels their shared
  noise).

State is O(1) per strategy (streaming moments, counters, a bounded latency window), so bytewax
snapshots it cheaply every epoch; everything is plain Python + numpy Generators (picklable,
deep-copyable). Constraint callables must be picklable too: module-level functions.

Promotion
---------
Every variant is a trial of ``min_runtime_ms`` of event time (since its first record) and is
tested ONCE, at the first ``maybe_promote`` after its trial ends (outside a cool-off): a statistic
looked at every hour until it crosses a line crosses it by luck sooner or later, a test made once
does so with the probability it states. Gates, all required: trades >= ``min_trades``; roi >=
``min_roi``; win rate >= ``min_win_rate``; annualised Sharpe >= ``min_sharpe``; dsr >=
``psr_threshold``. Among the variants tested at that moment that pass, the highest dsr wins (then
Sharpe, then the older id); every other variant tested then retires (its one test is spent), and
``refill`` draws replacements. The optimizer takes the winner's config as the new production config
(new variants derive from it and the ``config`` column diffs against it), starts the cool-off and
marks the slot ``promoted``; the portfolio applies it and refills (near the winner when
``refill_near_winner``).

Open production positions on promotion (``apply_promotion``): the book is kept. Positions,
pending orders, cash, equity curve, the risk state (peak, kill switch, pauses, cooldown clocks)
and the bandit's evidence carry over; the new config governs from the next bar on: its stops /
targets / trailing / time stop manage the positions already open (stops stay measured from each
position's ENTRY price and the ATR recorded at entry), its gates and sizing apply to new entries.
Nothing is force-closed (a lower ``max_positions`` only blocks new entries until the count falls).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import pickle
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import msgspec
import numpy as np

from operators import stats
from operators.bars import TIMEFRAMES
from operators.decision import ARMS, MODEL_ARMS, Decision, GaussianThompson, StrategyConfig
from operators.features import FEATURE_NAMES
from operators.paper import EquityPoint, Fill
from operators.strategy import StrategyEngine

__all__ = [
    "Param", "Choice", "Constraint", "SearchSpace", "SearchSpaceError", "FIXED_FIELDS", "default_space",
    "at_least_one_model_arm", "trailing_locks_profit", "DEFAULT_CONSTRAINTS", "Variant", "draw_variant",
    "OptimizerConfig", "Optimizer", "VariantMetrics", "VARIANT_METRICS_COLUMNS", "Verdict", "Promotion",
    "apply_promotion", "config_from_dict",
]

SAMPLING = ("random", "grid")
STATUSES = ("active", "promoted", "retired")
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

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
    """The optimizer's search space or configuration is invalid; the message lists every problem."""


# --------------------------------------------------------------------------------------------
# search space
# --------------------------------------------------------------------------------------------

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
        return f"is rejected by StrategyConfig: {err}"
    return ""


def default_space(overlay_tfs: Iterable[str] = ("15m", "1h")) -> SearchSpace:
    """The default space, around the SPEC §6 defaults (in brackets):

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


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    variant_id: str
    cfg: StrategyConfig
    overrides: dict             # field -> value that differs from the production config it came from


def _halton_point(n_dims: int, index: int, seed: int) -> np.ndarray:
    from scipy.stats import qmc

    h = qmc.Halton(d=n_dims, scramble=True, seed=seed)
    if index:
        h.fast_forward(index)
    return h.random(1)[0]


def _nearest_index(values: tuple, v) -> int:
    if v in values:
        return values.index(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(np.argmin([abs(float(x) - float(v)) for x in values]))
    return -1


def draw_overrides(dims: tuple, rng: np.random.Generator, *, mode: str = "random", index: int = 0,
                   seed: int = 0, near: Optional[StrategyConfig] = None, near_steps: int = 1) -> dict:
    """One point of the space as {field: value}. ``near``: perturb that config (each Param by at
    most ``near_steps`` grid steps, clipped to the grid; each Choice switched with p = 1/4; its
    off-grid values snap to the nearest grid value first). Otherwise ``mode`` ``random`` (uniform
    per dimension, from ``rng``) or ``grid`` (the ``index``-th point of the seeded scrambled
    Halton sequence mapped onto the grid)."""
    out = {}
    if near is not None:
        for name, values in dims:
            i0 = _nearest_index(values, getattr(near, name))
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)
            if numeric and i0 >= 0:
                j = i0 + int(rng.integers(-near_steps, near_steps + 1))
                out[name] = values[min(len(values) - 1, max(0, j))]
            elif i0 >= 0 and rng.random() >= 0.25:
                out[name] = values[i0]
            else:
                out[name] = values[int(rng.integers(len(values)))]
        return out
    if mode == "grid":
        u = _halton_point(len(dims), index, seed)
        for (name, values), x in zip(dims, u):
            out[name] = values[min(len(values) - 1, int(x * len(values)))]
        return out
    for name, values in dims:
        out[name] = values[int(rng.integers(len(values)))]
    return out


def draw_variant(dims: tuple, constraints: tuple, base: StrategyConfig, rng: np.random.Generator, *,
                 variant_id: str, mode: str = "random", index: int = 0, seed: int = 0,
                 near: Optional[StrategyConfig] = None, near_steps: int = 1, exclude: Iterable[str] = (),
                 max_draws: int = 500) -> tuple[Optional[Variant], int, dict]:
    """Draw until a variant differs from ``base``, is not in ``exclude`` (config hashes) and
    satisfies every constraint. Returns (variant or None after ``max_draws``, the next grid
    index, {rejection reason: count})."""
    exclude = set(exclude)
    rejected: dict[str, int] = {}
    for _ in range(max_draws):
        point = draw_overrides(dims, rng, mode=mode, index=index, seed=seed, near=near, near_steps=near_steps)
        index += 1
        overrides = {k: v for k, v in point.items() if getattr(base, k) != v}
        if not overrides:
            rejected["same_as_production"] = rejected.get("same_as_production", 0) + 1
            continue
        try:
            cfg = base.replace(**overrides)
        except (ValueError, TypeError):
            rejected["invalid_config"] = rejected.get("invalid_config", 0) + 1
            continue
        h = cfg.config_hash()
        if h in exclude:
            rejected["already_tried"] = rejected.get("already_tried", 0) + 1
            continue
        failed = None
        for c in constraints:
            try:
                ok = bool(c.check(cfg))
            except Exception as err:  # a user constraint that crashes is a bug to fix, not a rejection
                raise SearchSpaceError(f"constraint {c.name!r} raised {err!r} on {overrides}") from err
            if not ok:
                failed = c.name
                break
        if failed:
            rejected[failed] = rejected.get(failed, 0) + 1
            continue
        return Variant(variant_id, cfg, overrides), index, rejected
    return None, index, rejected


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer switches and promotion gates. Defaults and why:

    - ``enabled`` False: off means off (no engines, no metrics, no cost) until asked for;
    - ``max_variants`` 16 (SPEC): 17 engines on a per-bar path stay far below the latency budget;
    - ``sampling`` "random", ``seed`` 0 (the pipeline passes its own seed);
    - ``metrics_every_bars`` 12: one row per variant per hour of 5m bars, plus one on every
      closed trade;
    - gates: ``min_trades`` 30 (SPEC); ``min_runtime_ms`` 24 h of event time (a full daily cycle of
      crypto sessions); ``min_roi`` 0 (must not lose money); ``min_win_rate`` 0 (off: a trend
      follower may win 35% and still be better; the dsr gate carries the statistics);
      ``min_sharpe`` 1.0 annualised (a swap must be worth its churn); ``psr_threshold`` 0.95: the
      family-wise error budget alpha = 0.05 of the paired, deflated test against production
      (module docstring: every variant spends its share once, at the end of its trial);
    - ``cool_off_ms`` 24 h: production keeps a new config at least a day before the next swap;
    - ``refill_near_winner`` True, ``near_steps`` 1: explore around what just won;
    - ``periods_per_year`` 525,600 (1m equity marks, 24/7 market);
    - ``latency_window`` 1024 decisions per strategy; ``max_draws`` 500 draws per variant before
      the sampler gives up (constraints or a small, exhausted grid).
    """

    enabled: bool = False
    max_variants: int = 16
    sampling: str = "random"
    seed: int = 0
    metrics_every_bars: int = 12
    min_trades: int = 30
    min_runtime_ms: int = DAY_MS
    min_roi: float = 0.0
    min_win_rate: float = 0.0
    min_sharpe: float = 1.0
    psr_threshold: float = 0.95
    cool_off_ms: int = DAY_MS
    refill_near_winner: bool = True
    near_steps: int = 1
    periods_per_year: float = stats.MINUTES_PER_YEAR
    latency_window: int = 1024
    max_draws: int = 500

    def __post_init__(self) -> None:
        problems = []
        if self.sampling not in SAMPLING:
            problems.append(f"sampling must be one of {list(SAMPLING)}, got {self.sampling!r}")
        for name in ("max_variants", "metrics_every_bars", "near_steps", "latency_window", "max_draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("min_trades", "min_runtime_ms", "cool_off_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("min_roi", "min_sharpe"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{name} must be a finite number, got {v!r}")
        for name in ("min_win_rate", "psr_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                problems.append(f"{name} must be in [0, 1], got {v!r}")
        if not isinstance(self.periods_per_year, (int, float)) or not self.periods_per_year > 0:
            problems.append(f"periods_per_year must be > 0, got {self.periods_per_year!r}")
        if problems:
            raise SearchSpaceError("invalid optimizer config:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

class VariantMetrics(msgspec.Struct, kw_only=True):
    """One row of table ``variant_metrics`` (fields = columns, in order)."""

    ts: int                             # event time of the evaluation (ms)
    origin: str                         # production | experimental
    strategy_id: str
    variant_id: str
    config_hash: str
    config: str                         # JSON of the settings that differ from production
    status: str                         # active | promoted | retired
    runtime_ms: int
    roi: float
    trades: int
    win_rate: Optional[float]
    avg_pnl: Optional[float]
    sharpe: Optional[float]             # annualised, per-minute equity returns
    sortino: Optional[float]
    profit_factor: Optional[float]
    max_drawdown: float
    flip_rate: Optional[float]
    latency_p50_ms: Optional[float]
    latency_p99_ms: Optional[float]
    psr: Optional[float]                # vs production over the same minutes
    dsr: Optional[float]                # deflated for the variants tried

    def row(self) -> list:
        return [getattr(self, c) for c in VARIANT_METRICS_COLUMNS]


VARIANT_METRICS_COLUMNS: list[str] = list(VariantMetrics.__struct_fields__)


class Verdict(msgspec.Struct, kw_only=True):
    """A variant's metrics and the promotion gates it fails (empty: it qualifies)."""

    variant_id: str
    metrics: VariantMetrics
    test: Optional[stats.SharpeDiff]    # the paired test against production on the same bars
    weight: float                       # its share of the error budget (stats.trial_weight)
    level: float                        # alpha x weight: the p-value it must reach
    failed: tuple = ()

    @property
    def qualifies(self) -> bool:
        return not self.failed


class Promotion(msgspec.Struct, kw_only=True):
    """An audited swap of the production config (also an ``events`` row via ``as_event``)."""

    ts: int
    strategy_id: str
    variant_id: str
    old_config: dict
    new_config: dict
    old_hash: str
    new_hash: str
    changes: dict                       # field -> [old, new]
    metrics: VariantMetrics
    reason: str
    n_trials: int

    def as_event(self):
        from operators.events import Event

        detail = {"variant_id": self.variant_id, "old_hash": self.old_hash, "new_hash": self.new_hash,
                  "changes": self.changes, "old_config": self.old_config, "new_config": self.new_config,
                  "n_trials": self.n_trials, "metrics": msgspec.to_builtins(self.metrics)}
        return Event(kind="promotion", ts=self.ts, reason=self.reason,
                     detail=json.dumps(detail, sort_keys=True, default=_jsonable),
                     source=f"optimizer:{self.strategy_id}")


def _jsonable(x):
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    return str(x)


@functools.lru_cache(maxsize=256)  # configs are frozen and hashable; one metrics row per variant per schedule
def _config_json(cfg: StrategyConfig, base: StrategyConfig) -> str:
    diff = {k: v for k, v in cfg.to_dict().items() if getattr(base, k) != getattr(cfg, k)}
    return json.dumps(diff, sort_keys=True, default=_jsonable)


def config_from_dict(d: dict) -> StrategyConfig:
    """A StrategyConfig from ``to_dict()`` output, also after a JSON round trip (lists -> tuples)."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v
    return StrategyConfig(**{k: tup(v) for k, v in d.items()})


# --------------------------------------------------------------------------------------------
# metric inputs of one strategy
# --------------------------------------------------------------------------------------------

@dataclass
class Curve:
    """Per-minute returns of one equity curve: one value per distinct mark time (the latest mark
    wins), the return of a minute pushed when a later minute starts; the open minute is added at
    read time (``returns``)."""

    ts: Optional[int] = None
    eq: float = 0.0
    prev: Optional[float] = None
    ret: stats.ReturnStats = field(default_factory=stats.ReturnStats)

    def mark(self, ts: int, equity: float) -> None:
        if self.ts is None:
            self.ts, self.eq = ts, equity
            return
        if ts > self.ts:
            if self.prev is not None and self.prev > 0:
                self.ret.push(self.eq / self.prev - 1.0)
            self.prev = self.eq
            self.ts = ts
        self.eq = equity

    def returns(self) -> stats.ReturnStats:
        open_r = self.eq / self.prev - 1.0 if self.prev is not None and self.prev > 0 else None
        return self.ret.plus(open_r)


@dataclass
class Track:
    """Everything the metrics of one strategy need, updated record by record."""

    initial_equity: float
    window: int = 1024
    started_ms: Optional[int] = None
    equity: Optional[float] = None
    peak: float = 0.0
    max_dd: float = 0.0
    curve: Curve = field(default_factory=Curve)
    trades: stats.TradeStats = field(default_factory=stats.TradeStats)
    last_side: dict = field(default_factory=dict)   # instrument -> last non-zero decision side
    flips: int = 0
    pairs: int = 0
    latencies: deque = field(default_factory=deque)
    config_hash: str = ""
    variant_id: str = ""

    def __post_init__(self) -> None:
        self.peak = max(self.peak, self.initial_equity)
        if self.latencies.maxlen != self.window:
            self.latencies = deque(self.latencies, maxlen=self.window)

    def start(self, ts: int) -> None:
        if self.started_ms is None:
            self.started_ms = ts

    def on_equity(self, p: EquityPoint) -> None:
        self.start(p.ts)
        self.equity = p.equity
        self.peak = max(self.peak, p.equity)
        if self.peak > 0:
            self.max_dd = max(self.max_dd, (self.peak - p.equity) / self.peak)
        self.curve.mark(p.ts, p.equity)

    def on_fill(self, f: Fill) -> bool:
        self.start(f.ts)
        if f.realised_pnl is None:
            return False
        self.trades.push(f.realised_pnl)
        return True

    def on_decision(self, d: Decision) -> None:
        self.start(d.ts)
        self.latencies.append(float(d.latency_ms))
        if d.side:
            inst = f"{d.exchange}:{d.symbol}"
            last = self.last_side.get(inst)
            if last is not None:
                self.pairs += 1
                self.flips += int(d.side != last)
            self.last_side[inst] = d.side

    def flip_rate(self) -> Optional[float]:
        return self.flips / self.pairs if self.pairs else None


@dataclass
class PeriodCurve:
    """Per-bar returns of one equity curve: the equity at the end of each ``period_ms`` period (the
    last mark in it wins), the return of a period pushed when a later period starts; ``returns``
    maps period index -> return. Periods without marks carry the last equity (a zero return)."""

    period_ms: int
    cur: Optional[int] = None       # the open period
    eq: float = 0.0                 # its latest equity
    prev: Optional[float] = None    # equity at the end of the period before it
    returns: dict = field(default_factory=dict)

    def mark(self, ts: int, equity: float) -> None:
        k = (ts - 1) // self.period_ms  # a mark at a bar's end belongs to that bar's period
        if self.cur is None:
            self.cur, self.eq = k, equity
            return
        if k > self.cur:
            for j in range(self.cur, k):  # close the open period, and any empty ones after it
                if self.prev is not None and self.prev > 0:
                    self.returns[j] = self.eq / self.prev - 1.0
                self.prev = self.eq
            self.cur = k
        self.eq = equity

    def since(self, first: int) -> None:
        """Forget the returns of periods before ``first``."""
        for k in [k for k in self.returns if k < first]:
            del self.returns[k]


def paired(variant: PeriodCurve, production: PeriodCurve) -> tuple[np.ndarray, np.ndarray]:
    """The two return series over the closed periods both have, in period order."""
    ks = sorted(k for k in variant.returns if k in production.returns)
    return (np.array([variant.returns[k] for k in ks], dtype=float),
            np.array([production.returns[k] for k in ks], dtype=float))


@dataclass
class Slot:
    """One live variant: its engine, its metric inputs, its per-bar returns for the paired test."""

    variant: Variant
    engine: StrategyEngine
    track: Track
    periods: Optional[PeriodCurve] = None
    status: str = "active"
    number: int = 0

    @property
    def variant_id(self) -> str:
        return self.variant.variant_id


# --------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------

class Optimizer:
    """Variants, their metrics, and promotion. See the module docstring.

    ``production`` is production's config now; ``primary_tf`` / ``overlay_tfs`` are the
    timeframes the pipeline computes (variants cannot use others)."""

    def __init__(self, cfg: OptimizerConfig, production: StrategyConfig, *, strategy_id: str = "ensemble",
                 space: Optional[SearchSpace] = None, primary_tf: str = "5m",
                 overlay_tfs: Iterable[str] = ("15m", "1h")) -> None:
        self.cfg = cfg
        self.base = production
        self.strategy_id = strategy_id
        self.slots: list[Slot] = []
        self.tried = 0                              # variants ever created (N of the deflation)
        self.promotions = 0
        self.last_promotion_ms: Optional[int] = None
        self.tested = 0                             # variants that had their one test
        self.now_ms: Optional[int] = None           # newest event time observed
        self.period_ms = TIMEFRAMES.get(primary_tf, 300_000)
        self._prod_periods = PeriodCurve(self.period_ms)
        self._by_id: dict[str, Slot] = {}
        self._prod: Optional[Track] = None
        self._bars_since = 0
        self._last_bar_ts: Optional[int] = None
        self._trade_closed = False
        self._grid_index = 0
        self._seen: set[str] = set()
        if not cfg.enabled:
            self.space = None
            self.dims: tuple = ()
            self.rng = None
            return
        self.space = space if space is not None else default_space(overlay_tfs)
        self.dims = self.space.validate(production, primary_tf, overlay_tfs)
        self.rng = np.random.default_rng(cfg.seed)
        self._prod = Track(production.initial_equity, cfg.latency_window, config_hash=production.config_hash())
        self._seen.add(production.config_hash())
        rejected: dict[str, int] = {}
        while len(self.slots) < cfg.max_variants:
            slot, rej = self._new_slot(None, None)
            for k, v in rej.items():
                rejected[k] = rejected.get(k, 0) + v
            if slot is None:
                break
        if not self.slots:
            raise SearchSpaceError(
                f"no variant of the search space satisfies the constraints after {cfg.max_draws} draws "
                f"(rejections: {rejected}); widen the space or relax the constraints")

    def __setstate__(self, state: dict) -> None:
        # a snapshot taken before the paired test existed (issue 12) resumes with empty per-bar
        # curves: the running trials are tested on the bars from the restart on
        self.__dict__.update(state)
        self.__dict__.setdefault("tested", 0)
        self.__dict__.setdefault("period_ms", 300_000)
        self.__dict__.setdefault("_prod_periods", PeriodCurve(self.period_ms))
        self.__dict__.pop("retired_srs", None)
        for slot in self.slots:
            if getattr(slot, "periods", None) is None:
                slot.periods = PeriodCurve(self.period_ms)
            slot.__dict__.pop("bench", None)

    # ------------------------------------------------------------------ status
    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def engines(self) -> list[StrategyEngine]:
        """The live variants' engines (empty when off). Promoted / retired slots stop running."""
        return [s.engine for s in self.slots if s.status == "active"]

    def variant(self, variant_id: str) -> Optional[Variant]:
        s = self._by_id.get(variant_id)
        return s.variant if s is not None else None

    def variant_ids(self) -> list[str]:
        return [s.variant_id for s in self.slots]

    # ------------------------------------------------------------------ variants
    def next_variant(self, near: Optional[StrategyConfig] = None, now_ms: Optional[int] = None) -> Optional[Variant]:
        """Draw the next variant from production's config (``near``: around that config) with the
        optimizer's own generator / grid position, and start it in a new slot (its engine joins
        ``engines()``). None when off or when ``max_draws`` draws found nothing new."""
        if not self.enabled:
            return None
        slot, _ = self._new_slot(near, now_ms)
        return slot.variant if slot is not None else None

    def _new_slot(self, near: Optional[StrategyConfig], now_ms: Optional[int]) -> tuple[Optional[Slot], dict]:
        vid = f"v{self.tried + 1:04d}"
        v, self._grid_index, rejected = draw_variant(
            self.dims, self.space.constraints, self.base, self.rng, variant_id=vid, mode=self.cfg.sampling,
            index=self._grid_index, seed=self.cfg.seed, near=near, near_steps=self.cfg.near_steps,
            exclude=self._seen, max_draws=self.cfg.max_draws)
        if v is None:
            return None, rejected
        self.tried += 1
        self._seen.add(v.cfg.config_hash())
        engine = StrategyEngine(v.cfg, origin="experimental", strategy_id=self.strategy_id, variant_id=vid)
        track = Track(v.cfg.initial_equity, self.cfg.latency_window, started_ms=now_ms,
                      config_hash=engine.config_hash, variant_id=vid)
        slot = Slot(v, engine, track, periods=PeriodCurve(self.period_ms), number=self.tried)
        self.slots.append(slot)
        self._by_id[vid] = slot
        return slot, rejected

    def retire(self, variant_id: str) -> bool:
        """Stop a variant (it is removed and replaced at the next ``refill``)."""
        s = self._by_id.get(variant_id)
        if s is None or s.status != "active":
            return False
        s.status = "retired"
        return True

    def refill(self, now_ms: int) -> list[str]:
        """Remove promoted / retired slots (their final Sharpe joins the trials' variance) and draw
        new variants up to ``max_variants``, near the last winner when ``refill_near_winner`` and
        there was a promotion. Returns the new variant ids."""
        if not self.enabled:
            return []
        keep = []
        for s in self.slots:
            if s.status == "active":
                keep.append(s)
                continue
            del self._by_id[s.variant_id]
        self.slots = keep
        near = self.base if (self.cfg.refill_near_winner and self.promotions) else None
        new = []
        while len(self.slots) < self.cfg.max_variants:
            slot, _ = self._new_slot(near, now_ms)
            if slot is None and near is not None:
                slot, _ = self._new_slot(None, now_ms)  # the neighbourhood is exhausted: anywhere
            if slot is None:
                break
            new.append(slot.variant_id)
        self._prune_production()
        return new

    def _prune_production(self) -> None:
        """Production's per-bar returns are kept from the oldest live variant's start on."""
        starts = [s.track.started_ms for s in self.slots if s.status == "active" and s.track.started_ms is not None]
        if starts:
            self._prod_periods.since((min(starts) - 1) // self.period_ms)

    # ------------------------------------------------------------------ records
    def observe(self, records: Iterable) -> None:
        """Feed every record the variants AND production produced (others are ignored)."""
        if not self.cfg.enabled:
            return
        for rec in records:
            origin = getattr(rec, "origin", None)
            if origin == "production":
                self._observe_production(rec)
            elif origin == "experimental":
                s = self._by_id.get(rec.variant_id)
                if s is None or s.status != "active":
                    continue
                if isinstance(rec, EquityPoint):
                    s.track.on_equity(rec)
                    s.periods.mark(rec.ts, rec.equity)
                    self._tick(rec.ts)
                elif isinstance(rec, Fill):
                    self._trade_closed |= s.track.on_fill(rec)
                    self._tick(rec.ts)
                elif isinstance(rec, Decision):
                    s.track.on_decision(rec)
                    self._tick(rec.ts)

    def _tick(self, ts: int) -> None:
        if self.now_ms is None or ts > self.now_ms:
            self.now_ms = ts

    def _observe_production(self, rec) -> None:
        p = self._prod
        if isinstance(rec, EquityPoint):
            p.on_equity(rec)
            self._prod_periods.mark(rec.ts, rec.equity)
        elif isinstance(rec, Fill):
            self._trade_closed |= p.on_fill(rec)
        elif isinstance(rec, Decision):
            p.on_decision(rec)
            if self._last_bar_ts is None or rec.ts > self._last_bar_ts:
                self._last_bar_ts = rec.ts
                self._bars_since += 1
        else:
            return
        p.config_hash = rec.config_hash
        p.variant_id = rec.variant_id
        self._tick(rec.ts)

    def metrics_due(self) -> bool:
        """A closed trade since the last ``metrics`` call, or ``metrics_every_bars`` primary bars."""
        return self.cfg.enabled and (self._trade_closed or self._bars_since >= self.cfg.metrics_every_bars)

    # ------------------------------------------------------------------ metrics
    def _row(self, t: Track, now_ms: int, *, origin: str, variant_id: str, config: str,
             status: str, psr: Optional[float] = None, dsr: Optional[float] = None) -> VariantMetrics:
        ppy = self.cfg.periods_per_year
        r = t.curve.returns()
        p50, p99 = stats.latency_percentiles(t.latencies, (50.0, 99.0))
        return VariantMetrics(
            ts=now_ms, origin=origin, strategy_id=self.strategy_id, variant_id=variant_id,
            config_hash=t.config_hash, config=config, status=status,
            runtime_ms=max(0, now_ms - t.started_ms) if t.started_ms is not None else 0,
            roi=(t.equity / t.initial_equity - 1.0) if t.equity is not None else 0.0,
            trades=t.trades.trades, win_rate=t.trades.win_rate(), avg_pnl=t.trades.avg_pnl(),
            sharpe=r.sharpe(ppy), sortino=r.sortino(ppy), profit_factor=t.trades.profit_factor(),
            max_drawdown=t.max_dd, flip_rate=t.flip_rate(), latency_p50_ms=p50, latency_p99_ms=p99,
            psr=psr, dsr=dsr)

    def trial_weight(self, slot: Slot) -> float:
        """The share of the error budget this variant's one test may spend (module docstring)."""
        return stats.trial_weight(slot.number, self.cfg.max_variants)

    def evaluate(self, now_ms: int) -> list[Verdict]:
        """Metrics and failed gates of every variant slot (cool-off not included: see
        ``maybe_promote``). The paired test is computed on the bars so far; it counts once, when
        ``maybe_promote`` tests the variant at the end of its trial."""
        if not self.cfg.enabled:
            return []
        return [self._verdict(s, now_ms) for s in self.slots]

    def _verdict(self, s: Slot, now_ms: int) -> Verdict:
        """One slot's metrics, paired test and failed gates."""
        c = self.cfg
        alpha = 1.0 - c.psr_threshold
        test = stats.sharpe_difference_test(*paired(s.periods, self._prod_periods))
        w = self.trial_weight(s)
        p = 1.0 - test.p if test is not None else None
        d = max(0.0, 1.0 - test.p / w) if test is not None else None
        m = self._row(s.track, now_ms, origin="experimental", variant_id=s.variant_id,
                      config=_config_json(s.variant.cfg, self.base), status=s.status, psr=p, dsr=d)
        failed = []
        if s.status != "active":
            failed.append(f"status {s.status}")
        if m.trades < c.min_trades:
            failed.append(f"trades {m.trades} < {c.min_trades}")
        if m.runtime_ms < c.min_runtime_ms:
            failed.append(f"runtime {m.runtime_ms / HOUR_MS:.1f}h < {c.min_runtime_ms / HOUR_MS:.1f}h")
        if m.roi < c.min_roi:
            failed.append(f"roi {m.roi:.4f} < {c.min_roi}")
        if m.win_rate is None or m.win_rate < c.min_win_rate:
            failed.append(f"win_rate {_fmt(m.win_rate)} < {c.min_win_rate}")
        if m.sharpe is None or m.sharpe < c.min_sharpe:
            failed.append(f"sharpe {_fmt(m.sharpe)} < {c.min_sharpe}")
        if d is None or d < c.psr_threshold:
            failed.append(f"dsr {_fmt(d)} < {c.psr_threshold}")
        return Verdict(variant_id=s.variant_id, metrics=m, test=test, weight=w, level=alpha * w,
                       failed=tuple(failed))

    def production_metrics(self, now_ms: int) -> Optional[VariantMetrics]:
        if not self.cfg.enabled:
            return None
        p = self._prod
        return self._row(p, now_ms, origin="production", variant_id=p.variant_id or "base", config="{}",
                         status="active")

    def metrics(self, now_ms: int) -> list[VariantMetrics]:
        """One row per variant slot (active, or promoted / retired until the next refill) and one
        for production (origin ``production``, psr / dsr NULL). Resets the schedule."""
        if not self.cfg.enabled:
            return []
        self._trade_closed = False
        self._bars_since = 0
        return [v.metrics for v in self.evaluate(now_ms)] + [self.production_metrics(now_ms)]

    # ------------------------------------------------------------------ promotion
    def in_cool_off(self, now_ms: int) -> bool:
        return self.last_promotion_ms is not None and now_ms < self.last_promotion_ms + self.cfg.cool_off_ms

    def maybe_promote(self, now_ms: int) -> Optional[Promotion]:
        """Test the variants whose trial has ended (runtime >= ``min_runtime_ms``), once each: the
        best that passes every gate becomes a Promotion (at most one), the others retire and new
        variants are drawn in their place. None when off, in a cool-off, or nobody passed. On a
        promotion the optimizer's production config becomes the winner's, the cool-off starts and
        the slot is marked ``promoted``; the caller swaps production's config with
        ``apply_promotion`` and refills."""
        if not self.cfg.enabled or self.in_cool_off(now_ms):
            return None
        due = [self._verdict(s, now_ms) for s in self.slots if s.status == "active"
               and s.track.started_ms is not None and now_ms - s.track.started_ms >= self.cfg.min_runtime_ms]
        if not due:
            return None
        self.tested += len(due)
        ok = [v for v in due if v.qualifies]
        order = {s.variant_id: s.number for s in self.slots}
        best = max(ok, key=lambda v: (v.metrics.dsr, v.metrics.sharpe, -order[v.variant_id])) if ok else None
        for v in due:
            if v is not best:
                self._by_id[v.variant_id].status = "retired"  # its one test is spent
        if best is None:
            self.refill(now_ms)
            return None
        slot = self._by_id[best.variant_id]
        old, new = self.base, slot.variant.cfg
        m, t = best.metrics, best.test
        c = self.cfg
        reason = (f"dsr {m.dsr:.4f} >= {c.psr_threshold}: paired Sharpe difference {t.diff:+.4f} per bar over "
                  f"{t.n} bars (se {t.se:.4f}, Ledoit-Wolf HAC, t {t.df:.0f} df), p {t.p:.2g} <= alpha x w = "
                  f"{best.level:.2g} (variant {slot.number} of the search, weight {best.weight:.4g}); "
                  f"trades {m.trades} >= {c.min_trades}; runtime {m.runtime_ms / HOUR_MS:.1f}h >= "
                  f"{c.min_runtime_ms / HOUR_MS:.1f}h; roi {m.roi:.4f} >= {c.min_roi}; win_rate {m.win_rate:.3f} >= "
                  f"{c.min_win_rate}; sharpe {m.sharpe:.2f} >= {c.min_sharpe}")
        changes = {k: [getattr(old, k), getattr(new, k)] for k in old.to_dict() if getattr(old, k) != getattr(new, k)}
        slot.status = "promoted"
        m.status = "promoted"
        self.base = new
        self._seen.add(new.config_hash())
        self.last_promotion_ms = now_ms
        self.promotions += 1
        m.config = "{}"
        return Promotion(ts=now_ms, strategy_id=self.strategy_id, variant_id=best.variant_id,
                         old_config=old.to_dict(), new_config=new.to_dict(), old_hash=old.config_hash(),
                         new_hash=new.config_hash(), changes=changes, metrics=m, reason=reason,
                         n_trials=self.tried)


def _fmt(x: Optional[float]) -> str:
    return "None" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------------------------
# applying a promotion to production
# --------------------------------------------------------------------------------------------

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
