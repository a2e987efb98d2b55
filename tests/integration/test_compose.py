"""docker-compose.yml: valid (`docker-compose config`), and every tapeflow service's command is run
here, as written, against a loopback broker and an embedded store (no Docker engine needed).

Only what a test cannot provide is adjusted: container paths become temporary directories, the
live exchanges become scripted venues, and the long-running services get a bound (--duration,
--eof) so they end.
"""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from tests.integration.test_kafka_pipeline import sql

ROOT = Path(__file__).resolve().parents[2]
TAPEFLOW_SERVICES = {"topics", "ingest", "replay", "pipeline", "trainer"}


def compose_config(profiles: str) -> dict:
    exe = shutil.which("docker-compose")
    assert exe, ("docker-compose not found: `./tapeflow test` installs Debian's docker-compose on first use "
                 "(apt-get); install it by hand if that was not possible")
    env = {**os.environ, "CLICKHOUSE_PASSWORD": "test-pw", "GRAFANA_PASSWORD": "test-pw",
           "COMPOSE_PROFILES": profiles}
    res = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_compose_config_is_valid_and_wires_the_stack():
    cfg = compose_config("live")
    svc = cfg["services"]
    assert {"kafka", "clickhouse", "grafana", "topics", "ingest", "replay", "pipeline", "trainer"} <= set(svc)
    assert svc["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    for name in ("kafka", "clickhouse", "grafana", "ingest", "pipeline"):
        assert "healthcheck" in svc[name], name
    for name in ("kafka", "clickhouse", "grafana", "ingest", "pipeline"):
        assert svc[name]["restart"] == "unless-stopped", name
    assert svc["ingest"]["profiles"] == ["live"] and svc["replay"]["profiles"] == ["offline"]
    assert any("/data" in str(v) for v in svc["pipeline"]["volumes"])  # recovery survives restarts
    cmd = svc["pipeline"]["command"]
    assert cmd[cmd.index("--recovery-dir") + 1].startswith("/data/")
    # secrets come from the environment, never from the file
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / ".env").read_text()
    assert "test-pw" not in text
    assert svc["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"] == "test-pw"
    # the trainer retrains on a schedule into the pipeline's artifacts (same volume, same store)
    trainer = svc["trainer"]
    assert trainer["command"][:3] == ["train", "--every", "24h"] and trainer["restart"] == "unless-stopped"
    assert trainer["volumes"] == svc["pipeline"]["volumes"] == ["pipeline:/data:rw"]
    assert trainer["environment"]["TAPEFLOW_CLICKHOUSE_DSN"] == svc["pipeline"]["environment"]["TAPEFLOW_CLICKHOUSE_DSN"]


def _command(cfg: dict, service: str) -> list[str]:
    s = cfg["services"][service]
    assert s["image"] == "tapeflow:latest" and s["build"]["dockerfile"] == "infra/docker/Dockerfile"
    return [str(a) for a in s["command"]]


def _localise(args: list[str], tmp: Path, sample: Path) -> list[str]:
    out = []
    for a in args:
        if a == "/samples/demo.parquet":
            a = str(sample)
        elif a.startswith("/data"):
            a = str(tmp / "data") + a[len("/data"):]
        out.append(a)
    return out


def run_service(args: list[str], env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, f"tapeflow {args}:\n{res.stdout}\n{res.stderr}"
    return res


def test_every_tapeflow_service_command_runs(kafka_broker, tmp_path):
    cfg = compose_config("live")
    assert {n for n, s in cfg["services"].items() if s.get("image") == "tapeflow:latest"} == TAPEFLOW_SERVICES
    topic = f"trades-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TAPEFLOW_KAFKA_BROKERS": kafka_broker, "TAPEFLOW_KAFKA_TOPIC": topic,
           "TAPEFLOW_KAFKA_PARTITIONS": "3", "TAPEFLOW_DATA_DIR": str(tmp_path / "data")}
    env.pop("TAPEFLOW_CLICKHOUSE_DSN", None)  # embedded store under the data dir
    sample = tmp_path / "demo.parquet"
    run_service(["tape", "synthetic", "--hours", "0.05", "--out", str(sample)], env)  # as the Dockerfile does

    assert "created" in run_service(_command(cfg, "topics"), env).stdout
    replay = run_service(_localise(_command(cfg, "replay"), tmp_path, sample), env)
    assert "published" in replay.stdout
    ingest = _localise(_command(cfg, "ingest"), tmp_path, sample)
    ingest[ingest.index("--feeds") + 1] = "binanceusdm:BTC/USDT:USDT;bybit:ETH/USDT:USDT"
    run_service(ingest + ["--duration", "3", "--exchange-factory", "tests.integration.fake_venues:make"], env)
    assert list((tmp_path / "data" / "tape").glob("*.parquet"))
    pipeline = _localise(_command(cfg, "pipeline"), tmp_path, sample)
    summary = run_service(pipeline + ["--eof"], env)
    assert "trades in" in summary.stdout
    rows = sql(tmp_path / "data", "SELECT exchange, sum(trades) AS n FROM bars FINAL WHERE tf = '1m' "
                                  "GROUP BY exchange ORDER BY exchange")
    assert [r["exchange"] for r in rows] == ["binanceusdm", "bybit", "synthetic"]
    assert (tmp_path / "data" / "recovery").is_dir()
    # the trainer, bounded to one run: minutes of bars are not enough to train, which it says and waits
    trainer = run_service(_localise(_command(cfg, "trainer"), tmp_path, sample) + ["--runs", "1"], env)
    assert "train: " in trainer.stderr and "trying again at the next run" in trainer.stderr
