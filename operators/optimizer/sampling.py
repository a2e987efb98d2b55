"""Drawing variants from a validated search space: random, Halton grid walk, or near a config.

``random``: each dimension uniform over its grid values / options, from a numpy Generator seeded
by ``OptimizerConfig.seed`` and kept in the state. ``grid``: the k-th variant is the k-th point
of a scrambled Halton sequence (seeded) mapped onto the grid, a deterministic walk whose every
prefix is spread evenly over each dimension and the joint space -- a subset of the full grid
without enumerating it. Draws that equal production, a variant tried before, or that violate a
constraint are skipped. ``near``: perturb a config (the promoted winner) by at most
``near_steps`` grid steps per Param (clipped to [low, high]) and switch each Choice with
probability 1/4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from operators.optimizer.space import SearchSpaceError
from operators.strategy_config import StrategyConfig


@dataclass(frozen=True)
class Variant:
    variant_id: str
    cfg: StrategyConfig
    overrides: dict             # field -> value that differs from the production config it came from


def _halton_point(n_dims: int, index: int, seed: int) -> np.ndarray:
    from scipy.stats import qmc  # scipy is heavy: imported on the first grid draw only

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

