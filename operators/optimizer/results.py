"""The optimizer's output records: ``variant_metrics`` rows, verdicts and audited promotions."""

from __future__ import annotations

import functools
import json
from typing import Optional

import msgspec

from operators import sharpe_inference
from operators.records import Event
from operators.strategy_config import StrategyConfig


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
    test: Optional[sharpe_inference.SharpeDiff]  # the paired test against production on the same bars
    weight: float                       # its share of the error budget (sharpe_inference.trial_weight)
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

    def as_event(self) -> Event:
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
