"""Same input, same rows (issue 11): decisions, fills and equity are stored under keys derived from
the data, so a second run of the same input and a run killed and resumed from its recovery
snapshot write every row under a key of the uninterrupted run (ReplacingMergeTree replaces it),
never a new one. Checked on the raw tables (no FINAL): replayed rows may be stored twice, but
never under a key the uninterrupted run lacks."""

import polars as pl
from bytewax.recovery import RecoveryConfig, init_db_dir

from sinks.clickhouse import ClickHouseSink, SinkStats
from tests.helpers import WALL, raw_batches, run_pipeline, settings, stored, synthetic_tape

# the ReplacingMergeTree key of each trading table (infra/clickhouse/005_trading.sql)
KEYS = {
    "decisions": "origin, strategy_id, variant_id, exchange, symbol, ts",
    "fills": "origin, strategy_id, variant_id, position_id, ts, reason",
    "equity": "origin, strategy_id, variant_id, ts",
}


def _cfg(tmp_path):
    # trades on the cohort arms alone (no River models: quick, and no model warm-up to wait for)
    return settings(tmp_path / "data", online_models=False,
                    strategy={"no_model_vetoes_cohort": False, "require_warm": False, "consensus_enabled": False,
                              "s_min": 0.05, "stop_loss_pct": 0.002, "cooldown_bars": 0})


class _CrashingSink(ClickHouseSink):
    """Test seam: the run crashes right after the sink has written rows in the middle of an epoch (not
    at a snapshot), once per entry of ``crash_after`` (rows this sink has written by then)."""

    def __init__(self, *args, crash_after: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after

    def build_part(self, step_id, for_part, resume_state):
        part = super().build_part(step_id, for_part, resume_state)
        write = part.write_batch

        def write_batch(values):
            before = sum(self.stats.rows.values())
            write(values)
            part._wait()  # the rows handed to the writer thread are stored now: the crash comes after them
            now = sum(self.stats.rows.values())
            if self.crash_after and now > before and now >= self.crash_after[0]:
                self.crash_after.pop(0)
                raise RuntimeError("injected crash: rows of an unfinished epoch are stored")

        part.write_batch = write_batch
        return part


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

    # crashed twice and resumed from the recovery snapshot. The crash comes right after the sink wrote
    # rows in the middle of an epoch (a seam, not a timer: with TestingSource.ABORT whether any row was
    # written after the last snapshot depended on where the 0.3 s epochs fell, and the test failed its
    # own precondition on a quick machine), so rows of an unfinished epoch are in the store and are
    # written again after the resume
    (tmp_path / "rec").mkdir()
    init_db_dir(tmp_path / "rec", 1)
    rc = RecoveryConfig(str(tmp_path / "rec"))
    crash_after = [400, 400]  # rows written by a run before it crashes: the first run, then the second
    written, crashes = 0, 0
    for _ in range(3):
        sink = _CrashingSink(other_store.dsn, other_store.database, SinkStats(), flush_rows=50, flush_ms=60_000,
                             crash_after=crash_after)
        try:
            run_pipeline(batches, other_store, cfg, recovery=rc, epoch_s=0.3, sink=sink)
        except Exception as err:  # noqa: BLE001 - bytewax wraps the injected crash
            assert "injected crash" in str(err) or "injected crash" in repr(err.__cause__), err
            crashes += 1
        written += sum(sink.stats.rows.values())
    assert crashes == 2 and crash_after == []
    assert written > sum(plain.rows.values()), "no row was replayed: the kills did not test anything"
    for t in KEYS:
        resumed = _keys(other_store, t)
        assert resumed <= keys[t], f"{t}: {len(resumed - keys[t])} keys the uninterrupted run does not have"
        assert resumed == keys[t], f"{t}: rows missing after the resume"
        assert _count(other_store, t, final=True) == len(keys[t])
        assert stored(other_store, t, KEYS[t], WALL.get(t, ())).equals(first[t]), f"{t} differs after the resume"
