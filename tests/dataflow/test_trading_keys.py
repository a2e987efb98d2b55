"""Same input, same rows (issue 11): decisions, fills and equity are stored under keys derived from
the data, so a second run of the same input and a run killed and resumed from its recovery
snapshot write every row under a key of the uninterrupted run (ReplacingMergeTree replaces it),
never a new one. Checked on the raw tables (no FINAL): replayed rows may be stored twice, but
never under a key the uninterrupted run lacks."""

import polars as pl
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource

from sinks.clickhouse import ClickHouseSink, SinkStats
from tests.helpers import raw_batches, run_pipeline, settings, stored, synthetic_tape

# the ReplacingMergeTree key of each trading table (infra/clickhouse/005_trading.sql)
KEYS = {
    "decisions": "origin, strategy_id, variant_id, exchange, symbol, ts",
    "fills": "origin, strategy_id, variant_id, position_id, ts, reason",
    "equity": "origin, strategy_id, variant_id, ts",
}
WALL = {"decisions": ("decided_at", "latency_ms")}  # wall-clock columns: not a function of the input


def _cfg(tmp_path):
    # trades on the cohort arms alone (no River models: quick, and no model warm-up to wait for)
    return settings(tmp_path / "data", online_models=False,
                    strategy={"no_model_vetoes_cohort": False, "require_warm": False, "consensus_enabled": False,
                              "s_min": 0.05, "stop_loss_pct": 0.002, "cooldown_bars": 0})


def _keys(store, table) -> set:
    return set(store.query(f"SELECT DISTINCT {KEYS[table]} FROM {table}")[1])  # no FINAL: every stored row


def _count(store, table, final=False) -> int:
    return store.query(f"SELECT count() FROM {table}{' FINAL' if final else ''}")[1][0][0]


def test_reruns_and_resumes_store_every_trading_row_under_the_uninterrupted_runs_keys(store, other_store, tmp_path):
    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=4 * 60, rate=0.4)
    batches = raw_batches(tape.drop("offset").to_dicts(), size=400)
    cfg = _cfg(tmp_path)

    plain = run_pipeline(batches, store, cfg)
    first = {t: stored(store, t, KEYS[t], WALL.get(t, ())) for t in KEYS}
    keys = {t: _keys(store, t) for t in KEYS}
    assert first["fills"].filter(pl.col("reason") == "entry").height >= 3, "the test strategy should trade"
    assert first["fills"]["position_id"].n_unique() * 2 >= first["fills"].height  # ids tell positions apart
    assert all(len(keys[t]) == first[t].height for t in KEYS)  # one row per key

    # the same input again into the same store: same keys, same rows
    run_pipeline(batches, store, cfg)
    for t in KEYS:
        assert _keys(store, t) == keys[t], f"{t}: a second run of the same input wrote new keys"
        assert stored(store, t, KEYS[t], WALL.get(t, ())).equals(first[t]), f"{t} differs after a rerun"

    # killed twice and resumed from the recovery snapshot; the sink writes every 50 rows, between
    # snapshots, so rows of epochs that never completed are in the store and are replayed
    items = list(batches)
    items.insert(len(items) // 3, TestingSource.ABORT())
    items.insert(2 * len(items) // 3, TestingSource.ABORT())
    (tmp_path / "rec").mkdir()
    init_db_dir(tmp_path / "rec", 1)
    rc = RecoveryConfig(str(tmp_path / "rec"))
    written = 0
    for _ in range(3):
        sink = ClickHouseSink(other_store.dsn, other_store.database, SinkStats(), flush_rows=50, flush_ms=60_000)
        run_pipeline(items, other_store, cfg, recovery=rc, epoch_s=0.3, sink=sink)
        written += sum(sink.stats.rows.values())
    assert written > sum(plain.rows.values()), "no row was replayed: the kills did not test anything"
    for t in KEYS:
        resumed = _keys(other_store, t)
        assert resumed <= keys[t], f"{t}: {len(resumed - keys[t])} keys the uninterrupted run does not have"
        assert resumed == keys[t], f"{t}: rows missing after the resume"
        assert _count(other_store, t, final=True) == len(keys[t])
        assert stored(other_store, t, KEYS[t], WALL.get(t, ())).equals(first[t]), f"{t} differs after the resume"
