"""Unit tests for dataflows/config.py: defaults, environment, TOML file, overrides, validation
messages, DSN default and secret redaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataflows.config import ConfigError, Settings, load_settings, unknown_env_vars

SECRET = "pA55-w0rd-do-not-print"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No TAPEFLOW_* variable from the outer environment may leak into these tests."""
    for k in list(os.environ):
        if k.startswith("TAPEFLOW_"):
            monkeypatch.delenv(k)


def test_defaults():
    s = load_settings()
    assert s.lateness_ms == 2_000
    assert s.dedup_horizon_ms == 600_000
    assert s.max_future_ms == 86_400_000
    assert s.timeframes == ["1m", "5m", "15m", "1h", "4h", "1d"]
    assert (s.pro_quantile, s.amateur_quantile, s.value_area) == (0.95, 0.5, 0.70)
    assert s.data_dir == Path("data")
    assert s.clickhouse_dsn is None and s.recovery_dir is None
    assert s.pro_addresses == [] and s.profile_bins == {}


def test_environment_overrides_the_default(monkeypatch):
    monkeypatch.setenv("TAPEFLOW_LATENESS_MS", "5000")
    monkeypatch.setenv("TAPEFLOW_TIMEFRAMES", '["1m", "15m"]')
    monkeypatch.setenv("TAPEFLOW_PRIMARY_TF", "1m")
    monkeypatch.setenv("TAPEFLOW_OVERLAY_TFS", '["15m"]')
    s = load_settings()
    assert s.lateness_ms == 5_000
    assert s.timeframes == ["1m", "15m"]
    assert s.admit_config().lateness_ms == 5_000


def test_toml_file_overrides_the_environment_and_overrides_win(monkeypatch, tmp_path):
    monkeypatch.setenv("TAPEFLOW_LATENESS_MS", "5000")
    monkeypatch.setenv("TAPEFLOW_BATCH_SIZE", "123")
    cfg = tmp_path / "tapeflow.toml"
    cfg.write_text('lateness_ms = 3000\ntimeframes = ["5m", "1m"]\noverlay_tfs = []\npro_addresses = ["0xabc"]\n'
                   '[profile_bins]\n"BTC/USDT:USDT" = 5.0\n')
    s = load_settings(cfg)
    assert s.lateness_ms == 3_000  # file beats environment
    assert s.batch_size == 123  # environment still fills what the file leaves out
    assert s.timeframes == ["1m", "5m"]  # sorted by length
    assert s.pro_addresses == ["0xabc"]
    assert s.profile_bins == {"BTC/USDT:USDT": 5.0}
    assert load_settings(cfg, lateness_ms=4_000).lateness_ms == 4_000  # overrides beat the file
    assert load_settings(cfg, lateness_ms=None).lateness_ms == 3_000  # None overrides are ignored


def test_config_file_from_the_environment(monkeypatch, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("dedup_horizon_ms = 1234\n")
    monkeypatch.setenv("TAPEFLOW_CONFIG", str(cfg))
    assert load_settings().dedup_horizon_ms == 1_234


def test_settings_feed_the_operator_configs():
    s = load_settings(lateness_ms=1_500, dedup_horizon_ms=9_000, dedup_max_ids=77, pro_quantile=0.9,
                      amateur_quantile=0.4, pro_addresses=["0xb", "0xa"], value_area=0.68,
                      profile_bins={"ETH/USDT:USDT": 0.5})
    a = s.admit_config()
    assert (a.lateness_ms, a.dedup_horizon_ms, a.dedup_max_ids) == (1_500, 9_000, 77)
    b = s.bar_config()
    assert (b.pro_quantile, b.amateur_quantile, b.value_area) == (0.9, 0.4, 0.68)
    assert b.pro_addresses == frozenset({"0xa", "0xb"})
    assert dict(b.profile_bins) == {"ETH/USDT:USDT": 0.5}


@pytest.mark.parametrize("field,value", [
    ("lateness_ms", -1),
    ("dedup_horizon_ms", 0),
    ("batch_size", 0),
    ("pro_quantile", 1.5),
    ("value_area", 0.0),
    ("clickhouse_database", "drop table; --"),
])
def test_invalid_values_give_a_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        load_settings(**{field: value})
    msg = str(err.value)
    assert field in msg
    assert "invalid tapeflow settings" in msg


def test_invalid_environment_value_names_the_field(monkeypatch):
    monkeypatch.setenv("TAPEFLOW_LATENESS_MS", "two seconds")
    with pytest.raises(ConfigError, match="lateness_ms"):
        load_settings()


def test_unknown_timeframe_is_rejected_with_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_settings(timeframes=["1m", "7m"])
    msg = str(err.value)
    assert "timeframes" in msg and "7m" in msg and "5m" in msg


def test_timeframes_must_include_1m():
    with pytest.raises(ConfigError, match="1m"):
        load_settings(timeframes=["5m", "1h"])


def test_quantiles_must_be_ordered():
    with pytest.raises(ConfigError, match="amateur_quantile"):
        load_settings(pro_quantile=0.6, amateur_quantile=0.7)


def test_unknown_key_in_the_file_is_rejected(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("latenes_ms = 10\n")  # typo
    with pytest.raises(ConfigError, match="latenes_ms"):
        load_settings(cfg)


def test_feature_history_is_not_a_setting_any_more(tmp_path):
    # it bounded the Polars window of the features until they became incremental, and then did
    # nothing while still accepted: now the file is refused and the variable warned about
    cfg = tmp_path / "c.toml"
    cfg.write_text("feature_history = 2000\n")
    with pytest.raises(ConfigError, match="feature_history"):
        load_settings(cfg)
    assert [name for name, _ in unknown_env_vars({"TAPEFLOW_FEATURE_HISTORY": "2000"})] == ["TAPEFLOW_FEATURE_HISTORY"]


def test_unreadable_file_gives_a_config_error_naming_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lateness_ms = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="missing.toml"):
        load_settings(tmp_path / "missing.toml")


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        load_settings(lateness_ms=-5, batch_size=-1)
    assert "lateness_ms" in str(err.value) and "batch_size" in str(err.value)


def test_dsn_defaults_to_an_embedded_store_under_the_absolute_data_dir(tmp_path, monkeypatch):
    s = load_settings(data_dir=str(tmp_path / "d"))
    assert s.dsn() == f"chdb://{(tmp_path / 'd').resolve()}/clickhouse"
    monkeypatch.chdir(tmp_path)
    rel = load_settings(data_dir="rel")
    assert rel.dsn() == f"chdb://{tmp_path.resolve()}/rel/clickhouse"
    assert rel.dsn().startswith("chdb:///")  # absolute, whatever the working directory later is


def test_explicit_dsn_is_returned_as_given():
    dsn = f"http://default:{SECRET}@clickhouse:8123"
    assert load_settings(clickhouse_dsn=dsn).dsn() == dsn


def test_dsn_password_never_appears_in_repr_or_dumps(monkeypatch):
    dsn = f"http://default:{SECRET}@clickhouse:8123"
    for s in (load_settings(clickhouse_dsn=dsn), _from_env(monkeypatch, dsn)):
        assert SECRET not in repr(s)
        assert SECRET not in str(s)
        assert SECRET not in s.model_dump_json()
        assert SECRET not in str(s.model_dump())
        assert s.dsn() == dsn  # but it is there for the client


def test_dsn_password_is_not_in_a_validation_error(monkeypatch):
    monkeypatch.setenv("TAPEFLOW_CLICKHOUSE_DSN", f"http://u:{SECRET}@h:8123")
    with pytest.raises(ConfigError) as err:
        load_settings(lateness_ms=-1)
    assert SECRET not in str(err.value)


def _from_env(monkeypatch, dsn: str) -> Settings:
    monkeypatch.setenv("TAPEFLOW_CLICKHOUSE_DSN", dsn)
    return load_settings()


def test_primary_and_overlay_timeframes_must_be_bars_we_make_and_overlays_longer():
    with pytest.raises(ConfigError) as err:
        load_settings(timeframes=["1m", "5m"])  # overlays 15m and 1h are not made
    assert "overlay_tfs" in str(err.value) and "15m" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_settings(primary_tf="15m", overlay_tfs=["5m"])
    assert "must be longer than primary_tf" in str(err.value)
