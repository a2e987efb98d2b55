"""Runs are separate things (issue 11): a store holds the trading rows of one run.

A run is what it reads and how it decides: its *source fingerprint* (``runner.source_fingerprint``:
the files, the Kafka topic, the synthetic seed and hours...) and its *config*: every setting the
user set away from its default that changes what is stored (strategy, optimizer, features,
windows, models...; a default is the same run whether or not it is spelt out, and a new version's
new settings do not turn a resumed pipeline into another run), not where things live or how fast
they go (paths, DSN, batch sizes, epoch interval, retry bounds: ``OPERATIONAL``), plus
the run options that change rows (the main job's train split). The window clock (``--clock``,
``--eof``) is how the same input is consumed, not another run: a live Kafka run drained later with
``--eof`` continues it. ``run_id`` hashes both.

Decisions, fills and equity rows carry no run id: their keys (strategy, variant, instrument, time,
position) would put a second run's rows on top of the first's, so that both runs' positions and
equity add up in every summary. Instead of scoping every row and query by run, a store belongs to
one run at a time: ``claim_store`` at the start of ``tapeflow run``

- records the start in table ``runs`` (``infra/clickhouse/012_runs.sql``);
- lets the same run start again (a rerun of the same input writes the same rows under the same
  keys; a resume continues them), and any run into a store without trading rows;
- refuses another run (``RunConflict``, one line naming ``--data-dir``/``--dsn`` and ``--replace``)
  when decisions, fills or equity hold rows;
- with ``--replace``, first clears the trading tables (decisions, fills, equity, variant_metrics,
  and the strategies' and optimizer's events), then records that as a ``store_replaced`` event.

``runs`` lists the runs since the trading tables were last empty: a start that finds them empty
forgets older runs (they left no trading rows). Rows of a store written before runs were recorded
belong to no known run: they are refused too, unless the start resumes a recovery directory that
already belonged to this source (an upgraded pipeline continuing its own run).

Bars, features, labels and predictions are facts about the input keyed by instrument and time;
they are not claimed (a second input of the same instruments and times replaces them: use
another store for another tape).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from dataflows.runner import describe_source
from sinks.rows import EVENT_COLUMNS, Rows
from sinks.store import redact_dsn

TRADING_TABLES = ("decisions", "fills", "equity")
CLEARED_TABLES = (*TRADING_TABLES, "variant_metrics")
STRATEGY_EVENTS = "source LIKE 'strategy:%' OR source LIKE 'optimizer:%'"  # RiskEvents, promotions
RUN_COLUMNS = ["run_id", "started_at", "source", "config_hash", "config", "command", "replaced"]

# settings that say where things live or how fast they go: the same run may change them
OPERATIONAL = frozenset({
    "data_dir", "clickhouse_dsn", "clickhouse_database", "artifacts_dir", "onnx_check_s", "batch_size",
    "epoch_interval_s", "recovery_dir", "sink_flush_rows", "sink_flush_ms", "health_every_s", "store_retry_s",
    "kafka_brokers", "kafka_topic", "kafka_partitions", "kafka_batch_size", "kafka_max_skew_ms", "kafka_max_hold_s",
})


class RunConflict(ValueError):
    """The store holds another run's trading rows (a user's choice to make: exit 2)."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    source: dict   # runner.source_fingerprint(...)
    config: dict   # settings that make the rows (+ run options), JSON-ready

    @property
    def config_hash(self) -> str:
        return _digest(self.config)

    @property
    def run_id(self) -> str:
        return _digest({"source": self.source, "config_hash": self.config_hash})


def run_identity(source: dict, settings, **options: Any) -> RunIdentity:
    """The identity of a run of ``settings`` on ``source``; ``options``: run options that change its
    rows (e.g. ``train_split``)."""
    config = {k: v for k, v in settings.model_dump(mode="json", exclude_defaults=True).items()
              if k not in OPERATIONAL}
    config.update({f"run.{k}": v for k, v in options.items()})
    return RunIdentity(source, json.loads(json.dumps(config, sort_keys=True, default=str)))


def _count(store, table: str) -> int:
    return int(store.query(f"SELECT count() FROM {table}")[1][0][0])


def recorded_runs(store) -> list[dict]:
    """The runs since the trading tables were last empty: run_id, source (dict), config_hash,
    first and last start, oldest first."""
    out = store.query_dicts(
        "SELECT run_id, any(source) AS source, any(config_hash) AS config_hash, min(started_at) AS first, "
        "max(started_at) AS last FROM runs FINAL GROUP BY run_id ORDER BY first")
    for r in out:
        try:
            r["source"] = json.loads(r["source"])
        except ValueError:
            r["source"] = {"kind": "?"}
    return out


def store_name(settings) -> str:
    """How the user names this store: ``--data-dir X`` (embedded) or ``--dsn URL --database D``."""
    if settings.clickhouse_dsn is None:
        return f"--data-dir {settings.data_dir}"
    return f"--dsn {redact_dsn(settings.dsn())} --database {settings.clickhouse_database}"


def claim_store(store, run: RunIdentity, *, where: str, replace: bool = False, resuming: bool = False,
                command: str = "", now_ms: Optional[int] = None) -> dict:
    """Make ``store`` this run's (see the module docstring). Returns what it found and did:
    ``{"rows": {table: count}, "others": [run ids], "replaced": bool}``. Raises ``RunConflict``
    (``where``: how the user names the store, e.g. ``store_name(settings)``)."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rows = {t: _count(store, t) for t in TRADING_TABLES}
    runs = recorded_runs(store)
    others = [r for r in runs if r["run_id"] != run.run_id]
    if replace:
        cleared = {t: _count(store, t) for t in CLEARED_TABLES}
        for t in CLEARED_TABLES:
            store.command(f"TRUNCATE TABLE IF EXISTS {t}")
        store.command(f"DELETE FROM events WHERE {STRATEGY_EVENTS}")
        store.command("TRUNCATE TABLE IF EXISTS runs")
        detail = {"cleared_rows": cleared, "replaced_runs": [r["run_id"] for r in runs], "run_id": run.run_id}
        event = ["store_replaced", now_ms, "", "", None, None, "replace", json.dumps(detail, sort_keys=True),
                 "tapeflow run --replace"]
        store.insert("events", Rows(EVENT_COLUMNS, [event]))
    elif not any(rows.values()):
        if runs:
            store.command("TRUNCATE TABLE IF EXISTS runs")  # they left no trading rows: nothing to protect
    elif others or (not runs and not resuming):
        held = ", ".join(f"{t} {n:,}" for t, n in rows.items() if n)
        if others:
            o = others[-1]
            what = (f"another run's trading rows ({held}): run {o['run_id']} of {describe_source(o['source'])}, "
                    f"config {o['config_hash']}, last started {o['last']:%Y-%m-%d %H:%M:%S} UTC")
            differs = [w for w, same in (("input", o["source"] == run.source),
                                         ("settings", o["config_hash"] == run.config_hash)) if not same]
            what += f"; this run (run {run.run_id}) differs in its {' and '.join(differs)}"
        else:
            what = f"trading rows ({held}) of a run that was not recorded (written by an older tapeflow)"
        raise RunConflict(f"the store at {where} holds {what}. Use another --data-dir (or --dsn/--database) for "
                          "this run, or add --replace to clear that store's decisions, fills and equity first")
    started = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
    store.insert("runs", Rows(RUN_COLUMNS, [[run.run_id, started, json.dumps(run.source, sort_keys=True),
                                             run.config_hash, json.dumps(run.config, sort_keys=True), command,
                                             int(replace)]]))
    return {"rows": rows, "others": [r["run_id"] for r in others], "replaced": replace}
