"""Secrets never reach logs or tables (issue 7, acceptance 5).

A known secret is planted in the environment (API keys of an exchange and of the LLM endpoint) and
in the config file (the ClickHouse DSN, a ``SecretStr`` setting, carries it as a password query
parameter, which the embedded engine ignores). The whole job runs as a user runs it, with verbose
logging; then every line it printed (stdout and stderr), every file it wrote under its data dir, and
every column of every table of the store are searched for the secret. The daily report runs too,
with an LLM endpoint whose URL and API key carry the secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

SECRET = "tfPlanted" + uuid.uuid4().hex  # letters and digits only: the same in URLs, JSON and SQL
LOG_KEYS = {"ts", "level", "logger", "msg"}
WINDOW = 12  # any 12 characters of the secret count as a leak (a table cell may wrap it over lines)


def leaked(text: str | bytes) -> list[str]:
    """Pieces of the secret found in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [SECRET[i:i + WINDOW] for i in range(len(SECRET) - WINDOW + 1) if SECRET[i:i + WINDOW] in text]


def tapeflow(*args: str, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, f"tapeflow {' '.join(args)[:300]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def test_a_planted_secret_reaches_no_log_line_and_no_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPEFLOW_")}
    env.update(TAPEFLOW_BINANCEUSDM_API_KEY=SECRET, TAPEFLOW_BINANCEUSDM_SECRET=SECRET,
               TAPEFLOW_LLM_API_KEY=SECRET)
    store_dir = tmp_path / "store"
    config = tmp_path / "tapeflow.toml"
    config.write_text(
        f'clickhouse_dsn = "chdb://{store_dir}?password={SECRET}"\n'
        "online_warmup_labels = 10\n"
        "[strategy]\n"
        "conf_min = 0.4\nalpha_min = 0.02\nno_trade_conf = 0.35\nrequire_warm = false\nconsensus_enabled = false\n")
    data_dir = tmp_path / "data"
    run = tapeflow("-v", "--config", str(config), "run", "--hours", "3", "--rate", "1", "--train-split", "0",
                   "--data-dir", str(data_dir), "--quiet", "--summary-json", str(data_dir / "summary.json"),
                   env=env)

    # the job ran against the store named in the config (so the secret-carrying DSN was used)
    assert "trades in" in run.stdout
    assert any(store_dir.iterdir()), "the store of the config's DSN is empty"

    # logs: JSON lines (setup_logging is wired into the CLI), none with the secret
    log_lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert log_lines, "verbose run logged nothing"
    for line in log_lines:
        rec = json.loads(line)
        assert LOG_KEYS <= set(rec), line
    assert leaked(run.stdout) == [], run.stdout
    assert leaked(run.stderr) == [], run.stderr

    # the daily report, with an LLM endpoint configured whose URL and key carry the secret; the
    # endpoint is unreachable, so the failure is logged (and the report written without a summary)
    llm_env = {**env, "TAPEFLOW_LLM_BASE_URL": f"http://tapeflow:{SECRET}@127.0.0.1:9/v1",
               "TAPEFLOW_LLM_MODEL": "any", "TAPEFLOW_LLM_TIMEOUT_S": "5"}
    rep = tapeflow("-v", "--config", str(config), "report", "--day", "2024-01-01", "--data-dir", str(data_dir),
                   env=llm_env)
    assert leaked(rep.stdout) == [] and leaked(rep.stderr) == [], rep.stdout + rep.stderr
    warnings = [json.loads(line) for line in rep.stderr.splitlines() if line.strip()]
    assert any("LLM summary failed" in w["msg"] for w in warnings), rep.stderr
    reports = list((data_dir / "reports").glob("report-2024-01-01*"))
    assert len(reports) == 3  # markdown + equity chart + PnL chart

    # files the job wrote under its data dir (run directory, summary, report)
    written = [p for p in data_dir.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert leaked(p.read_bytes()) == [], f"secret found in {p}"

    # every column of every table of every non-system database, compared as text; the secret is
    # spelled as unhex(...) so the query text itself does not contain it
    def sql(query: str) -> list[dict]:
        res = tapeflow("--config", str(config), "sql", "--format", "json", query, env=env)
        assert leaked(res.stdout) == [] and leaked(res.stderr) == []
        return json.loads(res.stdout)

    columns = sql("SELECT c.database AS db, c.table AS tbl, c.name AS col FROM system.columns AS c "
                  "INNER JOIN system.tables AS t ON c.database = t.database AND c.table = t.name "
                  "WHERE c.database NOT IN ('system', 'INFORMATION_SCHEMA', 'information_schema') "
                  "AND t.engine NOT LIKE '%View%' ORDER BY db, tbl, col")
    tables: dict = {}
    for c in columns:
        tables.setdefault((c["db"], c["tbl"]), []).append(c["col"])
    assert {"bars", "decisions", "fills", "events", "predictions", "equity"} <= {t for _, t in tables}
    needle = f"unhex('{SECRET.encode().hex()}')"
    parts = []
    for (db, tbl), cols in sorted(tables.items()):
        texts = ", ".join(f"toString(`{c}`)" for c in cols)
        parts.append(f"SELECT '{db}.{tbl}' AS table__, count() AS rows__, "
                     f"countIf(arrayExists(x -> position(x, {needle}) > 0, [{texts}])) AS hits__ "
                     f"FROM `{db}`.`{tbl}`")
    found = {r["table__"]: r for r in sql(" UNION ALL ".join(parts))}
    assert len(found) == len(tables)
    for t in ("bars", "decisions", "fills", "predictions", "equity"):
        assert found[f"tapeflow.{t}"]["rows__"] > 0, f"no {t} rows: the job did not exercise that table"
    assert {t: r["hits__"] for t, r in found.items() if r["hits__"]} == {}
