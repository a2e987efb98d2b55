"""Settings: one validated object from the environment (``TAPEFLOW_*``), an optional TOML file
(``TAPEFLOW_CONFIG`` or ``--config``) and command-line overrides, in rising priority.

Secrets (a DSN with a password, API keys) are ``SecretStr``: they print as ``**********``
and only ``.get_secret_value()`` reveals them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from operators.bars import TIMEFRAMES, BarConfig
from operators.features import aligned_feature_names
from operators.strategy_config import StrategyConfig
from operators.optimizer import OptimizerConfig, default_space
from operators.portfolio import QualityConfig
from operators.admit_state import AdmitConfig
from operators.decode import DecodeLimits
from operators.records import DAY_MS, HOUR_MS


def _tuples(d: dict) -> dict:
    """JSON/TOML lists -> tuples (StrategyConfig is frozen and hashable)."""
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in d.items()}


class ConfigError(ValueError):
    pass


ENV_PREFIX = "TAPEFLOW_"
# TAPEFLOW_* variables that are not Settings fields but are read elsewhere (no "unknown variable"
# warning for them): the config file path, the report's LLM summary (cli/llm.py,
# LlmConfig.from_env) and exchange credentials TAPEFLOW_<EXCHANGE>_<SUFFIX> (dataflows/venue_exchange.py,
# credential_env_names; the suffixes are listed here so that checking the environment does not
# import ccxt).
OTHER_ENV = ("TAPEFLOW_CONFIG", "TAPEFLOW_LLM_BASE_URL", "TAPEFLOW_LLM_MODEL", "TAPEFLOW_LLM_API_KEY",
             "TAPEFLOW_LLM_TIMEOUT_S")
CREDENTIAL_SUFFIXES = ("API_KEY", "SECRET", "PASSWORD", "UID", "WALLET_ADDRESS", "PRIVATE_KEY")
# what a JSON value of each dict setting looks like (shown when the environment value is not JSON)
_DICT_EXAMPLES = {"strategy": '{"conf_min": 0.6}', "quality": '{"max_late_rate": 0.05}',
                  "optimizer": '{"enabled": true}', "profile_bins": '{"BTC/USDT:USDT": 2.0}'}
DSN_SCHEMES = ("chdb", "http", "https")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAPEFLOW_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("data"), description="where the embedded store, recovery and runs live")
    clickhouse_dsn: Optional[SecretStr] = Field(
        None, description="chdb:///abs/path (embedded) or http://user:pw@host:8123; default: <data_dir>/clickhouse")
    clickhouse_database: str = Field("tapeflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    # trade contract and windows
    lateness_ms: int = Field(2_000, ge=0, description="allowed lateness behind the newest trade (watermark)")
    portfolio_wait_ms: int = Field(
        10_000, gt=0, description="live: wall time the portfolio waits for an instrument that holds back the "
                                  "event-time order before declaring it silent (an instrument_silent event)")
    dedup_horizon_ms: int = Field(600_000, gt=0, description="how far back duplicate ids are remembered")
    dedup_max_ids: int = Field(500_000, gt=0, description="cap on ids remembered per instrument")
    max_future_ms: int = Field(DAY_MS, gt=0, description="trades further ahead of now are dead letters")
    jump_ms: int = Field(900_000, gt=0, description="a trade further ahead of its instrument's newest ts is held "
                                                    "until the stream confirms the jump (robust event time)")
    jump_confirm: int = Field(3, ge=1, description="trades in a row that confirm a jump")
    receipt_skew_ms: int = Field(300_000, ge=0, description="a trade this far ahead of its own receive time is an "
                                                            "outlier; one this close to it confirms a jump at once")
    max_message_bytes: int = Field(16_384, gt=0, description="larger messages are dead letters (too_large)")
    max_field_chars: int = Field(128, gt=0, description="longer exchange/symbol/id/trader are dead letters")
    timeframes: list[str] = Field(["1m", "5m", "15m", "1h", "4h", "1d"], description="bar timeframes")

    # bars
    pro_quantile: float = Field(0.95, gt=0.5, lt=1)
    amateur_quantile: float = Field(0.5, gt=0, lt=1)
    cohort_window_ms: int = Field(HOUR_MS, gt=0, description="rolling window of the cohort quantiles")
    cohort_max_orders: int = Field(200_000, gt=0)
    pro_addresses: list[str] = Field([], description="trader addresses always counted as pros")
    value_area: float = Field(0.70, gt=0, le=1)
    profile_bin_bps: float = Field(2.0, gt=0, description="default volume-profile bin, bps of the first price")
    profile_bins: dict[str, Annotated[float, Field(gt=0)]] = Field({}, description="explicit profile bin per symbol")

    # features, labels, models
    primary_tf: str = Field("5m", description="timeframe that is scored and traded")
    overlay_tfs: list[str] = Field(["15m", "1h"], description="closed overlay timeframes on each primary row")
    label_horizon: int = Field(3, ge=1, description="label: forward return over this many primary bars")
    label_band_k: float = Field(0.5, ge=0, description="label: flat band = k * ATR / close")
    online_models: bool = Field(True, description="River models (learn on matured labels)")
    online_warmup_labels: int = Field(50, ge=0, description="labels learned before River predicts")
    arf_models: int = Field(10, ge=1, description="trees in River's adaptive random forest")
    arf_max_depth: int = Field(6, ge=1, description="depth limit of each ARF tree: bounds the forest's memory "
                                                      "per instrument (models/online.py)")
    online_features: list[str] = Field(
        ["ret_1", "ret_3", "ret_12", "rv", "atr", "atr_pct", "rsi", "ema_gap", "macd_hist", "bb_width", "adx", "vol_z",
         "delta_z", "cvd_slope", "vwap_dev", "intensity", "s_top", "s_bot", "s_mood", "s_top_ema", "s_bot_ema",
         "s_mood_ema"],
        description="features the River models read (the primary timeframe's base features; [] = all; models/online.py)")
    artifacts_dir: Optional[Path] = Field(None, description="ONNX ensembles (default <data_dir>/artifacts)")
    onnx_check_s: float = Field(5.0, gt=0, description="how often to look for a newer ensemble")
    model: Optional[str] = Field(None, description="serve this ONNX ensemble: a version in artifacts_dir or a "
                                                   "version folder's path (default: the newest trained on this "
                                                   "store; see models/onnx_ensemble.py)")
    model_gate_margin: float = Field(0.0, ge=0, description="deployment gate: nats of log loss a trained ensemble must "
                                                            "beat the class prior and the active model by")
    model_gate_z: float = Field(1.645, ge=0, description="deployment gate: one-sided z of the paired test against the "
                                                         "class prior (models/deployment.py)")
    seed: int = Field(7, description="seed of every random choice (models, bandit)")

    # decisions (every StrategyConfig field; see operators/strategy_config.py for the list and defaults)
    strategy: dict = Field({}, description="overrides of the production strategy's settings, e.g. {conf_min: 0.6}")
    quality: dict = Field({}, description="data-quality gate: max_late_rate, max_dead_rate, dead_window")
    optimizer: dict = Field({}, description="live optimizer (OptimizerConfig fields), e.g. {enabled: true}")

    # running
    batch_size: int = Field(20_000, gt=0, description="trades per source batch (synthetic: in the busiest partition)")
    epoch_interval_s: float = Field(10.0, ge=0, description="bytewax epoch = snapshot interval")
    store_worker_share: float = Field(0.5, gt=0, le=1, description=(
        "with several workers: the share of instruments worker 0 takes, as a fraction of what each other "
        "worker takes (it also turns every record into rows and writes the store; 1: even)"))
    recovery_dir: Optional[Path] = Field(None, description="bytewax recovery directory (off if unset)")
    sink_flush_rows: int = Field(5_000, gt=0)
    sink_flush_ms: int = Field(1_000, ge=0)
    health_every_s: float = Field(10.0, ge=0, description="pipeline_health row interval (0: off)")
    store_retry_s: float = Field(60.0, ge=0, description="how long transient ClickHouse errors are retried before "
                                                         "the run fails (sinks/clickhouse.py; 0: never)")

    # live feeds (ccxt): perpetual-futures data next to the trades (dataflows/venue_exchange.py, PerpPolling)
    ccxt_funding_every_s: float = Field(60.0, ge=0, description="poll each perpetual's funding rate this often "
                                                                "(fetch_funding_rate; 0: off)")
    ccxt_open_interest_every_s: float = Field(300.0, ge=0, description="poll each contract's open interest this "
                                                                       "often (fetch_open_interest; 0: off)")
    ccxt_liquidations: bool = Field(True, description="watch public liquidations where the venue streams them "
                                                      "(watch_liquidations)")

    # kafka
    kafka_brokers: str = Field("localhost:9092", description="bootstrap servers, comma-separated")
    kafka_topic: str = Field("trades", description="trade topic (key exchange:symbol)")
    kafka_partitions: int = Field(6, gt=0, description="partitions when tapeflow creates the topic")
    kafka_batch_size: int = Field(10_000, gt=0, description="messages per Kafka poll")
    kafka_max_skew_ms: int = Field(3_600_000, gt=0, description="event time a partition may run ahead of the "
                                                                "slowest other partition its process reads")
    kafka_max_hold_s: float = Field(10.0, gt=0, description="wall time a partition ahead holds its messages "
                                                            "for the others, at most")
    kafka_instruments: list[str] = Field(
        [], description="exchange:symbol of every instrument on the topic: the portfolio waits for each, so "
                        "trading rows do not depend on arrival order across partitions (empty: they join "
                        "as they come)")

    @field_validator("strategy", "quality", "optimizer")
    @classmethod
    def _dataclass_fields_valid(cls, v: dict, info) -> dict:
        """Each of these settings is a pydantic dataclass's fields, validated where they are declared
        (types, bounds, cross-field rules); its errors come out naming the field. Here, an unknown name
        gets a "did you mean"."""
        target = {"strategy": StrategyConfig, "quality": QualityConfig, "optimizer": OptimizerConfig}[info.field_name]
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(v) - known)
        if unknown:
            close = {u: difflib.get_close_matches(u, known, 1) for u in unknown}
            hints = [f"{u} (did you mean {c[0]}?)" if c else u for u, c in close.items()]
            listing = "" if all(close.values()) else f"; known: {sorted(known)}"
            raise ValueError(f"unknown {info.field_name} setting(s) {', '.join(hints)}{listing}")
        target(**_tuples(v))
        return v

    @field_validator("clickhouse_dsn")
    @classmethod
    def _dsn_scheme(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        """Only chdb:///abs/path and http(s)://... reach a store; anything else would be sent to a
        server at a guessed address (clickhouse-connect treats an unknown scheme as http)."""
        if v is None:
            return v
        parts = urlsplit(v.get_secret_value())
        if parts.scheme not in DSN_SCHEMES:
            raise ValueError(f"unknown DSN scheme {parts.scheme + '://' if parts.scheme else '(none)'}; use "
                             "chdb:///absolute/path (embedded) or http(s)://user:password@host:8123")
        if parts.scheme == "chdb" and (parts.netloc or not parts.path.startswith("/")):
            raise ValueError("an embedded store DSN needs an absolute path: chdb:///absolute/path")
        return v

    @model_validator(mode="after")
    def _search_space_valid(self) -> "Settings":
        if self.optimizer.get("enabled"):
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
    def _online_features_exist(self) -> "Settings":
        known = set(aligned_feature_names(self.overlay_tfs))
        unknown = [f for f in self.online_features if f not in known]
        if unknown:
            raise ValueError(f"online_features {unknown} are not features the pipeline computes (primary names like "
                             "'s_top', overlays prefixed by their timeframe like '1h_rsi')")
        return self

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
        return AdmitConfig(self.lateness_ms, self.dedup_horizon_ms, self.dedup_max_ids, jump_ms=self.jump_ms,
                           jump_confirm=self.jump_confirm, receipt_skew_ms=self.receipt_skew_ms)

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_message_bytes, self.max_field_chars)

    def bar_config(self) -> BarConfig:
        return BarConfig(
            pro_quantile=self.pro_quantile, amateur_quantile=self.amateur_quantile,
            cohort_window_ms=self.cohort_window_ms, cohort_max_orders=self.cohort_max_orders,
            pro_addresses=frozenset(self.pro_addresses), value_area=self.value_area,
            profile_bin_bps=self.profile_bin_bps, profile_bins=tuple(sorted(self.profile_bins.items())),
        )


# command-line options whose name differs from their setting's
_OPTIONS = {"clickhouse_dsn": "--dsn", "clickhouse_database": "--database", "kafka_brokers": "--brokers",
            "kafka_topic": "--topic", "kafka_partitions": "--partitions", "kafka_instruments": "--instruments"}


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _where(field: str, file_values: Mapping[str, Any], overrides: Mapping[str, Any],
           config_path: Optional[Path]) -> str:
    """Where a setting's value came from, as the user would name it."""
    if field in overrides:
        return f"{field} ({_OPTIONS.get(field, '--' + field.replace('_', '-'))})"
    if field in file_values:
        return f"{field} (in {config_path})"
    if _env_name(field) in os.environ:
        return f"{field} ({_env_name(field)})"
    return field


def _not_json(err: SettingsError) -> ConfigError:
    """pydantic-settings reads list and dict settings from the environment as JSON; say which
    variable is not JSON and what its right form looks like."""
    m = re.search(r'field "(\w+)"', str(err))
    field = m.group(1) if m else None
    if field is None or field not in Settings.model_fields:
        return ConfigError(f"invalid tapeflow settings: {err}")
    name, value = _env_name(field), os.environ.get(_env_name(field), "")
    annotation = Settings.model_fields[field].annotation
    if annotation is dict or typing.get_origin(annotation) is dict:
        example = _DICT_EXAMPLES.get(field, '{"name": "value"}')
        kind = "a JSON object"
    else:
        items = [x.strip().strip("\"'") for x in value.strip("[]").split(",") if x.strip()]
        example = json.dumps(items or ["..."])
        kind = "a JSON list"
    return ConfigError(f"invalid tapeflow settings: {name} must be {kind}, got {value!r}; "
                       f"e.g. {name}='{example}'")


def load_settings(config_file: Optional[Path] = None, **overrides: Any) -> Settings:
    """Environment < TOML file < overrides (None values are ignored). Raises ``ConfigError`` with
    one line per problem, naming the setting and where its value came from (option, config file,
    or environment variable)."""
    file_values: dict[str, Any] = {}
    path = config_file or (Path(os.environ["TAPEFLOW_CONFIG"]) if os.environ.get("TAPEFLOW_CONFIG") else None)
    if path is not None:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**{**file_values, **given})
    except SettingsError as err:
        raise _not_json(err) from None
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            msg = e["msg"].removeprefix("Value error, ")
            if not loc:  # a model-level check: the message names its settings
                lines.append(msg)
            elif loc[0] in Settings.model_fields:
                got = e.get("input")
                shown = "" if loc[0] == "clickhouse_dsn" or isinstance(got, (dict, list)) else f" (got {got!r})"
                lines.append(f"{_where(loc[0], file_values, given, path)}{''.join('.' + p for p in loc[1:])}: "
                             f"{msg}{shown}")
            else:
                lines.append(f"{'.'.join(loc)}: {msg}")
        if len(lines) == 1:
            raise ConfigError(f"invalid tapeflow settings: {lines[0]}") from None
        raise ConfigError("invalid tapeflow settings:\n" + "\n".join(f"  {x}" for x in lines)) from None


def unknown_env_vars(environ: Optional[Mapping[str, str]] = None) -> list[tuple[str, Optional[str]]]:
    """``TAPEFLOW_*`` variables that nothing reads (a misspelt setting is otherwise ignored without a
    word), each with the closest known name or None. Known: every setting's variable, the other
    variables in ``OTHER_ENV``, and exchange credentials ``TAPEFLOW_<EXCHANGE>_<CREDENTIAL_SUFFIX>``."""
    env = os.environ if environ is None else environ
    known = [_env_name(f) for f in Settings.model_fields] + list(OTHER_ENV)
    out = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        rest = name[len(ENV_PREFIX):]
        exchange, _, suffix = rest.partition("_")
        if exchange and suffix in CREDENTIAL_SUFFIXES:
            continue
        candidates = known + ([f"{ENV_PREFIX}{exchange}_{s}" for s in CREDENTIAL_SUFFIXES] if suffix else [])
        # compared without the shared prefix, which would make any two names look alike
        close = difflib.get_close_matches(rest, [c[len(ENV_PREFIX):] for c in candidates], 1, cutoff=0.7)
        out.append((name, ENV_PREFIX + close[0] if close else None))
    return out
