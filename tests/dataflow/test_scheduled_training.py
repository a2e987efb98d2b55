"""Scheduled retraining (`tapeflow train --every`, the compose trainer) and `tapeflow models`, on a
store filled by the pipeline: each run trains through the deployment gate against the version the
pipeline serves at that moment, and `tapeflow models` shows which one is active."""

import threading

import pytest
from click.testing import CliRunner

from cli.main import main
from cli.models import model_rows, parse_duration, train_every
from tests.helpers import frame_batches, run_pipeline, settings, synthetic_tape

SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT"]


def test_parse_duration():
    assert [parse_duration(x) for x in ("90s", "30m", "24h", "7d", "1.5h")] == [90, 1800, 86400, 604800, 5400]
    for bad in ("", "24", "h", "-1h", "0h", "2x", "1h30m"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def test_each_scheduled_run_is_gated_against_the_serving_version_and_models_lists_them(store, tmp_path):
    cfg = settings(tmp_path / "data", clickhouse_dsn=store.dsn, clickhouse_database=store.database)
    run_pipeline(frame_batches(synthetic_tape(SYMBOLS, minutes=19 * 60, rate=0.3), 3000), store, cfg)
    store.close()  # the trainer opens the store itself, as the service does
    said: list[str] = []
    runs = train_every(cfg, every_s=0.0, folds=2, history_s=None, runs=2, echo=said.append,
                       sleep=threading.Event())
    assert runs == 2
    trained = [s for s in said if s.startswith("train: ") and " rows (bars " in s]
    assert len(trained) == 2 and all(": accepted: " in s or ": rejected: " in s for s in trained)
    rows = model_rows(cfg)
    assert len(rows) == 2
    newest, first = rows  # newest first
    assert first["status"] == "accepted", first["reason"]
    # the second run met the first as the serving version; same data, so it had no unseen rows to compare on
    assert newest["active_version"] == first["version"] and "not compared" in newest["reason"]
    assert [r["active"] for r in rows] == [newest["status"] == "accepted", newest["status"] != "accepted"]

    res = CliRunner().invoke(main, ["models", "--dsn", store.dsn, "--database", store.database,
                                    "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    active = next(r["version"] for r in rows if r["active"])
    assert f"active (*): {active}" in res.output and first["version"] in res.output

    res = CliRunner().invoke(main, ["train", "--runs", "2", "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 2 and "--runs bounds a scheduled training: it needs --every" in res.output
