"""The live optimizer inside the pipeline: variants never touch production, and a promotion
switches production's config at a bar boundary, audited with both configs, then a cool-off."""

import json

import polars as pl

from tests.helpers import WALL, frame_batches, run_pipeline, settings, stored, synthetic_tape

TRADING = {"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": False,
           "consensus_enabled": False}


def _tape():
    return synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=10 * 60, rate=0.5)


def _production(store, table, order, exclude=()):
    return stored(store, table, order, exclude).filter(pl.col("origin") == "production")


def test_production_rows_are_identical_with_the_optimizer_on_and_off(store, other_store, tmp_path):
    batches = frame_batches(_tape(), 2500)
    off = settings(tmp_path / "off", online_warmup_labels=10, strategy=TRADING)
    on = settings(tmp_path / "on", online_warmup_labels=10, strategy=TRADING,
                  optimizer={"enabled": True, "max_variants": 6, "metrics_every_bars": 6})
    run_pipeline(batches, store, off)
    run_pipeline(batches, other_store, on)
    for table, order, excl in (("decisions", "exchange, symbol, ts", WALL["decisions"]),
                               ("fills", "position_id, ts, reason", ()), ("equity", "ts", ())):
        a, b = _production(store, table, order, excl), _production(other_store, table, order, excl)
        assert a.height > 0, table
        assert a.equals(b), f"production {table} changed when the optimizer ran"
    variants = stored(other_store, "decisions", "variant_id, ts", WALL["decisions"])
    exp = variants.filter(pl.col("origin") == "experimental")
    assert exp["variant_id"].n_unique() == 6 and exp["config_hash"].n_unique() == 6
    assert stored(store, "variant_metrics", "ts").height == 0  # off means off
    metrics = stored(other_store, "variant_metrics", "ts")
    assert set(metrics["origin"]) == {"production", "experimental"} and metrics.height > 6


def test_a_promotion_switches_production_at_a_bar_boundary_with_both_configs_and_a_cool_off(store, tmp_path):
    # gates loosened (they are settings) so a variant qualifies within a 10-hour tape
    cfg = settings(tmp_path, online_warmup_labels=10, strategy=TRADING,
                   optimizer={"enabled": True, "max_variants": 4, "metrics_every_bars": 3, "min_trades": 1,
                              "min_runtime_ms": 60 * 60_000, "min_roi": -1.0, "min_sharpe": -1e9,
                              "psr_threshold": 0.0, "cool_off_ms": 2 * 3_600_000})
    run_pipeline(frame_batches(_tape(), 2500), store, cfg)
    promos = stored(store, "events", "ts").filter(pl.col("kind") == "promotion")
    assert promos.height >= 1
    ts = promos["ts"].dt.epoch("ms").to_list()
    assert all(b - a >= 2 * 3_600_000 for a, b in zip(ts, ts[1:]))  # the cool-off holds
    first = json.loads(promos["detail"][0])
    assert first["old_config"] != first["new_config"] and first["changes"]
    old_hash, new_hash = first["old_hash"], first["new_hash"]
    dec = stored(store, "decisions", "ts", WALL["decisions"]).filter(pl.col("origin") == "production")
    t0 = ts[0]
    before = dec.filter(pl.col("ts").dt.epoch("ms") <= t0)
    after = dec.filter(pl.col("ts").dt.epoch("ms") > t0)
    assert set(before["config_hash"]) == {old_hash}
    assert after.height > 0 and after["config_hash"][0] == new_hash
    assert t0 % (5 * 60_000) == 0  # a primary bar boundary
