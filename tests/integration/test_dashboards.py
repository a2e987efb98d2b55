"""The people-facing side (issue 7): Grafana provisioning and dashboards, and the KPI views.

1. The embedded job runs on a small synthetic tape (with a few bad messages and late trades), then
   the SQL of every panel, annotation and template variable of every dashboard is expanded for a
   concrete time range (tests/grafana_sql.py) and executed on the embedded store: everything runs,
   and every panel except the few named in ALLOWED_EMPTY returns rows. A far-away time range makes
   every time-filtered query return nothing (the time range is really applied).
2. Dashboard JSON and provisioning YAML load, reference the provisioned datasource uid, and have
   unique uids and titles.
3. On a fresh database filled with hand-made rows, every KPI view equals the same KPI computed here
   in Python from those rows.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from sinks.clickhouse import ClickHouseSink, SinkStats
from sinks.store import Store
from tests.grafana_sql import (ExpandError, TimeRange, expand, expand_macros, expand_variables, panels,
                               queries, resolve_variables)
from tests.helpers import T0, raw_batches, run_pipeline, settings, synthetic_tape

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARD_FILES = ["trading.json", "models.json", "optimizer.json", "pipeline.json"]
UTC = timezone.utc
HOUR, MIN = 3_600_000, 60_000

# Panels (dashboard uid, title) that may return no rows after the embedded job: nothing in it writes
# them yet. variant_metrics (the live optimizer) and events (promotions, kill switch, risk pauses)
# stay empty on a short synthetic run. They must still run; test_optimizer_panels_* fills them.
ALLOWED_EMPTY = {
    ("tapeflow-optimizer", "Leaderboard (latest evaluation per variant)"),   # variant_metrics
    ("tapeflow-optimizer", "ROI by variant"),                                # variant_metrics
    ("tapeflow-optimizer", "Sharpe and deflated Sharpe (DSR) by variant"),   # variant_metrics
    ("tapeflow-optimizer", "Promotions"),                  # panel and annotation: events kind = 'promotion'
    ("tapeflow-optimizer", "Events (promotions, kill switch, pauses, gaps)"),  # events
    ("tapeflow-trading", "Risk events"),                                     # annotation, events
    ("tapeflow-models", "Deployment gate decisions"),  # events of tapeflow train (tests/dataflow/test_deployment_gate.py)
    # model_importances of tapeflow train (tests/integration/test_learning_loop.py runs this panel after a training)
    ("tapeflow-models", "Feature importance (gain share) of the serving ensemble, top 25 (all history)"),
}
TIME_MACROS = ("$__timeFilter", "$__dateFilter", "$__dateTimeFilter", "$__dt(")


def load_dashboards() -> dict[str, dict]:
    return {name: json.loads((GRAFANA / "dashboards" / name).read_text()) for name in DASHBOARD_FILES}


def provisioned_datasource() -> dict:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    (ds,) = doc["datasources"]
    return ds


def run_sql(store: Store, sql: str) -> list[tuple]:
    return store.query(sql)[1]


# ============================================================ acceptance 2: files load, datasource uid

def test_provisioning_files_load_and_point_at_the_dashboards_directory():
    ds = provisioned_datasource()
    assert ds["uid"] == "tapeflow-clickhouse" and ds["type"] == "grafana-clickhouse-datasource"
    assert ds["jsonData"]["defaultDatabase"] == "tapeflow"  # panels use unqualified table names
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tapeflow.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./infra/grafana/dashboards:{path}:ro" in mounts, mounts  # the provider reads our JSON files
    assert "grafana-clickhouse-datasource" in compose["services"]["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    assert sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json")) == sorted(DASHBOARD_FILES)


def test_dashboards_load_use_the_provisioned_datasource_and_are_unique():
    uid = provisioned_datasource()["uid"]
    dashboards = load_dashboards()
    assert len({d["uid"] for d in dashboards.values()}) == len(dashboards)
    assert len({d["title"] for d in dashboards.values()}) == len(dashboards)
    for name, d in dashboards.items():
        ps = list(panels(d))
        assert ps, name
        assert len({p["id"] for p in ps}) == len(ps), f"{name}: panel ids repeat"
        assert len({p["title"] for p in ps}) == len(ps), f"{name}: panel titles repeat"
        for p in ps:
            assert p["datasource"] == {"type": "grafana-clickhouse-datasource", "uid": uid}, (name, p["title"])
            assert p["targets"], (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["rawSql"].strip(), (name, p["title"])
                assert t["editorType"] == "sql"
                # the plugin's pairs: time series = queryType timeseries + format 0, table = table + 1
                assert (t["queryType"], t["format"]) in {("timeseries", 0), ("table", 1)}, (name, p["title"])
                assert (t["queryType"] == "timeseries") == (p["type"] == "timeseries"), (name, p["title"])
        for q in queries(d):
            assert q.datasource["uid"] == uid, (name, q.kind, q.title)
            if q.kind != "variable":  # the dashboard's time range applies, unless the title says it does not
                assert any(m in q.sql for m in TIME_MACROS) or "(all history)" in q.title, (name, q.title)
        for v in d["templating"]["list"]:
            if v.get("includeAll") or v.get("multi"):
                # a multi-value variable must be rendered with an explicit SQL format wherever it is used
                for q in queries(d):
                    rest = q.sql.replace(f"${{{v['name']}:", "")
                    assert f"${v['name']}" not in rest and f"${{{v['name']}}}" not in rest, (name, v["name"], q.title)


# ============================================================ the macro expander itself

TR = TimeRange(datetime(2024, 1, 1, 0, 0, tzinfo=UTC), datetime(2024, 1, 2, 6, 30, 15, 250_000, tzinfo=UTC), 300)


def test_macros_expand_like_the_clickhouse_plugin():
    f, t = 1_704_067_200, 1_704_177_015
    assert expand("WHERE $__timeFilter(ts)", TR) == f"WHERE ts >= toDateTime({f}) AND ts <= toDateTime({t})"
    assert expand("$__timeFilter_ms(ts)", TR) == (
        f"ts >= fromUnixTimestamp64Milli({f}000) AND ts <= fromUnixTimestamp64Milli({t}250)")
    assert expand("$__dateFilter(day)", TR) == "day >= toDate('2024-01-01') AND day <= toDate('2024-01-02')"
    assert expand("$__dt(d, toDateTime(x, 'UTC'))", TR) == (
        "(d >= toDate('2024-01-01') AND d <= toDate('2024-01-02')) AND "
        f"(toDateTime(x, 'UTC') >= toDateTime({f}) AND toDateTime(x, 'UTC') <= toDateTime({t}))")
    assert expand("$__fromTime,$__toTime,$__fromTime_ms", TR) == (
        f"toDateTime({f}),toDateTime({t}),fromUnixTimestamp64Milli({f}000)")
    assert expand("$__timeInterval(ts) / $__interval_s", TR) == (
        "toStartOfInterval(toDateTime(ts), INTERVAL 300 second) / 300")
    assert expand("$__timeInterval_ms(ts)", TR) == "toStartOfInterval(toDateTime64(ts, 3), INTERVAL 300000 millisecond)"
    # a nested argument with parentheses and a comma inside a function stays one argument
    assert expand("$__timeFilter(toStartOfHour(ts, 'UTC'))", TR).startswith("toStartOfHour(ts, 'UTC') >= ")
    for bad in ("$__timeFilter(a, b)", "$__unknown(ts)", "$__timeFilter(ts", "$__interval"):
        with pytest.raises(ExpandError):
            expand_macros(bad, TR)


def test_variables_expand_with_formats_and_nothing_is_left_over():
    v = {"symbol": "BTC/USDT:USDT", "model": ["river_lr", "o'nnx"], "tf": "5m"}
    assert expand_variables("s = ${symbol:sqlstring} AND tf = '$tf'", v) == "s = 'BTC/USDT:USDT' AND tf = '5m'"
    assert expand_variables("m IN (${model:sqlstring})", v) == "m IN ('river_lr','o''nnx')"
    assert expand_variables("m IN (${model:singlequote})", v) == "m IN ('river_lr','o\\'nnx')"
    assert expand_variables("${model:csv}|${symbol}|${symbol:raw}", v) == "river_lr,o'nnx|BTC/USDT:USDT|BTC/USDT:USDT"
    with pytest.raises(ExpandError):
        expand_variables("m IN ($model)", v)  # a list without an explicit format
    with pytest.raises(ExpandError):
        expand_variables("x = $nope", v)
    with pytest.raises(ExpandError):
        expand("x = ${__from}", TR, v)
    # variables before macros: a variable's value is not re-read as a macro, and no '$' survives
    assert expand("$__timeFilter(ts) AND tf = ${tf:sqlstring}", TR, v).endswith("AND tf = '5m'")


def test_resolve_variables_runs_queries_in_order_and_keeps_valid_current_values():
    dash = {"uid": "d", "templating": {"list": [
        {"name": "tf", "type": "custom", "query": "1m,5m , 1h", "current": {"value": "5m"}},
        {"name": "a", "type": "query", "query": "SELECT x FROM t WHERE tf = ${tf:sqlstring}",
         "current": {"value": "zz"}},
        {"name": "b", "type": "query", "query": {"rawSql": "SELECT y FROM u WHERE a = '${a}'"}, "multi": True,
         "includeAll": True},
    ]}}
    seen = []

    def run(sql):
        seen.append(sql)
        return [("p",), ("q",)] if "FROM t" in sql else [("r",), ("s",)]

    assert resolve_variables(dash, run, TR) == {"tf": "5m", "a": "p", "b": ["r", "s"]}
    assert seen == ["SELECT x FROM t WHERE tf = '5m'", "SELECT y FROM u WHERE a = 'p'"]
    with pytest.raises(ExpandError):
        resolve_variables(dash, lambda sql: [], TR)


# ============================================================ acceptance 1: every panel on a real run

SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT"]
START = T0 - 5 * HOUR  # 19:00 the day before: the run crosses a UTC midnight (two days of daily KPIs)


def _tape_messages() -> list:
    tape = synthetic_tape(SYMBOLS, minutes=10 * 60, rate=0.5, start_ms=START)
    msgs: list = tape.drop("offset").to_dicts()
    for k, i in enumerate([30_000, 20_000, 10_000]):  # from the back, so the indices stay valid
        late = dict(msgs[i], id=f"late-{k}", ts=msgs[i]["ts"] - 5 * MIN)  # behind the watermark
        msgs.insert(i + 1, late)
    msgs.insert(15_000, b"{not json")
    msgs.insert(25_000, {"exchange": "x", "symbol": SYMBOLS[0], "id": "neg", "ts": START + HOUR, "price": -1.0,
                         "amount": 1.0, "side": "buy"})
    return msgs


@pytest.fixture(scope="module")
def filled(chdb_dsn, tmp_path_factory):
    """One embedded run for the module: 2 symbols x 10 h, a strategy loosened so it trades, consensus
    in shadow mode (records would-be vetoes), pipeline_health rows every 0.5 s of wall time."""
    store = Store(chdb_dsn, "dash_" + uuid.uuid4().hex[:10])
    cfg = settings(tmp_path_factory.mktemp("dash"), online_warmup_labels=10,
                   strategy={"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": False,
                             "consensus_enabled": True, "consensus_shadow": True, "consensus_feature": "ret_1",
                             "consensus_threshold": 0.0005})
    stats = SinkStats()
    sink = ClickHouseSink(store.dsn, store.database, stats, flush_rows=100_000, flush_ms=60_000, health_every_s=0.5)
    run_pipeline(raw_batches(_tape_messages(), size=2000), store, cfg, sink=sink)
    yield store
    store.close()


def test_the_run_fills_what_the_core_panels_read(filled):
    counts = {t: run_sql(filled, f"SELECT count() FROM {t} FINAL")[0][0]
              for t in ("bars", "decisions", "fills", "equity", "model_metrics", "late_trades", "dead_letters",
                        "pipeline_health", "variant_metrics")}
    assert counts["late_trades"] == 3 and counts["dead_letters"] == 2
    assert min(counts[t] for t in ("bars", "decisions", "fills", "equity", "model_metrics", "pipeline_health")) > 0
    assert counts["variant_metrics"] == 0  # why the optimizer panels are allowed to be empty here


def test_every_panel_runs_and_the_core_panels_return_rows(filled):
    now = datetime.now(UTC)
    # from the tape's first trade to past the wall clock (pipeline_health rows carry wall time)
    tr = TimeRange(datetime.fromtimestamp(START / 1000, UTC) - timedelta(hours=1), now + timedelta(hours=1), 300)
    far = TimeRange(datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 1, 2, tzinfo=UTC), 300)
    ran, empty_core, checked_far = 0, [], 0
    for d in load_dashboards().values():
        variables = resolve_variables(d, lambda sql: run_sql(filled, sql), tr)  # every variable has options
        for q in queries(d):
            if q.kind == "variable":
                continue
            sql = expand(q.sql, tr, variables)
            try:
                rows = run_sql(filled, sql)
                described = run_sql(filled, f"DESCRIBE ({sql})")
            except Exception as err:  # noqa: BLE001 - name the panel that broke
                pytest.fail(f"{d['uid']} / {q.kind} {q.title!r} {q.ref}: {err}\n{sql}")
            ran += 1
            if q.fmt == 0:  # time series: a time column first, of a date-time type
                assert described[0][0] == "time" and described[0][1].startswith("DateTime"), (q.title, described)
            if q.kind == "annotation":
                assert {"time", "text", "tags"} <= {c[0] for c in described}, q.title
            if not rows and (d["uid"], q.title) not in ALLOWED_EMPTY:
                empty_core.append(f"{d['uid']} / {q.title} {q.ref}")
            if any(m in q.sql for m in TIME_MACROS):
                assert run_sql(filled, expand(q.sql, far, variables)) == [], f"{q.title}: ignores the time range"
                checked_far += 1
    assert not empty_core, f"core panels without rows: {empty_core}"
    assert ran >= 40 and checked_far >= 30


def test_views_agree_with_the_base_tables_of_the_run(filled):
    """On the real run: closed trades are exactly the exit fills, and their totals add up."""
    (exits, realised, fees_all), = run_sql(filled, "SELECT countIf(realised_pnl IS NOT NULL), sum(realised_pnl), "
                                                   "sum(fee) FROM fills FINAL")
    (trades, net, fees, gross), = run_sql(filled, "SELECT count(), sum(net_pnl), sum(fees), sum(gross_pnl) "
                                                  "FROM kpi_closed_trades")
    assert trades == exits > 0
    assert net == pytest.approx(realised) and gross == pytest.approx(net + fees)
    assert 0 < fees <= fees_all + 1e-9
    (n, s), = run_sql(filled, "SELECT sum(trades), sum(total_net_pnl) FROM kpi_fees_daily")
    assert n == trades and s == pytest.approx(realised)
    (decisions,), = run_sql(filled, "SELECT count() FROM decisions FINAL")
    days = run_sql(filled, "SELECT day, any(decisions) FROM kpi_veto_frequency GROUP BY day")
    assert sum(x for _, x in days) == decisions and len(days) == 2
    (marks,), = run_sql(filled, "SELECT sum(marks) FROM kpi_daily_pnl")
    assert marks == run_sql(filled, "SELECT count() FROM equity FINAL")[0][0]


# ============================================================ the optimizer panels with rows

def test_optimizer_panels_show_variant_metrics_and_promotions(store):
    t = datetime(2024, 3, 1, 12, tzinfo=UTC)
    rows = []
    for i, (variant, first_sharpe) in enumerate([("base", 0.5), ("v1", 1.5), ("v2", None)]):
        for k in range(3):
            rows.append([t + timedelta(minutes=k), "production" if variant == "base" else "experimental",
                         "ensemble", variant, "h", "{}", "active", k * 60_000, 0.01 * (i + k), 10 * k,
                         None if first_sharpe is None else first_sharpe + k])
    store.client.insert("variant_metrics", rows, column_names=[
        "ts", "origin", "strategy_id", "variant_id", "config_hash", "config", "status", "runtime_ms", "roi",
        "trades", "sharpe"])
    store.client.insert("equity", [["production", "ensemble", "base", "h", t, 1, 100.0]],
                        column_names=["origin", "strategy_id", "variant_id", "config_hash", "ts", "seq", "equity"])
    store.client.insert("events", [["promotion", t, "v1 beat production", "{}", "optimizer"]],
                        column_names=["kind", "ts", "reason", "detail", "source"])
    d = json.loads((GRAFANA / "dashboards" / "optimizer.json").read_text())
    tr = TimeRange(t - timedelta(hours=1), t + timedelta(hours=1), 60)
    variables = resolve_variables(d, lambda sql: run_sql(store, sql), tr)
    assert variables == {"strategy": "ensemble"}
    got = {}
    for q in queries(d):
        if q.kind != "variable":
            got[(q.kind, q.title)] = run_sql(store, expand(q.sql, tr, variables))
    board = got[("panel", "Leaderboard (latest evaluation per variant)")]
    assert [r[0] for r in board] == ["v1", "base", "v2"]  # by the latest Sharpe, NULL last
    assert board[0][4] == pytest.approx(0.03) and board[0][7] == pytest.approx(3.5)
    assert len(got[("panel", "ROI by variant")]) == 9
    assert got[("panel", "Promotions")][0][1] == "v1 beat production"
    assert len(got[("annotation", "Promotions")]) == 1


# ============================================================ the feature importance panel picks the serving ensemble

def test_importance_panel_shows_the_newest_accepted_ensembles_top_25(store):
    """The ensemble the pipeline serves by default: the newest accepted version, even when a newer
    one was rejected; the newest trained one while none was accepted. Its 25 highest-ranked rows."""
    t = datetime(2024, 3, 1, 12, tzinfo=UTC)

    def ensemble(version: str, hours: int, status: str) -> None:
        rows = [[version, f"f{k:02d}", k, 30.0 - k, (30.0 - k) / 435, t + timedelta(hours=hours), status]
                for k in range(1, 31)]
        store.client.insert("model_importances", rows,
                            column_names=["version", "feature", "rank", "gain", "share", "trained_at", "status"])

    d = json.loads((GRAFANA / "dashboards" / "models.json").read_text())
    (q,) = [q for q in queries(d) if q.title.startswith("Feature importance")]
    tr = TimeRange(datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 1, 2, tzinfo=UTC), 60)  # no time filter

    def shown() -> list[tuple]:
        return run_sql(store, expand(q.sql, tr))

    ensemble("v1", 0, "rejected")
    assert {r[4] for r in shown()} == {"v1"}  # nothing accepted yet: the newest trained, marked rejected
    ensemble("v2", 1, "accepted")
    ensemble("v3", 2, "rejected")
    ensemble("v2", 1, "accepted")  # written twice: counts once
    rows = shown()
    assert [r[:2] for r in rows] == [(k, f"f{k:02d}") for k in range(1, 26)]
    assert {(r[4], r[5]) for r in rows} == {("v2", "accepted")} and rows[0][2] == pytest.approx(29 / 435)


# ============================================================ acceptance 3: views vs Python on hand-made rows

T = datetime(2024, 1, 1, tzinfo=UTC)
A = ("production", "ensemble", "base")
B = ("experimental", "ensemble", "v1")
TAGS = ["origin", "strategy_id", "variant_id", "config_hash"]


def insert(store: Store, table: str, rows: list[dict]) -> None:
    cols = list(rows[0])
    store.client.insert(table, [[r[c] for c in cols] for r in rows], column_names=cols)


def tags(book) -> dict:
    return dict(zip(TAGS, (*book, "hash")))


def approx(x):
    return None if x is None else pytest.approx(x, rel=1e-9, abs=1e-12)


def ntile(n: int, buckets: int = 10) -> list[int]:
    """SQL ntile: the first n % buckets buckets hold one row more."""
    q, r = divmod(n, buckets)
    out = []
    for b in range(min(n, buckets)):
        out += [b + 1] * (q + (1 if b < r else 0))
    return out


def sharpe(rets: list[float], per_year: float):
    if len(rets) < 2:
        return None
    sd = float(np.std(rets, ddof=1))
    return float(np.mean(rets)) / sd * math.sqrt(per_year) if sd > 0 else None


EQUITY = {  # book -> (ts, seq, equity); the 5000.0 mark is superseded by a later seq of the same ts
    A: [(T + timedelta(hours=10), 1, 1000.0), (T + timedelta(hours=10, seconds=30), 2, 1010.0),
        (T + timedelta(hours=10, minutes=1), 3, 990.0), (T + timedelta(hours=12), 4, 1020.0),
        (T + timedelta(days=1, hours=9), 5, 5000.0), (T + timedelta(days=1, hours=9), 6, 1000.0),
        (T + timedelta(days=1, hours=15), 7, 1050.0), (T + timedelta(days=2, hours=8), 8, 1040.0),
        (T + timedelta(days=2, hours=20), 9, 1030.0)],
    B: [(T + timedelta(hours=10), 1, 500.0), (T + timedelta(hours=11), 2, 510.0),
        (T + timedelta(days=1, hours=10), 3, 490.0)],
}
CONFS = [0.61, 0.55, 0.72, 0.55, 0.90, 0.66, 0.58, 0.81, 0.77, 0.49, 0.70, 0.64]  # a tie: trades 2 and 4


def _trading_rows():
    """Decisions and fills of two books. Book A: positions 1..11 open and close, 12 stays open,
    13 closes but its decision had no model confidence, 14 opened but never filled; plus decisions that
    opened nothing (vetoes, shadow vetoes, bandit picks that a gate blocked). Book B reuses ids 1, 2."""
    decisions, fills = [], []

    def decision(book, ts, symbol, action, arm, pid=0, conf=None, vetoes=(), shadow=(), latency=1.0,
                 notional=0.0):
        decisions.append({**tags(book), "ts": ts, "exchange": "x", "symbol": symbol, "tf": "5m", "action": action,
                          "side": 1 if action == "open_long" else -1 if action == "open_short" else 0, "arm": arm,
                          "reason": "entry" if action.startswith("open") else (list(vetoes) or ["no_signal"])[0],
                          "vetoes": list(vetoes), "shadow_vetoes": list(shadow), "best_conf": conf,
                          "notional": notional, "position_id": pid, "latency_ms": latency})

    def fill(book, ts, symbol, reason, pid, side, notional, fee, price, realised=None, bps=None, dts=None, arm=""):
        fills.append({**tags(book), "ts": ts, "exchange": "x", "symbol": symbol, "side": "buy" if side > 0 else "sell",
                      "qty": notional / price, "price": price, "notional": notional, "fee": fee, "reason": reason,
                      "position_id": pid, "position_side": side, "realised_pnl": realised, "pnl_bps": bps,
                      "decision_ts": dts or ts, "arm": arm})

    arms = ["pros", "amateurs", "model_online"]
    for k in range(1, 15):
        dts = T + timedelta(hours=4 * k)
        symbol = "BTC" if k % 2 else "ETH"
        side = 1 if k % 3 else -1
        conf = CONFS[k - 1] if k <= 12 else None
        decision(A, dts, symbol, "open_long" if side > 0 else "open_short", arms[k % 3], pid=k, conf=conf,
                 latency=float(k * 3 % 17), notional=100.0 * k)
        if k == 14:
            continue  # cancelled: no fill
        fill(A, dts + timedelta(minutes=1), symbol, "entry", k, side, 100.0 * k, 0.5 + k / 100, 100.0 + k,
             dts=dts, arm=arms[k % 3])
        if k != 12:
            net = (-1) ** k * 1.5 * k + 0.25
            fill(A, dts + timedelta(hours=2, minutes=k), symbol, "take_profit" if net > 0 else "stop_loss", k, -side,
                 100.0 * k + net, 0.6 + k / 100, 101.0 + k, realised=net, bps=net / (100.0 * k) * 1e4, dts=dts,
                 arm=arms[k % 3])
    extra = [  # (ts, action, arm, vetoes, shadow, latency)
        (T + timedelta(hours=1), "none", "pros", ["cooldown"], [], 5.0),
        (T + timedelta(hours=1, minutes=5), "none", "", ["low_conf_veto", "no_eligible_arm", "low_conf_veto"], [], 7.0),
        (T + timedelta(hours=4, minutes=5), "hold", "model_online", [], ["consensus_veto"], 2.0),
        (T + timedelta(days=1, hours=2), "none", "", ["data_gap"], [], 11.0),
        (T + timedelta(days=1, hours=2, minutes=5), "none", "amateurs", ["cooldown", "max_positions"],
         ["consensus_veto"], 13.0),
    ]
    for ts, action, arm, vetoes, shadow, latency in extra:
        decision(A, ts, "SOL", action, arm, vetoes=vetoes, shadow=shadow, latency=latency)
    for k, (conf, net) in enumerate([(0.6, 3.0), (0.7, -1.0)], start=1):
        dts = T + timedelta(hours=10 + k)
        decision(B, dts, "BTC", "open_long", "pros", pid=k, conf=conf, latency=4.0, notional=50.0)
        fill(B, dts + timedelta(minutes=1), "BTC", "entry", k, 1, 50.0, 0.1, 100.0, dts=dts, arm="pros")
        fill(B, dts + timedelta(minutes=30), "BTC", "time_stop", k, -1, 50.0 + net, 0.12, 101.0, realised=net,
             bps=net / 50 * 1e4, dts=dts, arm="pros")
    return decisions, fills


PRED_STARTS = [T + timedelta(hours=23, minutes=40 + 5 * i) for i in range(8)]  # crosses midnight at i = 4
LABELS = [2, 0, 1, 2, 2, 0]  # the first six bars matured, the last two did not


def _prediction_rows():
    rng = np.random.default_rng(11)
    preds = []
    for model in ("m_a", "m_b"):
        for i, s in enumerate(PRED_STARTS):
            p_down, p_flat, p_up = (0.0, 0.0, 1.0) if (model, i) == ("m_a", 3) else rng.dirichlet([2, 2, 2])
            preds.append({"exchange": "x", "symbol": "BTC", "tf": "5m", "start": s, "end": s + timedelta(minutes=5),
                          "model": model, "version": "1", "p_down": float(p_down), "p_flat": float(p_flat),
                          "p_up": float(p_up), "confidence": float(max(p_up, p_down)),
                          "alpha": float(abs(p_up - p_down)), "votes": ""})
    labels = [{"exchange": "x", "symbol": "BTC", "tf": "5m", "start": s, "end": s + timedelta(minutes=5),
               "horizon": 3, "fwd_ret": 0.001 * (lab - 1), "band": 0.0005, "label": lab,
               "matured_at": s + timedelta(minutes=20)} for s, lab in zip(PRED_STARTS, LABELS)]
    return preds, labels


HEALTH_M = T + timedelta(days=3, hours=12)
HEALTH = [  # (ts, process, worker, trades_in, trades_per_s, bars, late, dead, dups, lag, p50, p95, p99, decisions, rss)
    (HEALTH_M + timedelta(seconds=5), 0, 0, 100, 20.0, 3, 2, 1, 4, 1500.0, 3.0, 7.0, 9.0, 10, 200.0),
    (HEALTH_M + timedelta(seconds=35), 0, 0, 200, 40.0, 4, 0, 0, 1, 2500.0, 4.0, 6.0, 8.0, 12, 210.0),
    (HEALTH_M + timedelta(seconds=10), 1, 0, 50, 5.0, 1, 0, 3, 0, None, None, None, None, 0, 150.0),
    (HEALTH_M + timedelta(seconds=70), 0, 0, 300, 30.0, 5, 1, 0, 0, 900.0, 2.0, 3.0, 4.0, 7, 215.0),
]
HEALTH_COLS = ["ts", "process", "worker", "trades_in", "trades_per_s", "bars", "late_trades", "dead_letters",
               "duplicates", "watermark_lag_ms", "decision_p50_ms", "decision_p95_ms", "decision_p99_ms",
               "decisions", "rss_mb"]


BASE_TABLES = ["equity", "decisions", "fills", "predictions", "labels", "pipeline_health", "bars", "late_trades",
               "dead_letters"]


@pytest.fixture
def hand_made(store):
    for table in BASE_TABLES:  # keep replaced rows unmerged, as between merges: only FINAL hides them
        store.command(f"SYSTEM STOP MERGES {table}")
    for book, marks in EQUITY.items():
        for ts, seq, eq in marks:  # one insert per mark: the superseded one is a separate part
            insert(store, "equity", [{**tags(book), "ts": ts, "seq": seq, "equity": eq}])
    decisions, fills = _trading_rows()
    insert(store, "decisions", decisions)
    insert(store, "decisions", [decisions[0]])  # replayed: the same key again
    insert(store, "fills", fills)
    insert(store, "fills", [f for f in fills if f["position_id"] == 3 and f["realised_pnl"] is not None])
    preds, labels = _prediction_rows()
    insert(store, "predictions", preds)
    insert(store, "labels", labels)
    insert(store, "labels", labels[:2])
    insert(store, "pipeline_health", [dict(zip(HEALTH_COLS, r)) for r in HEALTH])
    bar = lambda sym, tf, start, trades: {"exchange": "x", "symbol": sym, "tf": tf, "start": start,  # noqa: E731
                                          "end": start + timedelta(minutes=1), "trades": trades,
                                          "notional": 10.0 * trades}
    h = T + timedelta(hours=1)
    insert(store, "bars", [bar("BTC", "1m", h, 120), bar("BTC", "1m", h + timedelta(minutes=1), 60),
                           bar("ETH", "1m", h, 30), bar("BTC", "5m", h, 180)])
    late = [{"exchange": "x", "symbol": s, "id": i, "ts": ts} for s, i, ts in
            [("BTC", "l1", h + timedelta(seconds=10)), ("BTC", "l2", h + timedelta(seconds=20)),
             ("ETH", "l3", h + timedelta(minutes=5, seconds=1))]]
    insert(store, "late_trades", late)
    insert(store, "late_trades", late[:1])
    insert(store, "dead_letters", [
        {"source": "k", "partition": "0", "offset": o, "reason": r, "recv_ts": h + timedelta(seconds=s)}
        for o, r, s in [(1, "bad_json", 1), (2, "bad_json", 50), (3, "missing_field", 61)]])
    (raw,), (final,) = run_sql(store, "SELECT count() FROM equity"), run_sql(store, "SELECT count() FROM equity FINAL")
    assert raw[0] == final[0] + 1  # the superseded mark is still stored
    return store, decisions, fills, preds, labels


def view(store: Store, sql: str) -> list[dict]:
    cols, rows = store.query(sql)
    return [dict(zip(cols, r)) for r in rows]


def _marks(book) -> list[tuple[datetime, float]]:
    """The equity curve as FINAL sees it: the highest seq of each ts, in time order."""
    best: dict = {}
    for ts, seq, eq in EQUITY[book]:
        if ts not in best or seq > best[ts][0]:
            best[ts] = (seq, eq)
    return [(ts.replace(tzinfo=None), best[ts][1]) for ts in sorted(best)]


def _curve(book):
    peak, out = -math.inf, []
    for ts, eq in _marks(book):
        peak = max(peak, eq)
        out.append((ts, eq, peak, 1 - eq / peak))
    return out


def test_equity_curve_daily_pnl_and_sharpe_views(hand_made):
    store = hand_made[0]
    for book in (A, B):
        where = f"origin = '{book[0]}' AND strategy_id = '{book[1]}' AND variant_id = '{book[2]}'"
        curve = view(store, "SELECT ts, equity, running_peak, drawdown FROM kpi_equity_curve "
                            f"WHERE {where} ORDER BY ts")
        exp = _curve(book)
        assert [(r["ts"], r["equity"]) for r in curve] == [(ts, eq) for ts, eq, _, _ in exp]
        assert [r["running_peak"] for r in curve] == [pk for _, _, pk, _ in exp]
        assert [r["drawdown"] for r in curve] == [approx(dd) for *_, dd in exp]

        days: dict = defaultdict(list)
        for ts, eq, _, dd in exp:
            days[ts.date()].append((eq, dd))
        exp_daily, prev_close, rets, dd_to_date = [], None, [], 0.0
        for day in sorted(days):
            eqs = days[day]
            open_eq = prev_close if prev_close is not None else eqs[0][0]
            close = eqs[-1][0]
            ret = close / open_eq - 1
            rets.append(ret)
            dd_day = max(dd for _, dd in eqs)
            dd_to_date = max(dd_to_date, dd_day)
            exp_daily.append({"day": day, "marks": len(eqs), "open_equity": open_eq, "close_equity": close,
                              "pnl": close - open_eq, "daily_return": ret, "max_drawdown": dd_day,
                              "max_drawdown_to_date": dd_to_date, "sharpe_30d": sharpe(rets[-30:], 365)})
            prev_close = close
        got = view(store, f"SELECT * EXCEPT (origin, strategy_id, variant_id) FROM kpi_daily_pnl WHERE {where} "
                          "ORDER BY day")
        assert len(got) == len(exp_daily) == (3 if book == A else 2)
        for g, e in zip(got, exp_daily):
            assert g == {k: approx(v) if isinstance(v, float) else v for k, v in e.items()}, book

        minutes: dict = {}
        for ts, eq, _, dd in exp:
            m = ts.replace(second=0, microsecond=0)
            minutes[m] = (eq, max(dd, minutes.get(m, (0, 0.0))[1]))
        ms = sorted(minutes)
        m_rets = [minutes[b][0] / minutes[a][0] - 1 for a, b in zip(ms, ms[1:])]
        (got,) = view(store, f"SELECT * FROM kpi_sharpe WHERE {where}")
        assert got["first_ts"] == ms[0] and got["last_ts"] == ms[-1]
        assert got["first_equity"] == minutes[ms[0]][0] and got["last_equity"] == minutes[ms[-1]][0]
        assert got["total_return"] == approx(minutes[ms[-1]][0] / minutes[ms[0]][0] - 1)
        assert got["max_drawdown"] == approx(max(dd for *_, dd in exp))
        assert got["minute_returns"] == len(m_rets)
        assert got["sharpe_minute"] == approx(sharpe(m_rets, 525_600))
        assert got["days"] == len(exp_daily)
        assert got["sharpe_daily"] == approx(sharpe([d["daily_return"] for d in exp_daily], 365))
    # book A's minute 10:00 has two marks: the later one (1010) is the minute's value
    assert view(store, "SELECT count() AS n FROM kpi_equity_curve WHERE variant_id = 'base'")[0]["n"] == 8


def _expected_closed_trades(decisions, fills):
    opens = {(d["origin"], d["strategy_id"], d["variant_id"], d["position_id"]): d for d in decisions
             if d["action"].startswith("open") and d["position_id"] > 0}
    by_pos: dict = defaultdict(list)
    seen = set()
    for f in fills:
        key = (f["origin"], f["strategy_id"], f["variant_id"], f["position_id"], f["ts"], f["reason"])
        if key not in seen:  # FINAL: one row per key
            seen.add(key)
            by_pos[key[:4]].append(f)
    trades = []
    for pos, fs in by_pos.items():
        exits = [f for f in fs if f["realised_pnl"] is not None]
        if not exits or pos not in opens:
            continue
        d, (x,) = opens[pos], exits
        fees = sum(f["fee"] for f in fs)
        trades.append({"book": pos[:3], "position_id": pos[3], "best_conf": d["best_conf"],
                       "decision_ts": d["ts"].replace(tzinfo=None), "symbol": d["symbol"],
                       "closed_at": x["ts"].replace(tzinfo=None), "fees": fees, "net_pnl": x["realised_pnl"],
                       "gross_pnl": x["realised_pnl"] + fees, "pnl_bps": x["pnl_bps"],
                       "traded_notional": sum(f["notional"] for f in fs)})
    for book in {t["book"] for t in trades}:
        ranked = sorted([t for t in trades if t["book"] == book and t["best_conf"] is not None],
                        key=lambda t: (t["best_conf"], t["decision_ts"], t["symbol"]))
        for t, dec in zip(ranked, ntile(len(ranked))):
            t["conf_decile"] = dec
        for t in trades:
            if t["book"] == book and t["best_conf"] is None:
                t["conf_decile"] = 0
    return trades


def test_closed_trades_deciles_fees_and_turnover_views(hand_made):
    store, decisions, fills, *_ = hand_made
    exp = _expected_closed_trades(decisions, fills)
    assert len(exp) == 11 + 1 + 2  # A: 1..11 and 13 (12 still open, 14 never filled), B: 1 and 2
    got = view(store, "SELECT * FROM kpi_closed_trades ORDER BY origin, variant_id, position_id")
    exp_sorted = sorted(exp, key=lambda t: (t["book"][0], t["book"][2], t["position_id"]))
    assert [(g["origin"], g["variant_id"], g["position_id"]) for g in got] == \
           [(t["book"][0], t["book"][2], t["position_id"]) for t in exp_sorted]
    for g, e in zip(got, exp_sorted):
        for k in ("best_conf", "conf_decile", "closed_at", "fees", "net_pnl", "gross_pnl", "pnl_bps",
                  "traded_notional"):
            assert g[k] == (approx(e[k]) if isinstance(e[k], float) else e[k]), (e["position_id"], k)
        assert g["win"] == (e["net_pnl"] > 0)
    a_deciles = [g["conf_decile"] for g in got if g["variant_id"] == "base"]
    assert sorted(a_deciles) == [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # 11 ranked trades: the first decile holds 2

    groups: dict = defaultdict(list)
    for t in exp:
        groups[(t["book"], t["conf_decile"])].append(t)
    got = view(store, "SELECT * FROM kpi_confidence_deciles")
    assert len(got) == len(groups)
    for g in got:
        ts = groups[((g["origin"], g["strategy_id"], g["variant_id"]), g["conf_decile"])]
        wins = sum(t["net_pnl"] > 0 for t in ts)
        assert (g["trades"], g["wins"]) == (len(ts), wins)
        assert g["hit_rate"] == approx(wins / len(ts))
        assert g["avg_pnl"] == approx(sum(t["net_pnl"] for t in ts) / len(ts))
        assert g["avg_pnl_bps"] == approx(sum(t["pnl_bps"] for t in ts) / len(ts))
        assert g["total_pnl"] == approx(sum(t["net_pnl"] for t in ts))
        confs = [t["best_conf"] for t in ts]
        assert (g["conf_lo"], g["conf_hi"]) == ((min(confs), max(confs)) if confs[0] is not None else (None, None))

    def fee_kpis(ts):
        gross, fees = sum(t["gross_pnl"] for t in ts), sum(t["fees"] for t in ts)
        return {"trades": len(ts), "total_gross_pnl": approx(gross), "total_fees": approx(fees),
                "total_net_pnl": approx(sum(t["net_pnl"] for t in ts)),
                "fee_share": approx(fees / gross) if gross > 0 else None,
                "fee_share_abs": approx(fees / sum(abs(t["gross_pnl"]) for t in ts))}

    by_day: dict = defaultdict(list)
    by_book: dict = defaultdict(list)
    for t in exp:
        by_day[(t["book"], t["closed_at"].date())].append(t)
        by_book[t["book"]].append(t)
    got = view(store, "SELECT * FROM kpi_fees_daily")
    assert len(got) == len(by_day)
    assert any(g["fee_share"] is None for g in got) and any(g["fee_share"] is not None for g in got)
    for g in got:
        key = ((g.pop("origin"), g.pop("strategy_id"), g.pop("variant_id")), g.pop("day"))
        assert g == fee_kpis(by_day[key]), key
    got = view(store, "SELECT * FROM kpi_fees")
    assert len(got) == 2
    for g in got:
        key = (g.pop("origin"), g.pop("strategy_id"), g.pop("variant_id"))
        assert g == fee_kpis(by_book[key]), key

    # turnover: traded notional of the day's fills / the day's average equity mark (days with marks)
    fill_days: dict = defaultdict(lambda: [0, 0.0])
    seen = set()
    for f in fills:
        key = (f["origin"], f["strategy_id"], f["variant_id"], f["position_id"], f["ts"], f["reason"])
        if key not in seen:
            seen.add(key)
            acc = fill_days[((f["origin"], f["strategy_id"], f["variant_id"]), f["ts"].date())]
            acc[0] += 1
            acc[1] += f["notional"]
    exp_turnover = {}
    for book in (A, B):
        eq_days: dict = defaultdict(list)
        for ts, eq in _marks(book):
            eq_days[ts.date()].append(eq)
        for day, eqs in eq_days.items():
            n, notional = fill_days.get((book, day), (0, 0.0))
            avg = sum(eqs) / len(eqs)
            exp_turnover[(book, day)] = {"avg_equity": approx(avg), "fills": n, "traded_notional": approx(notional),
                                         "turnover": approx(notional / avg)}
    got = view(store, "SELECT * FROM kpi_turnover_daily")
    assert len(got) == len(exp_turnover) == 5
    for g in got:
        key = ((g.pop("origin"), g.pop("strategy_id"), g.pop("variant_id")), g.pop("day"))
        assert g == exp_turnover[key], key
    assert sum(g["fills"] == 0 for g in view(store, "SELECT fills FROM kpi_turnover_daily")) == 1  # B, day 2


def test_veto_arm_selection_and_decision_latency_views(hand_made):
    store, decisions, *_ = hand_made
    decs = decisions  # the replayed duplicate was a separate insert: FINAL makes it one row
    per_day: dict = defaultdict(int)
    veto: dict = defaultdict(int)
    shadow: dict = defaultdict(int)
    for d in decs:
        book, day = (d["origin"], d["strategy_id"], d["variant_id"]), d["ts"].date()
        per_day[(book, day)] += 1
        for r in set(d["vetoes"]):
            veto[(book, day, r)] += 1
        for r in set(d["shadow_vetoes"]):
            shadow[(book, day, r)] += 1
    for name, exp in (("kpi_veto_frequency", veto), ("kpi_shadow_veto_frequency", shadow)):
        got = view(store, f"SELECT * FROM {name}")
        assert len(got) == len(exp) > 0, name
        for g in got:
            key = ((g["origin"], g["strategy_id"], g["variant_id"]), g["day"], g["reason"])
            n, total = exp[key], per_day[key[:2]]
            assert (g["vetoed"], g["decisions"], g["share"]) == (n, total, approx(n / total)), (name, key)
    assert veto[(A, date(2024, 1, 1), "low_conf_veto")] == 1  # a reason twice in one decision counts once

    arms: dict = defaultdict(lambda: [0, 0])
    for d in decs:
        if d["arm"]:
            hour = d["ts"].replace(minute=0, second=0, microsecond=0, tzinfo=None)
            acc = arms[((d["origin"], d["strategy_id"], d["variant_id"]), hour, d["arm"])]
            acc[0] += 1
            acc[1] += d["action"].startswith("open")
    opened_in_hour: dict = defaultdict(int)
    for (book, hour, _), (_, o) in arms.items():
        opened_in_hour[(book, hour)] += o
    got = view(store, "SELECT * FROM kpi_arm_selection")
    assert len(got) == len(arms)
    for g in got:
        key = ((g["origin"], g["strategy_id"], g["variant_id"]), g["hour"], g["arm"])
        sel, opened = arms[key]
        total = opened_in_hour[key[:2]]
        assert (g["selected"], g["opened"]) == (sel, opened), key
        assert g["open_share"] == (approx(opened / total) if total else None), key
    assert any(g["open_share"] is None for g in got)  # an hour where the pick was blocked

    lat: dict = defaultdict(list)
    for d in decs:
        hour = d["ts"].replace(minute=0, second=0, microsecond=0, tzinfo=None)
        lat[((d["origin"], d["strategy_id"], d["variant_id"]), hour)].append(d["latency_ms"])
    got = view(store, "SELECT * FROM kpi_decision_latency")
    assert len(got) == len(lat)
    for g in got:
        xs = lat[((g["origin"], g["strategy_id"], g["variant_id"]), g["hour"])]
        assert g["decisions"] == len(xs)
        for col, q in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
            assert g[col] == approx(float(np.percentile(xs, q))), col
        assert g["max_ms"] == max(xs)
    assert max(len(x) for x in lat.values()) >= 2  # some hour has more than one decision to interpolate


def _outcomes(preds, labels):
    lab = {l["start"]: l["label"] for l in labels}
    out = []
    for p in preds:
        if p["start"] not in lab:
            continue
        y = lab[p["start"]]
        probs = (p["p_down"], p["p_flat"], p["p_up"])
        if p["p_up"] >= p["p_down"] and p["p_up"] >= p["p_flat"]:
            predicted = 2
        else:
            predicted = 0 if p["p_down"] >= p["p_flat"] else 1
        out.append({**p, "label": y, "predicted": predicted, "p_true": probs[y],
                    "brier": sum((probs[c] - (y == c)) ** 2 for c in range(3))})
    return out


def test_calibration_and_reliability_views(hand_made):
    store, _, _, preds, labels = hand_made
    outs = _outcomes(preds, labels)
    assert len(outs) == 12  # 2 models x 6 matured bars; the label inserted twice counts once

    def kpis(rows):
        n = len(rows)
        return {"n": n, "brier": approx(sum(r["brier"] for r in rows) / n),
                "accuracy": approx(sum(r["predicted"] == r["label"] for r in rows) / n),
                "log_loss": approx(sum(-math.log(max(r["p_true"], 1e-15)) for r in rows) / n),
                "mean_confidence": approx(sum(r["confidence"] for r in rows) / n)}

    got = view(store, "SELECT * EXCEPT (first_start, last_start) FROM kpi_calibration ORDER BY model")
    assert [g.pop("model") for g in got] == ["m_a", "m_b"]
    for g, model in zip(got, ["m_a", "m_b"]):
        assert g.pop("tf") == "5m"
        assert g == kpis([o for o in outs if o["model"] == model])
    got = view(store, "SELECT * FROM kpi_calibration_daily ORDER BY model, day")
    assert [(g["model"], g["day"]) for g in got] == [(m, d) for m in ("m_a", "m_b")
                                                      for d in (date(2024, 1, 1), date(2024, 1, 2))]
    for g in got:
        rows = [o for o in outs if o["model"] == g["model"] and o["start"].date() == g["day"]]
        assert {k: g[k] for k in ("n", "brier", "accuracy", "log_loss", "mean_confidence")} == kpis(rows)

    bins: dict = defaultdict(list)
    for o in outs:
        for c, name in enumerate(("down", "flat", "up")):
            p = (o["p_down"], o["p_flat"], o["p_up"])[c]
            b = min(int(math.floor(p * 10)), 9)
            for cls in (name, "all"):
                bins[(o["model"], cls, b)].append((p, float(o["label"] == c)))
    got = view(store, "SELECT * FROM kpi_reliability")
    assert len(got) == len(bins)
    for g in got:
        xs = bins[(g["model"], g["class"], g["bin"])]
        assert g["tf"] == "5m" and g["n"] == len(xs) and g["bin_lo"] == approx(g["bin"] / 10)
        assert g["mean_predicted"] == approx(sum(p for p, _ in xs) / len(xs))
        assert g["observed_freq"] == approx(sum(h for _, h in xs) / len(xs))
    top = [g for g in got if (g["model"], g["class"], g["bin"]) == ("m_a", "up", 9)]
    assert top and top[0]["mean_predicted"] >= 0.9  # p_up = 1.0 falls into the last bin
    assert sum(g["n"] for g in got if g["class"] == "all") == 3 * len(outs)


def test_pipeline_health_throughput_and_dead_letter_views(hand_made):
    store = hand_made[0]
    minutes: dict = defaultdict(lambda: defaultdict(list))
    for r in HEALTH:
        row = dict(zip(HEALTH_COLS, r))
        m = row["ts"].replace(second=0, microsecond=0, tzinfo=None)
        minutes[m][(row["process"], row["worker"])].append(row)

    def mx(xs):
        xs = [x for x in xs if x is not None]
        return max(xs) if xs else None

    got = view(store, "SELECT * FROM kpi_pipeline_health ORDER BY minute")
    assert [g["minute"] for g in got] == sorted(minutes)
    for g in got:
        workers = minutes[g["minute"]]
        total = lambda c: sum(r[c] for rows in workers.values() for r in rows)  # noqa: E731
        trades, late, dead = total("trades_in"), total("late_trades"), total("dead_letters")
        every = [r for rows in workers.values() for r in rows]
        assert g["workers"] == len(workers)
        assert (g["trades"], g["late_trades"], g["dead_letters"]) == (trades, late, dead)
        assert g["duplicates"] == total("duplicates") and g["decisions"] == total("decisions")
        assert g["bars"] == total("bars")
        assert g["trades_per_s"] == approx(sum(sum(r["trades_per_s"] for r in rows) / len(rows)
                                               for rows in workers.values()))
        assert g["late_rate"] == approx(late / (trades + late))
        assert g["dead_letter_rate"] == approx(dead / (trades + late + dead))
        assert g["watermark_lag_ms"] == mx(r["watermark_lag_ms"] for r in every)
        for c in ("decision_p50_ms", "decision_p95_ms", "decision_p99_ms"):
            assert g[c] == mx(r[c] for r in every), c
        assert g["rss_mb"] == approx(sum(max(r["rss_mb"] for r in rows) for rows in workers.values()))
    assert got[0]["workers"] == 2 and got[0]["trades_per_s"] == approx(30.0 + 5.0)

    h = datetime(2024, 1, 1, 1)
    got = view(store, "SELECT exchange, symbol, minute, trades, trades_per_s, late, late_rate FROM kpi_throughput "
                      "ORDER BY symbol, minute")
    assert [tuple(g.values()) for g in got] == [
        ("x", "BTC", h, 120, approx(2.0), 2, approx(2 / 122)),
        ("x", "BTC", h + timedelta(minutes=1), 60, approx(1.0), 0, 0.0),
        ("x", "ETH", h, 30, approx(0.5), 0, 0.0),
        ("x", "ETH", h + timedelta(minutes=5), 0, 0.0, 1, 1.0),  # a late trade in a minute without a bar
    ]
    got = view(store, "SELECT * FROM kpi_dead_letters ORDER BY minute, reason")
    assert [tuple(g.values()) for g in got] == [(h, "k", "bad_json", 2), (h + timedelta(minutes=1), "k",
                                                                          "missing_field", 1)]
