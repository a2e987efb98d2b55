"""``tapeflow models`` (what was trained, what the gate decided, what is served) and ``tapeflow
train``: once, or scheduled with ``--every 24h`` (the compose stack's ``trainer`` service).

Scheduled retraining: every ``every`` seconds, train on the store's recent history (labelled rows
of the last ``history``, counted back from the newest matured label, so a replayed store works the
same as a live one), walk-forward with purge, through the deployment gate (models/deployment.py)
against the class prior and the ensemble the pipeline serves now. An accepted version is picked
up by the running pipeline at its next check (``onnx_check_s``) and serves bars after its training
span from the next bar on; a rejected one is kept on disk and never served. Each decision is an
``events`` row. Not enough labelled rows yet (a fresh stack) is a line on stderr and the next try
waits; so is a store that does not answer (the next cycle tries again). SIGTERM or Ctrl-C between
runs ends the loop (exit 0). An embedded (chdb) store can be opened by one process at a time: run
the trainer beside a pipeline only with a ClickHouse server.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.common import Failure, command_settings, err_console, open_store, out_console
from dataflows.config import ConfigError, Settings
from models.manifest import MANIFEST_FILE, load_manifest
from dataflows.model_io import active_ensemble, train_from_store
from sinks.store import Store, StoreError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``24h``, ``7d`` (one number and unit). Raises ValueError."""
    m = _DURATION.fullmatch(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: a positive number and a unit s, m, h or d (e.g. 24h)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


DURATION = Duration()


def _iso(ms: Optional[int]) -> str:
    from datetime import datetime, timezone

    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


# ------------------------------------------------------------------------------- tapeflow models


def model_rows(settings: Settings) -> list[dict]:
    """One dict per version folder in the artifacts directory, newest first: version, created,
    status (accepted / rejected / ungated / unreadable), trained span, rows, instruments, the
    gate's numbers, and ``active`` for the one the pipeline of ``settings`` would serve now."""
    root = settings.artifacts()
    active = active_ensemble(settings)
    served = active.version if active is not None else None
    rows = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for folder in folders:
        if not (folder / MANIFEST_FILE).is_file():
            continue
        try:
            m = load_manifest(folder)
        except ValueError as err:
            rows.append({"version": folder.name, "status": "unreadable", "reason": str(err), "created_ms": 0,
                         "active": False})
            continue
        d = m.deployment
        row = {"version": m.version, "created_ms": m.created_at_ms, "created": m.created_at,
               "status": "ungated" if d is None else d.status, "active": m.version == served,
               "trained_from": m.data.first_bar_end, "trained_to": m.data.last_bar_end, "rows": m.data.rows,
               "instruments": m.data.instruments, "store": m.data.store, "database": m.data.database,
               "members": len(m.members), "reason": "written before deployment gates: retrain" if d is None
               else d.reason}
        if d is not None:
            row.update({"logloss": d.logloss, "logloss_prior": d.logloss_prior, "gain": d.gain_prior,
                        "se": d.se_prior, "record_steps": d.record_steps, "span_logloss": d.span_logloss,
                        "span_logloss_prior": d.span_logloss_prior, "ece": d.ece, "ece_raw": d.ece_raw,
                        "active_version": d.active_version, "logloss_active": d.logloss_active})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["created_ms"], r["version"]), reverse=True)


@click.command("models")
@click.option("--dsn", default=None, help="the store the pipeline scores into (decides which versions may serve it)")
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def models(ctx: click.Context, dsn: Optional[str], database: Optional[str], data_dir: Optional[Path],
           as_json: bool) -> None:
    """List trained ONNX ensembles: spans, out-of-sample metrics, the deployment gate's decision,
    and which one is active (what the pipeline serves now)."""
    from rich.console import Console

    settings = command_settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)
    rows = model_rows(settings)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(f"no trained ensembles in {settings.artifacts()} (tapeflow train writes them)")
        return
    t = Table(title=f"ONNX ensembles in {settings.artifacts()}", title_justify="left")
    for c in ("", "version", "status", "trained on bars", "rows", "log loss (prior)", "gain ± se", "ECE (raw)"):
        t.add_column(c, justify="left" if c in ("", "version", "status", "trained on bars") else "right",
                     no_wrap=c == "version")
    for r in rows:
        if r["status"] == "unreadable" or "logloss" not in r:
            t.add_row("", r["version"], r["status"], "", "", "", "", "")
            continue
        t.add_row("*" if r["active"] else "", r["version"], r["status"],
                  f"{_iso(r['trained_from'])} → {_iso(r['trained_to'])}", f"{r['rows']:,}",
                  f"{r['logloss']:.4f} ({r['logloss_prior']:.4f})", f"{r['gain']:+.4f} ± {r['se']:.4f}",
                  f"{r['ece']:.3f} ({r['ece_raw']:.3f})")
    Console(width=max(120, Console().width)).print(t)
    active = [r for r in rows if r["active"]]
    click.echo(f"active (*): {active[0]['version']}" if active else
               "active: none (no accepted version of this store: the pipeline runs without the ensemble)")
    for r in rows[:5]:
        if r["status"] != "accepted":
            click.echo(f"{r['version']} {r['status']}: {r['reason']}")
    if any(r["status"] == "unreadable" for r in rows) and not active:
        raise Failure("some manifests are unreadable (listed above)", 1)


# ------------------------------------------------------------------------- tapeflow train --every


def _latest_label_ms(store, settings: Settings) -> Optional[int]:
    _, rows = store.query("SELECT toUnixTimestamp64Milli(max(matured_at)) FROM labels FINAL "
                          "WHERE tf = {tf:String} AND horizon = {h:UInt16}",
                          {"tf": settings.primary_tf, "h": settings.label_horizon})
    v = rows[0][0] if rows else None
    return int(v) if v else None


def train_once(settings: Settings, *, folds: int, history_s: Optional[float], echo: Callable[[str], None]):
    """One scheduled training: open the store, train on the recent history through the gate,
    say what happened in one line. Returns the manifest, or None when there was not enough data
    or the store did not answer (said on ``echo``)."""
    try:
        store = Store(settings.dsn(), settings.clickhouse_database)
    except StoreError as err:
        echo(f"train: the store did not answer ({err}); trying again at the next run")
        return None
    try:
        newest = _latest_label_ms(store, settings)
        if newest is None:
            echo("train: no matured labels in the store yet; trying again at the next run")
            return None
        since = None if history_s is None else newest - int(history_s * 1000)
        try:
            m = train_from_store(store, settings, folds=folds, since_ms=since)
        except ValueError as err:
            echo(f"train: not enough data yet ({err}); trying again at the next run")
            return None
    finally:
        store.close()
    d = m.deployment
    echo(f"train: {m.version} on {m.data.rows:,} rows (bars {_iso(m.data.first_bar_end)} → "
         f"{_iso(m.data.last_bar_end)}): {d.status}: {d.reason}")
    return m


def train_every(settings: Settings, *, every_s: float, folds: int, history_s: Optional[float],
                runs: Optional[int], echo: Callable[[str], None], sleep: Optional[threading.Event] = None) -> int:
    """Train now and then every ``every_s`` seconds (``train_once``), ``runs`` times (None:
    until SIGTERM / Ctrl-C). Returns the number of runs made."""
    stop = sleep or threading.Event()
    if sleep is None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    done = 0
    while not stop.is_set():
        started = time.monotonic()
        train_once(settings, folds=folds, history_s=history_s, echo=echo)
        done += 1
        if runs is not None and done >= runs:
            break
        wait = max(0.0, every_s - (time.monotonic() - started))
        echo(f"train: next run in {wait / 3600:.2f} h")
        stop.wait(wait)
    return done


def run_train_command(ctx: click.Context, settings: Settings, *, folds: int, every: Optional[float],
                      history: Optional[float], runs: Optional[int], train_now: Callable) -> None:
    """What ``tapeflow train`` does: once (the folds table and the gate's decision), or on a
    schedule with ``--every``."""
    if every is None:
        if runs is not None:
            raise click.UsageError("--runs bounds a scheduled training: it needs --every")
        if history is not None:
            if train_once(settings, folds=folds, history_s=history, echo=lambda s: click.echo(s, err=True)) is None:
                raise click.ClickException("no ensemble trained (the reason is above)")
            return
        manifest = train_now()
        d = manifest.deployment
        click.echo(f"wrote {settings.artifacts() / manifest.version}: {d.status}: {d.reason}")
        return
    try:
        train_every(settings, every_s=every, folds=folds, history_s=history, runs=runs,
                    echo=lambda s: click.echo(s, err=True))
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


def train_and_show(settings: Settings, until_ms: Optional[int] = None, folds: int = 4, quiet: bool = False):
    """Train the ONNX ensemble on the store's features and labels; print the folds."""
    with open_store(settings, must_exist=True) as store:
        bar = None if quiet else Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"),
                                          TimeElapsedColumn(), console=err_console)
        task = bar.add_task("reading features", total=folds) if bar else None
        if bar:
            bar.start()
        try:
            manifest = train_from_store(
                store, settings, folds=folds, until_ms=until_ms,
                progress=(lambda i, k, msg: bar.update(task, completed=i, total=k, description=msg)) if bar else None)
        finally:
            if bar:
                bar.stop()
    t = Table(title=f"ONNX ensemble {manifest.version}", title_justify="left")
    for c in ("fold", "train rows", "valid rows", "log loss", "Brier", "accuracy"):
        t.add_column(c, justify="right")
    for m in manifest.members:
        t.add_row(str(m.fold), f"{m.train_rows:,}", f"{m.valid_rows:,}", f"{m.metrics['logloss']:.4f}",
                  f"{m.metrics['brier']:.4f}", f"{m.metrics['accuracy']:.3f}")
    out_console.print(t)
    return manifest


@click.command()
@click.option("--folds", type=click.IntRange(min=2), default=4, show_default=True,
              help="walk-forward folds (= ensemble members)")
@click.option("--every", type=DURATION, default=None,
              help="retrain on this schedule (e.g. 24h) until stopped: the trainer service (cli/models.py)")
@click.option("--history", type=DURATION, default=None,
              help="train on the labelled rows of this much recent history (e.g. 7d; default: all)")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="with --every: stop after this many runs")
@click.option("--dsn", default=None)
@click.option("--database", default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def train(ctx: click.Context, folds: int, every: Optional[float], history: Optional[float], runs: Optional[int],
          dsn: Optional[str], database: Optional[str], data_dir: Optional[Path]) -> None:
    """Train the ONNX LightGBM ensemble on stored features and labels (walk-forward, purged),
    through the deployment gate (served only if it beats the class prior and the active model)."""
    settings = command_settings(ctx, clickhouse_dsn=dsn, clickhouse_database=database, data_dir=data_dir)

    def once():
        try:
            return train_and_show(settings, folds=folds)
        except ValueError as err:
            raise click.ClickException(str(err)) from None

    run_train_command(ctx, settings, folds=folds, every=every, history=history, runs=runs, train_now=once)
