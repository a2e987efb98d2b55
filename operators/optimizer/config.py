"""The optimizer's settings (``OptimizerConfig``): switches, sampling and promotion gates, validated by pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from operators.records import DAY_MS, MINUTES_PER_YEAR


@dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class OptimizerConfig:
    """Optimizer switches and promotion gates. Defaults and why:

    - ``enabled`` False: off means off (no engines, no metrics, no cost) until asked for;
    - ``max_variants`` 16: 17 engines on a per-bar path stay far below the latency budget;
    - ``sampling`` "random", ``seed`` 0 (the pipeline passes its own seed);
    - ``metrics_every_bars`` 12: one row per variant per hour of 5m bars, plus one on every
      closed trade;
    - gates: ``min_trades`` 30; ``min_runtime_ms`` 24 h of event time (a full daily cycle of
      crypto sessions); ``min_roi`` 0 (must not lose money); ``min_win_rate`` 0 (off: a trend
      follower may win 35% and still be better; the dsr gate carries the statistics);
      ``min_sharpe`` 1.0 annualised (a swap must be worth its churn); ``psr_threshold`` 0.95: the
      family-wise error budget alpha = 0.05 of the paired, deflated test against production
      (``operators.optimizer.core``: every variant spends its share once, at the end of its trial);
    - ``cool_off_ms`` 24 h: production keeps a new config at least a day before the next swap;
    - ``refill_near_winner`` True, ``near_steps`` 1: explore around what just won;
    - ``periods_per_year`` 525,600 (1m equity marks, 24/7 market);
    - ``latency_window`` 1024 decisions per strategy; ``max_draws`` 500 draws per variant before
      the sampler gives up (constraints or a small, exhausted grid).

    Values are checked strictly (no bool for an integer, no string for a number); a bad one raises
    pydantic's ``ValidationError`` (a ``ValueError``) naming every field in error.
    """

    enabled: bool = False
    max_variants: int = Field(16, ge=1)
    sampling: Literal["random", "grid"] = "random"
    seed: int = 0
    metrics_every_bars: int = Field(12, ge=1)
    min_trades: int = Field(30, ge=0)
    min_runtime_ms: int = Field(DAY_MS, ge=0)
    min_roi: float = Field(0.0, allow_inf_nan=False)
    min_win_rate: float = Field(0.0, ge=0, le=1)
    min_sharpe: float = Field(1.0, allow_inf_nan=False)
    psr_threshold: float = Field(0.95, ge=0, le=1)
    cool_off_ms: int = Field(DAY_MS, ge=0)
    refill_near_winner: bool = True
    near_steps: int = Field(1, ge=1)
    periods_per_year: float = Field(MINUTES_PER_YEAR, gt=0)
    latency_window: int = Field(1024, ge=1)
    max_draws: int = Field(500, ge=1)
