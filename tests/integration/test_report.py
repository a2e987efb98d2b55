"""The daily report (issue 7, acceptance 4): a demo day produced by the real pipeline on a synthetic
tape, rendered to markdown + PNG charts, and its numbers checked against SQL written here
independently of cli/report.py. Also the optional LLM summary against a loopback
OpenAI-compatible endpoint: only aggregates are sent, and a failing endpoint leaves the report
without a summary."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from datetime import date
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from cli.llm import LlmConfig, llm_request
from cli.report import SECTIONS, write_report
from cli.report_data import aggregates
from dataflows import logs
from models.calibration import classwise_ece
from sinks.store import Store
from tests.helpers import frame_batches, run_pipeline, settings, synthetic_tape

DAY = date(2024, 1, 1)
SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT"]
LOOSE = {"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": False,
         "consensus_enabled": False, "max_drawdown": 0.0006}  # a tight kill switch trips during the day
ON_DAY = "origin = 'production' AND toDate(ts, 'UTC') = toDate('2024-01-01')"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(chdb_dsn, tmp_path_factory):
    """12 hours of 2 symbols from 2024-01-01T00:00Z through the real pipeline."""
    tmp = tmp_path_factory.mktemp("demo")
    store = Store(chdb_dsn, "t_" + uuid.uuid4().hex[:12])
    cfg = settings(tmp, online_warmup_labels=10, strategy=LOOSE)
    run_pipeline(frame_batches(synthetic_tape(SYMBOLS, 12 * 60, rate=0.5), 5_000), store, cfg)
    yield store
    store.close()


@pytest.fixture(scope="module")
def report(demo, tmp_path_factory) -> tuple[Path, str]:
    path = write_report(demo, DAY, tmp_path_factory.mktemp("report"))
    return path, path.read_text()


def one(store: Store, sql: str) -> tuple:
    return store.query(sql)[1][0]


def section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, re.M | re.S)
    assert m, f"section {title!r} missing"
    return m.group(1)


def table(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return rows[2:]  # header and separator


def stat(md: str, what: str) -> str:
    return {r[0]: r[1] for r in table(section(md, "Trades"))}[what]


# -- the demo day ---------------------------------------------------------------------------------

def test_the_report_has_every_section_and_valid_charts(report):
    path, md = report
    assert path.name == "report-2024-01-01.md" and path.exists()
    for title in SECTIONS:
        assert f"\n## {title}\n" in md
    charts = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(charts) == ["report-2024-01-01-equity.png", "report-2024-01-01-pnl.png"]
    import matplotlib.image as mpimg

    for name in charts:
        png = path.parent / name
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 400 and height >= 200
        pixels = mpimg.imread(png)  # decodes the whole file
        assert pixels.shape[:2] == (height, width) and pixels.std() > 0  # not a blank image


def test_trade_counts_and_pnl_match_sql(demo, report):
    _, md = report
    trades, wins, losses, best, worst, pnl = one(demo, (
        "SELECT count(), sum(realised_pnl > 0), sum(realised_pnl <= 0), max(realised_pnl), min(realised_pnl), "
        f"sum(realised_pnl) FROM fills FINAL WHERE realised_pnl IS NOT NULL AND {ON_DAY}"))
    assert trades >= 10 and wins >= 1 and losses >= 1, "the demo day should trade both ways"
    assert int(stat(md, "closed trades")) == trades
    assert int(stat(md, "wins")) == wins
    assert int(stat(md, "losses")) == losses
    assert stat(md, "win rate") == f"{wins / trades:.1%}"
    assert float(stat(md, "realised PnL (net of fees)").replace(",", "")) == pytest.approx(pnl, abs=5e-5)
    listed = table(section(md, "Closed trades"))
    assert len(listed) == trades
    assert sorted(float(r[-1]) for r in listed) == pytest.approx(
        sorted(r[0] for r in demo.query(f"SELECT realised_pnl FROM fills FINAL WHERE realised_pnl IS NOT NULL "
                                        f"AND {ON_DAY}")[1]), abs=5e-5)

    rows = {r[0]: r for r in table(section(md, "Best and worst trade"))}
    for which, value in (("best", best), ("worst", worst)):
        pid, symbol = one(demo, f"SELECT position_id, symbol FROM fills FINAL WHERE realised_pnl = {value!r} "
                                f"AND {ON_DAY}")
        entry, exit_ = one(demo, (
            "SELECT minIf(ts, reason = 'entry'), maxIf(ts, realised_pnl IS NOT NULL) FROM fills FINAL "
            f"WHERE origin = 'production' AND position_id = {pid}"))
        assert float(rows[which][6]) == pytest.approx(value, abs=5e-5)
        assert rows[which][1] == f"x:{symbol}"
        assert rows[which][3] == entry.strftime("%Y-%m-%d %H:%M") and rows[which][4] == exit_.strftime("%Y-%m-%d %H:%M")


def test_vetoes_by_reason_match_sql(demo, report):
    _, md = report
    expected = dict(demo.query(
        f"SELECT v, count() FROM (SELECT arrayJoin(vetoes) AS v FROM decisions FINAL WHERE {ON_DAY}) GROUP BY v")[1])
    assert len(expected) >= 3 and "drawdown_limit" in expected  # the kill switch blocked entries
    got = {r[0]: int(r[1]) for r in table(section(md, "Vetoes by reason"))}
    assert got == expected


def test_low_confidence_entries_match_sql(demo, report):
    _, md = report
    entries = one(demo, f"SELECT count() FROM fills FINAL WHERE reason = 'entry' AND {ON_DAY}")[0]
    low = demo.query(
        "SELECT position_id FROM fills FINAL WHERE reason = 'entry' AND " + ON_DAY +
        " AND position_id IN (SELECT position_id FROM decisions FINAL WHERE origin = 'production'"
        " AND action LIKE 'open_%' AND best_conf < 0.6) ORDER BY position_id")[1]
    low_ids = [r[0] for r in low]
    assert 0 < len(low_ids) < entries, "the demo day should have entries on both sides of the threshold"
    text = section(md, "Low-confidence entries")
    assert f"below 0.60: **{len(low_ids)}** of {entries} entries" in text
    assert sorted(int(r[0]) for r in table(text)) == low_ids
    assert all(float(r[5]) < 0.6 for r in table(text))


def test_kill_switch_and_model_quality_match_sql(demo, report):
    _, md = report
    trips = one(demo, "SELECT count() FROM events FINAL WHERE kind = 'kill_switch' "
                      "AND toDate(ts, 'UTC') = toDate('2024-01-01')")[0]
    assert trips == 1
    text = section(md, "Kill switch and risk guards")
    assert f"Kill-switch trips: **{trips}**" in text
    assert [r[1] for r in table(text)].count("kill_switch") == trips

    # model quality from the base tables, computed here in numpy (not through prediction_outcomes)
    preds = demo.query("SELECT exchange, symbol, start, model, p_down, p_flat, p_up, raw_down, raw_flat, raw_up "
                       "FROM predictions FINAL WHERE toDate(start, 'UTC') = toDate('2024-01-01')")[1]
    labels = {(e, s, t): lab for e, s, t, lab in demo.query(
        "SELECT exchange, symbol, start, label FROM labels FINAL WHERE tf = '5m'")[1]}
    by_model: dict = {}
    raws: dict = {}
    for e, s, t, m, pd_, pf, pu, rd, rf, ru in preds:
        if (e, s, t) in labels:
            by_model.setdefault(m, []).append(([pd_, pf, pu], labels[(e, s, t)]))
            raws.setdefault(m, []).append(([rd, rf, ru], labels[(e, s, t)]))
    assert by_model, "the demo day should have scored predictions with matured labels"
    rows = {r[0]: r for r in table(section(md, "Model quality"))}
    assert set(rows) == set(by_model)
    for m, pairs in by_model.items():
        p = np.array([x for x, _ in pairs])
        y = np.array([lab for _, lab in pairs])
        onehot = np.eye(3)[y]
        # predicted class: ties go up > down > flat, as in the view
        pred = np.where((p[:, 2] >= p[:, 0]) & (p[:, 2] >= p[:, 1]), 2, np.where(p[:, 0] >= p[:, 1], 0, 1))
        assert int(rows[m][1]) == len(y)
        assert float(rows[m][2]) == pytest.approx((pred == y).mean(), abs=5e-4)
        assert float(rows[m][3]) == pytest.approx(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-15)).mean(), abs=5e-5)
        assert float(rows[m][4]) == pytest.approx(((p - onehot) ** 2).sum(axis=1).mean(), abs=5e-5)
        assert float(rows[m][5]) == pytest.approx(classwise_ece(p, y), abs=5e-4)  # calibration (issue 12)
        raw = np.array([r for r, _ in raws[m]])
        assert float(rows[m][6]) == pytest.approx(classwise_ece(raw, y), abs=5e-4)


def test_aggregates_are_numbers_from_sql_and_no_rows(demo):
    agg = aggregates(demo, DAY)
    trades, wins, pnl, best, worst = one(demo, (
        "SELECT count(), sum(realised_pnl > 0), sum(realised_pnl), max(realised_pnl), min(realised_pnl) "
        f"FROM fills FINAL WHERE realised_pnl IS NOT NULL AND {ON_DAY}"))
    assert (agg["trades"], agg["wins"], agg["losses"]) == (trades, wins, trades - wins)
    assert agg["realised_pnl"] == pytest.approx(pnl, abs=1e-6) and agg["best_trade_pnl"] == pytest.approx(best, abs=1e-6)
    assert agg["worst_trade_pnl"] == pytest.approx(worst, abs=1e-6) and agg["kill_switch_trips"] == 1
    fees = one(demo, f"SELECT sum(fee) FROM fills FINAL WHERE {ON_DAY}")[0]
    assert agg["fees"] == pytest.approx(fees, abs=1e-6)
    # nothing that identifies a trade: no symbol, no timestamp, no position id, no raw row
    blob = json.dumps(agg)
    for word in ("BTC", "ETH", "USDT", "position", "T00:", "2024-01-01 ", "entry_ts", "exit_ts"):
        assert word not in blob
    flat = list(_leaves(agg))
    assert all(isinstance(v, (int, float, type(None))) for k, v in flat if k not in ("day", "strategy"))


def _assert_close(a, b, path="aggregates"):
    """Equal, except floats within 1e-6 (a parallel sum may add in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, k)
        else:
            yield (prefix or k), v


def test_a_day_without_data_explains_each_section(demo, tmp_path):
    md = write_report(demo, date(2024, 1, 2), tmp_path).read_text()
    assert "No trade closed on 2024-01-02" in section(md, "Trades")
    assert "no best or worst trade" in section(md, "Best and worst trade")
    assert "No equity mark" in section(md, "Equity")
    assert "No position was opened" in section(md, "Low-confidence entries")
    assert "No veto on this day" in section(md, "Vetoes by reason")
    assert "No kill-switch trip" in section(md, "Kill switch and risk guards")
    assert "nothing to score" in section(md, "Model quality")
    assert not list(tmp_path.glob("*.png"))


def test_other_strategy_filter_finds_nothing(demo, tmp_path):
    agg = aggregates(demo, DAY, strategy="experimental")
    assert agg["trades"] == 0 and agg["decisions"] == 0 and agg["vetoes_by_reason"] == {}
    assert aggregates(demo, DAY, strategy="ensemble")["trades"] == aggregates(demo, DAY)["trades"] > 0


# -- the optional LLM summary -----------------------------------------------------------------

class _Endpoint:
    """A loopback OpenAI-compatible /chat/completions endpoint that records what it receives."""

    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                             "content": "A quiet losing day."}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


KEY = "sk-test-" + uuid.uuid4().hex


def test_llm_is_off_unless_configured():
    assert LlmConfig.from_env({}) is None
    assert LlmConfig.from_env({"TAPEFLOW_LLM_MODEL": "m", "TAPEFLOW_LLM_API_KEY": KEY}) is None
    with pytest.raises(ValueError, match="TAPEFLOW_LLM_MODEL"):
        LlmConfig.from_env({"TAPEFLOW_LLM_BASE_URL": "http://127.0.0.1:9/v1"})
    cfg = LlmConfig.from_env({"TAPEFLOW_LLM_BASE_URL": "http://127.0.0.1:9/v1", "TAPEFLOW_LLM_MODEL": "m",
                              "TAPEFLOW_LLM_API_KEY": KEY, "TAPEFLOW_LLM_TIMEOUT_S": "2.5"})
    assert (cfg.model, cfg.timeout_s) == ("m", 2.5) and KEY not in repr(cfg)
    assert KEY in logs.registered_secrets()
    with_creds = LlmConfig.from_env({"TAPEFLOW_LLM_BASE_URL": "https://me:url-pw-123@llm.example/v1/",
                                     "TAPEFLOW_LLM_MODEL": "m"})
    url, headers, _ = llm_request(with_creds, {"trades": 1})
    assert url == "https://llm.example/v1/chat/completions" and "Authorization" not in headers
    assert "url-pw-123" in logs.registered_secrets()


def test_llm_summary_gets_only_the_aggregates(demo, tmp_path):
    with _Endpoint() as ep:
        cfg = LlmConfig.from_env({"TAPEFLOW_LLM_BASE_URL": ep.url, "TAPEFLOW_LLM_MODEL": "tiny",
                                  "TAPEFLOW_LLM_API_KEY": KEY, "TAPEFLOW_LLM_TIMEOUT_S": "10"})
        md = write_report(demo, DAY, tmp_path, llm=cfg).read_text()
    assert "## Summary\n\nA quiet losing day." in md
    [req] = ep.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "tiny" and [m["role"] for m in body["messages"]] == ["system", "user"]
    sent = json.loads(body["messages"][1]["content"])
    _assert_close(sent, json.loads(json.dumps(aggregates(demo, DAY))))
    assert not re.search(r"BTC|ETH|USDT|position_id|\d{2}:\d{2}", json.dumps(body))


@pytest.mark.parametrize("broken", ["http_500", "unreachable"])
def test_llm_failure_is_logged_and_the_report_is_written_without_summary(demo, tmp_path, caplog, broken):
    caplog.set_level(logging.WARNING, logger="tapeflow.report")
    env = {"TAPEFLOW_LLM_MODEL": "tiny", "TAPEFLOW_LLM_API_KEY": KEY, "TAPEFLOW_LLM_TIMEOUT_S": "5"}
    if broken == "http_500":
        with _Endpoint(status=500) as ep:
            path = write_report(demo, DAY, tmp_path, llm=LlmConfig.from_env({**env, "TAPEFLOW_LLM_BASE_URL": ep.url}))
        assert len(ep.requests) == 1
    else:
        path = write_report(demo, DAY, tmp_path,
                            llm=LlmConfig.from_env({**env, "TAPEFLOW_LLM_BASE_URL": "http://127.0.0.1:9/v1"}))
    md = path.read_text()
    assert "## Summary" not in md and "could not be produced" in md
    for title in SECTIONS:
        assert f"\n## {title}\n" in md
    failures = [r for r in caplog.records if "LLM summary failed" in r.getMessage()]
    assert len(failures) == 1 and KEY not in failures[0].getMessage()
