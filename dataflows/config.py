"""Settings: one validated object from the environment (``TAPEFLOW_*``), an optional TOML file
(``TAPEFLOW_CONFIG`` or ``--config``) and command-line overrides, in rising priority.

Secrets (a DSN with a password, API keys) are ``SecretStr``: they print as ``**********``
and only ``.get_secret_value()`` reveals them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from operators.bars import TIMEFRAMES, BarConfig
from operators.decision import StrategyConfig
from operators.optimizer import OptimizerConfig
from operators.portfolio import QualityConfig
from operators.trades import AdmitConfig


def _tuples(d: dict) -> dict:
    """JSON/TOML lists -> tuples (StrategyConfig is frozen and hashable)."""
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in d.items()}


class ConfigError(ValueError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAPEFLOW_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("data"), description="where the embedded store, recovery and runs live")
    clickhouse_dsn: Optional[SecretStr] = Field(
        None, description="chdb:///abs/path (embedded) or http://user:pw@host:8123; default: <data_dir>/clickhouse")
    clickhouse_database: str = Field("tapeflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    # trade contract and windows
    lateness_ms: int = Field(2_000, ge=0, description="allowed lateness behind the newest trade (watermark)")
    dedup_horizon_ms: int = Field(600_000, gt=0, description="how far back duplicate ids are remembered")
    dedup_max_ids: int = Field(500_000, gt=0, description="cap on ids remembered per instrument")
    max_future_ms: int = Field(86_400_000, gt=0, description="trades further ahead of now are dead letters")
    timeframes: list[str] = Field(["1m", "5m", "15m", "1h", "4h", "1d"], description="bar timeframes")

    # bars
    pro_quantile: float = Field(0.95, gt=0.5, lt=1)
    amateur_quantile: float = Field(0.5, gt=0, lt=1)
    cohort_window_ms: int = Field(3_600_000, gt=0, description="rolling window of the cohort quantiles")
    cohort_max_orders: int = Field(200_000, gt=0)
    pro_addresses: list[str] = Field([], description="trader addresses always counted as pros")
    value_area: float = Field(0.70, gt=0, le=1)
    profile_bin_bps: float = Field(2.0, gt=0, description="default volume-profile bin, bps of the first price")
    profile_bins: dict[str, float] = Field({}, description="explicit profile bin per symbol")

    # features, labels, models
    primary_tf: str = Field("5m", description="timeframe that is scored and traded")
    overlay_tfs: list[str] = Field(["15m", "1h"], description="closed overlay timeframes on each primary row")
    feature_history: int = Field(600, ge=64, description="bars of history per timeframe for features")
    label_horizon: int = Field(3, ge=1, description="label: forward return over this many primary bars")
    label_band_k: float = Field(0.5, ge=0, description="label: flat band = k * ATR / close")
    online_models: bool = Field(True, description="River models (learn on matured labels)")
    online_warmup_labels: int = Field(50, ge=0, description="labels learned before River predicts")
    arf_models: int = Field(10, ge=1, description="trees in River's adaptive random forest")
    artifacts_dir: Optional[Path] = Field(None, description="ONNX ensembles (default <data_dir>/artifacts)")
    onnx_check_s: float = Field(5.0, gt=0, description="how often to look for a newer ensemble")
    seed: int = Field(7, description="seed of every random choice (models, bandit)")

    # decisions (every StrategyConfig field; see operators/decision.py for the list and defaults)
    strategy: dict = Field({}, description="overrides of the production strategy's settings, e.g. {conf_min: 0.6}")
    quality: dict = Field({}, description="data-quality gate: max_late_rate, max_dead_rate, dead_window")
    optimizer: dict = Field({}, description="live optimizer (OptimizerConfig fields), e.g. {enabled: true}")

    # running
    batch_size: int = Field(20_000, gt=0, description="trades per source batch")
    epoch_interval_s: float = Field(10.0, ge=0, description="bytewax epoch = snapshot interval")
    recovery_dir: Optional[Path] = Field(None, description="bytewax recovery directory (off if unset)")
    sink_flush_rows: int = Field(5_000, gt=0)
    sink_flush_ms: int = Field(1_000, ge=0)
    health_every_s: float = Field(10.0, ge=0, description="pipeline_health row interval (0: off)")

    # kafka
    kafka_brokers: str = Field("localhost:9092", description="bootstrap servers, comma-separated")
    kafka_topic: str = Field("trades", description="trade topic (key exchange:symbol)")
    kafka_partitions: int = Field(6, gt=0, description="partitions when tapeflow creates the topic")
    kafka_batch_size: int = Field(10_000, gt=0, description="messages per Kafka poll")

    @field_validator("strategy", "quality", "optimizer")
    @classmethod
    def _dataclass_fields_valid(cls, v: dict, info) -> dict:
        """Each of these settings is a dataclass's fields: unknown names and bad values fail here."""
        target = {"strategy": StrategyConfig, "quality": QualityConfig, "optimizer": OptimizerConfig}[info.field_name]
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown {info.field_name} setting(s) {unknown}; known: {sorted(known)}")
        target(**_tuples(v))  # raises ValueError naming the field
        return v

    @model_validator(mode="after")
    def _search_space_valid(self) -> "Settings":
        if self.optimizer.get("enabled"):
            from operators.optimizer import default_space

            default_space(self.overlay_tfs).validate(self.strategy_config(), self.primary_tf, self.overlay_tfs)
        return self

    @field_validator("timeframes")
    @classmethod
    def _known_timeframes(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TIMEFRAMES]
        if bad:
            raise ValueError(f"unknown timeframe(s) {bad}; known: {list(TIMEFRAMES)}")
        if "1m" not in v:
            raise ValueError("timeframes must include 1m (every other timeframe rolls up from it)")
        return sorted(set(v), key=lambda t: TIMEFRAMES[t])

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.amateur_quantile >= self.pro_quantile:
            raise ValueError("amateur_quantile must be below pro_quantile")
        missing = [t for t in [self.primary_tf, *self.overlay_tfs] if t not in self.timeframes]
        if missing:
            raise ValueError(f"primary_tf/overlay_tfs {missing} are not in timeframes {self.timeframes}")
        bad = [t for t in self.overlay_tfs if TIMEFRAMES[t] <= TIMEFRAMES[self.primary_tf]]
        if bad:
            raise ValueError(f"overlay timeframes {bad} must be longer than primary_tf {self.primary_tf}")
        return self

    # derived -------------------------------------------------------------------------------
    def dsn(self) -> str:
        if self.clickhouse_dsn is not None:
            return self.clickhouse_dsn.get_secret_value()
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    def strategy_config(self) -> StrategyConfig:
        base = {"primary_tf": self.primary_tf, "label_horizon": self.label_horizon, "seed": self.seed}
        return StrategyConfig(**{**base, **_tuples(self.strategy)})

    def quality_config(self) -> QualityConfig:
        return QualityConfig(**self.quality)

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(**{"seed": self.seed, **_tuples(self.optimizer)})

    def artifacts(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()

    def admit_config(self) -> AdmitConfig:
        return AdmitConfig(self.lateness_ms, self.dedup_horizon_ms, self.dedup_max_ids)

    def bar_config(self) -> BarConfig:
        return BarConfig(
            pro_quantile=self.pro_quantile, amateur_quantile=self.amateur_quantile,
            cohort_window_ms=self.cohort_window_ms, cohort_max_orders=self.cohort_max_orders,
            pro_addresses=frozenset(self.pro_addresses), value_area=self.value_area,
            profile_bin_bps=self.profile_bin_bps, profile_bins=tuple(sorted(self.profile_bins.items())),
        )


def load_settings(config_file: Optional[Path] = None, **overrides: Any) -> Settings:
    """Environment < TOML file < overrides (None values are ignored). Raises ``ConfigError``."""
    values: dict[str, Any] = {}
    path = config_file or (Path(os.environ["TAPEFLOW_CONFIG"]) if os.environ.get("TAPEFLOW_CONFIG") else None)
    if path is not None:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid tapeflow settings:\n" + "\n".join(lines)) from None
