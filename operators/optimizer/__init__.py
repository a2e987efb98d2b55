"""Live optimizer: paper variants of the production strategy on the same stream, honest scoring,
gated promotion. Pure logic: no bytewax, no I/O, no clock (event time comes in with the records
and as ``now_ms``).

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

Everything is plain Python + numpy Generators (picklable, deep-copyable): bytewax snapshots the
optimizer every epoch.

Modules
-------
- ``space``: what a variant can change (``Param``, ``Choice``, ``Constraint``, ``SearchSpace``)
  and its validation at start;
- ``sampling``: drawing variants (random, Halton grid walk, near a winner);
- ``config``: ``OptimizerConfig``, the switches and promotion gates;
- ``tracking``: the metric inputs of one strategy, updated record by record;
- ``results``: the records it emits (``VariantMetrics`` rows, ``Verdict``, ``Promotion``);
- ``core``: the ``Optimizer`` (slots, the paired test against production, gated promotion);
- ``promotion``: ``apply_promotion``, production's swap to the winner's config.
"""

from operators.optimizer.config import OptimizerConfig
from operators.optimizer.core import Optimizer
from operators.optimizer.promotion import apply_promotion, config_from_dict
from operators.optimizer.results import VARIANT_METRICS_COLUMNS, Promotion, VariantMetrics, Verdict
from operators.optimizer.sampling import Variant, draw_overrides, draw_variant
from operators.optimizer.space import (DEFAULT_CONSTRAINTS, FIXED_FIELDS, Choice, Constraint, Param, SearchSpace,
                                       SearchSpaceError, at_least_one_model_arm, default_space,
                                       trailing_locks_profit)

__all__ = [
    "Param", "Choice", "Constraint", "SearchSpace", "SearchSpaceError", "FIXED_FIELDS", "default_space",
    "at_least_one_model_arm", "trailing_locks_profit", "DEFAULT_CONSTRAINTS", "Variant", "draw_overrides",
    "draw_variant", "OptimizerConfig", "Optimizer", "VariantMetrics", "VARIANT_METRICS_COLUMNS", "Verdict",
    "Promotion", "apply_promotion", "config_from_dict",
]
