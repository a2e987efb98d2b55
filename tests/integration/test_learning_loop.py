"""Acceptance (issue 12, 1 and 4): the main job at its defaults, as a user runs it (`tapeflow run`,
nothing loosened: default strategy gates, consensus on, default deployment gate). On the scored half
(the second day, after the ensemble was trained on the first):

- the ensemble passed the deployment gate and scored every bar of the scored half;
- the calibrated models' classwise ECE is <= 0.05 (raw beside it, in the failure message);
- River and the ensemble beat the class prior in log loss (the rows' own label frequencies);
- the production strategy trades (>= 30 closed trades);
- against the oracle (the generator's own state): it beats everyone, and the models capture a
  positive share of its edge;
- the ensemble's feature importances (issue 13) are in ``model_importances`` as in its manifest, and
  the Models dashboard's importance panel shows its top 25;
- the synthetic source's perp data (issue 13) is stored and in the features, and every production
  position held over a funding time (00:00, 08:00, 16:00) has its payment, which equity includes.

The main job takes about a minute; everything is asserted on one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.helpers import WALL

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_704_067_200_000
SPLIT = T0 + 24 * 3_600_000  # the main job trains on the first 24 h of 48


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    data = tmp_path_factory.mktemp("main-job")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPEFLOW_")}  # defaults, nothing else
    res = subprocess.run([sys.executable, "-m", "cli.main", "run", "--data-dir", str(data), "--quiet",
                          "--summary-json", str(data / "summary.json")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (data / "stdout.txt").write_text(res.stdout)
    from dataflows.config import load_settings
    from sinks.store import Store

    settings = load_settings(data_dir=str(data))
    store = Store(settings.dsn(), settings.clickhouse_database)
    yield data, settings, store, json.loads((data / "summary.json").read_text())
    store.close()


def half_calibration(store) -> dict:
    """(model, kind) -> (labels, classwise ECE, log loss) on the scored half, from the SQL view."""
    _, rows = store.query(
        "SELECT model, kind, sum(n) / 3 AS labels, sum(n * abs(obs - pred)) / sum(n) AS ece FROM ("
        "  SELECT model, kind, cls, bin, count() AS n, avg(p) AS pred, avg(hit) AS obs FROM prediction_calibration"
        "  WHERE start >= fromUnixTimestamp64Milli({s:Int64}, 'UTC') GROUP BY model, kind, cls, bin)"
        " GROUP BY model, kind", {"s": SPLIT})
    _, losses = store.query(
        "SELECT model, kind, avgIf(-log(greatest(p, 1e-15)), hit = 1) FROM prediction_calibration "
        "WHERE start >= fromUnixTimestamp64Milli({s:Int64}, 'UTC') GROUP BY model, kind", {"s": SPLIT})
    ll = {(m, k): v for m, k, v in losses}
    return {(m, k): (n, e, ll[(m, k)]) for m, k, n, e in rows}


def test_calibrated_skilled_models_and_a_trading_strategy_at_default_settings(main_job):
    data, settings, store, summary = main_job
    from models.manifest import load_manifest

    (folder,) = [p for p in settings.artifacts().iterdir() if not p.name.startswith(".")]
    m = load_manifest(folder)
    assert m.deployment.status == "accepted", m.deployment.reason
    _, served = store.query("SELECT countIf(version = {v:String}), count() FROM predictions FINAL "
                            "WHERE model = 'onnx_ensemble'", {"v": m.version})
    _, bars = store.query("SELECT count() FROM features FINAL WHERE tf = '5m' AND "
                          "start >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')", {"t": m.data.last_bar_end})
    assert served[0][0] == served[0][1] == bars[0][0] > 800  # every bar after its span, nothing before

    _, labels = store.query("SELECT countIf(label = 0), countIf(label = 1), countIf(label = 2) FROM labels FINAL "
                            "WHERE tf = '5m' AND start >= fromUnixTimestamp64Milli({s:Int64}, 'UTC')", {"s": SPLIT})
    import math

    n = sum(labels[0])
    prior = -sum(c / n * math.log(c / n) for c in labels[0])  # log loss of the rows' own class frequencies
    cal = half_calibration(store)
    shown = {f"{m_}/{k}": (int(v[0]), round(v[1], 4), round(v[2], 4)) for (m_, k), v in sorted(cal.items())}
    for model in ("river_lr", "river_arf", "onnx_ensemble"):
        labelled, ece, _ = cal[(model, "calibrated")]
        assert labelled > 800, shown
        assert ece <= 0.05, f"{model}: calibrated ECE {ece:.4f} (raw {cal[(model, 'raw')][1]:.4f}); {shown}"
    for model in ("river_lr", "onnx_ensemble"):
        assert cal[(model, "calibrated")][2] < prior - 0.01, f"{model} vs prior {prior:.4f}: {shown}"
    assert min(cal[(m_, "calibrated")][2] for m_ in ("river_lr", "river_arf")) < prior - 0.01

    (production,) = [s for s in summary["strategies"] if s["origin"] == "production"]
    assert production["trades"] >= 30, production


def test_the_oracle_beats_every_model_and_the_models_capture_part_of_its_edge(main_job):
    data, settings, store, _ = main_job
    from models.oracle import edge_report, scored_rows, tape_of, with_oracle

    tape = tape_of(data)
    assert tape == {"symbols": ["BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT"], "start_ms": T0, "hours": 48.0,
                    "seed": 7, "rate": None}
    rows = {r["name"]: r for r in edge_report(with_oracle(
        scored_rows(store, tf="5m", horizon=3, since_ms=SPLIT), tape, tf="5m", horizon=3, paths=2000))}
    oracle, prior = rows["oracle"], rows["class prior"]
    assert oracle["log_loss"] < prior["log_loss"] - 0.1 and oracle["accuracy"] > prior["accuracy"] + 0.1
    for model in ("river_lr", "onnx_ensemble"):
        assert oracle["log_loss"] < rows[model]["log_loss"]
        assert 0.05 < rows[model]["share"] < 1.0, rows[model]


def test_the_ensembles_feature_importances_reach_the_store_and_the_models_dashboard(main_job):
    data, settings, store, _ = main_job
    from models.manifest import load_manifest
    from dataflows.model_io import record_importances
    from tests.grafana_sql import TimeRange, expand, queries

    (folder,) = [p for p in settings.artifacts().iterdir() if not p.name.startswith(".")]
    m = load_manifest(folder)
    assert sorted(i.feature for i in m.importances) == sorted(m.features)
    assert sum(i.share for i in m.importances) == pytest.approx(1.0, abs=1e-9) and m.importances[0].gain > 0
    want = [(k, i.feature, i.gain, i.share) for k, i in enumerate(m.importances, start=1)]
    sql = ("SELECT rank, feature, gain, share, version, status, toUnixTimestamp64Milli(trained_at) "
           "FROM model_importances FINAL ORDER BY rank")
    _, rows = store.query(sql)
    assert [r[:4] for r in rows] == want
    assert {r[4:] for r in rows} == {(m.version, "accepted", m.created_at_ms)}
    record_importances(store, m)  # written again (a retry): still one row per version and feature
    assert store.query(sql)[1] == rows

    dash = json.loads((ROOT / "infra" / "grafana" / "dashboards" / "models.json").read_text())
    (q,) = [q for q in queries(dash) if q.kind == "panel" and q.title.startswith("Feature importance")]
    t = datetime.now(timezone.utc)
    _, shown = store.query(expand(q.sql, TimeRange(t - timedelta(hours=1), t)))
    assert len(m.features) > 25 and len(shown) == 25
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in shown] == [
        (k, f, share, m.version, "accepted") for k, f, _, share in want[:25]]


def test_synthetic_perp_data_is_stored_in_features_and_funding_is_paid(main_job):
    _, _, store, _ = main_job
    counts = {t: store.query(f"SELECT count() FROM {t}")[1][0][0]
              for t in ("funding_rates", "open_interest", "liquidations")}
    assert counts["funding_rates"] == 3 * 48 * 60 and counts["open_interest"] == 3 * 48 * 12
    assert counts["liquidations"] > 0, counts
    _, (row,) = store.query("SELECT count(), countIf(mapContains(values, 'funding_bps')), "
                            "countIf(mapContains(values, 'oi_chg')) FROM features FINAL")
    assert row[1] == row[0] and row[2] >= row[0] - 3 * 2, row  # oi_chg: from each instrument's 2nd bar
    # positions of the production book over a funding time: entry before it, exit after it (or never)
    _, spans = store.query(
        "SELECT position_id, minIf(ts, reason = 'entry') AS a, maxIf(ts, reason != 'entry') AS b "
        "FROM fills FINAL WHERE origin = 'production' GROUP BY position_id")
    h8 = 8 * 3_600_000
    due = {(pid, t) for pid, a, b in spans for t in range(T0 + h8, T0 + 48 * 3_600_000, h8)  # the input ends at 48 h
           if a.timestamp() * 1000 < t and (b.timestamp() < 1 or b.timestamp() * 1000 >= t)}
    _, paid = store.query("SELECT position_id, toUnixTimestamp64Milli(ts), amount FROM funding_payments FINAL "
                          "WHERE origin = 'production'")
    assert {(pid, t) for pid, t, _ in paid} == due and due, (len(due), len(paid))
    _, ((last_funding,),) = store.query("SELECT argMax(funding, (ts, seq)) FROM equity FINAL WHERE origin = 'production'")
    assert last_funding == pytest.approx(sum(a for _, _, a in paid))


def test_main_job_trains_on_the_first_part_then_scores_and_trades_the_rest(main_job):
    """(Moved from tests/test_cli.py, which ran a second main job for it.)"""
    data, _, store, summary = main_job
    out = (data / "stdout.txt").read_text()
    assert "ONNX ensemble" in out and "model quality on the scored part" in out and "strategies (paper)" in out
    _, ((first, n, versions),) = store.query(
        "SELECT min(toUnixTimestamp64Milli(start)), count(), uniqExact(version) FROM predictions FINAL "
        "WHERE model = 'onnx_ensemble'")
    assert n > 100 and versions == 1
    assert first >= SPLIT - 5 * 60_000  # scored only once trained (the bar closing at the split)
    _, ((river,),) = store.query("SELECT count() FROM predictions FINAL WHERE model = 'river_lr' "
                                 f"AND toUnixTimestamp64Milli(start) < {SPLIT}")
    assert river > 0  # the online models ran from the start
    _, strat = store.query("SELECT origin, count() FROM decisions FINAL GROUP BY origin")
    assert strat and strat[0][0] == "production" and strat[0][1] > 300
    # the printed per-strategy summary is what the store holds
    (prod,) = [r for r in summary["strategies"] if r["origin"] == "production"]
    _, ((trades, wins),) = store.query("SELECT count(), countIf(realised_pnl > 0) FROM fills FINAL "
                                       "WHERE realised_pnl IS NOT NULL AND origin = 'production'")
    assert prod["trades"] == trades
    assert prod["trades"] == 0 or abs(prod["win_rate"] - wins / trades) < 1e-12
    assert {"pnl", "sharpe", "max_drawdown"} <= set(prod)
    assert {r["model"] for r in summary["model_quality"]} >= {"onnx_ensemble", "river_lr", "river_arf"}


def _rows_hash(table: str, by: str, wall: str = "") -> str:
    """Each group's row count and a hash of its whole rows (NULLs included; ``wall``: columns of wall
    time or of the training's clock, which two runs never share)."""
    cols = f"* EXCEPT ({wall})" if wall else "*"
    return (f"SELECT {by}, count() AS n, toString(sum(cityHash64(formatRow('TSV', {cols})))) AS h "
            f"FROM {table} FINAL GROUP BY {by} ORDER BY {by}")


FINGERPRINT = {  # what the main job stored, in a form two runs can be compared by
    "bars": _rows_hash("bars", "tf"),
    "features": _rows_hash("features", "tf"),
    "predictions": _rows_hash("predictions", "model, symbol", wall="version"),  # version: when trained
    "decisions": _rows_hash("decisions", "origin", wall=", ".join(WALL["decisions"])),
    "fills": _rows_hash("fills", "origin"),
    "equity": _rows_hash("equity", "origin"),
}


def test_the_main_job_on_a_local_cluster_stores_what_one_process_stores(main_job, tmp_path):
    """`tapeflow run --processes 2`: every process of each phase snapshots into the run's one
    recovery directory (a peer used to make its own under its phase's directory, so the second phase
    started over from the beginning, counting the first day twice, and the ensemble, trained on that
    day, refused the instruments whose bars it saw again), and a peer of the scored phase serves the
    ensemble (it used to take its one phase for the first of the split: its instruments went
    unscored). Without an error either way."""
    _, _, store, summary = main_job
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPEFLOW_")}
    two = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "cli.main", "run", "--data-dir", str(two), "--quiet", "--processes", "2",
                          "--summary-json", str(tmp_path / "summary.json")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["trades_in"] == summary["trades_in"]

    one = {name: [dict(zip(cols, row)) for row in rows] for name, (cols, rows) in
           ((name, store.query(sql)) for name, sql in FINGERPRINT.items())}
    both = {}  # read by `tapeflow sql`: this process holds the other embedded store open
    for name, sql in FINGERPRINT.items():
        out = subprocess.run([sys.executable, "-m", "cli.main", "sql", "--data-dir", str(two), "--format", "json", sql],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        both[name] = json.loads(out.stdout)
    assert all(r["h"] is not None for rows in one.values() for r in rows)  # a NULL would hash nothing
    assert {r["symbol"] for r in one["predictions"] if r["model"] == "onnx_ensemble"} == {
        "BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT"}  # every instrument scored by the ensemble
    assert both == one
