"""How much of the synthetic tape's edge the models capture (issue 12, bench/oracle_edge.py).

The synthetic generator (operators/synthetic.py) knows, at every bar's close, the state that drives
the next minutes: the informed-flow state, the regime, the trend's sign and the range's anchor.
``operators.synthetic.oracle_probabilities`` turns that state into the best probabilities any model
could give for the bar's label (down / flat / up with the label's own flat band). This module puts
them beside the stored labels and predictions of a run on that tape and scores everyone on the same
rows:

- log loss and accuracy of the oracle, of each model (calibrated, and raw beside it), and of the
  class prior (the label frequencies of those rows: a constant that knew them in advance);
- the **share of the edge captured**: (prior - model) / (prior - oracle) in log loss, 0 for a model
  no better than the prior, 1 for one as good as the oracle.

The oracle is only defined for a synthetic tape whose parameters are known (symbols, start, hours,
seed, rate: what ``tapeflow run`` records in its recovery directory's ``tapeflow-source.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from models.calibration import classwise_ece
from operators import synthetic as syn
from operators.bars import TIMEFRAMES
from operators.records import MINUTE_MS
from operators.stats import log_loss

MODELS = ("river_lr", "river_arf", "onnx_ensemble")


def tape_of(data_dir: Path) -> Optional[dict]:
    """The synthetic tape of the newest run in ``data_dir`` (symbols, start_ms, hours, seed, rate),
    from the source fingerprint its recovery directory keeps; None when there is none."""
    found = sorted(Path(data_dir).glob("runs/*/recovery/tapeflow-source.json"))
    for f in reversed(found):
        fp = json.loads(f.read_text())
        if fp.get("kind") == "synthetic":
            return {k: fp[k] for k in ("symbols", "start_ms", "hours", "seed", "rate")}
    return None


def scored_rows(store, *, tf: str, horizon: int, since_ms: Optional[int]) -> pl.DataFrame:
    """Matured labels of ``tf`` bars starting at or after ``since_ms``, each with every model's
    calibrated and raw probabilities (columns ``<model>`` and ``<model>_raw``: [down, flat, up] lists,
    null where the model gave none)."""
    where = "l.tf = {tf:String} AND l.horizon = {h:UInt16}"
    params = {"tf": tf, "h": horizon}
    if since_ms is not None:
        where += " AND l.start >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')"
        params["since"] = since_ms
    _, labels = store.query(
        "SELECT l.exchange, l.symbol, toUnixTimestamp64Milli(l.start), toUnixTimestamp64Milli(l.end), l.band, l.label "
        f"FROM labels AS l FINAL WHERE {where} ORDER BY l.symbol, l.start", params)
    df = pl.DataFrame(labels, schema={"exchange": pl.String, "symbol": pl.String, "start": pl.Int64, "end": pl.Int64,
                                      "band": pl.Float64, "label": pl.Int64}, orient="row")
    for model in MODELS:
        _, rows = store.query(
            "SELECT exchange, symbol, toUnixTimestamp64Milli(start), [p_down, p_flat, p_up], [raw_down, raw_flat, raw_up] "
            "FROM predictions FINAL WHERE tf = {tf:String} AND model = {m:String}", {"tf": tf, "m": model})
        preds = pl.DataFrame(rows, schema={"exchange": pl.String, "symbol": pl.String, "start": pl.Int64,
                                           model: pl.List(pl.Float64), f"{model}_raw": pl.List(pl.Float64)},
                             orient="row")
        df = df.join(preds, on=["exchange", "symbol", "start"], how="left")
    return df


def with_oracle(df: pl.DataFrame, tape: dict, *, tf: str, horizon: int, paths: int = 4000) -> pl.DataFrame:
    """``df`` (``scored_rows``) with the oracle's probabilities (column ``oracle``)."""
    minutes = int(round(tape["hours"] * 60))
    bar_minutes = TIMEFRAMES[tf] // MINUTE_MS
    parts = []
    for sym in df["symbol"].unique(maintain_order=True):
        sub = df.filter(pl.col("symbol") == sym)
        path = syn.state_path(syn.spec_for(sym, tape.get("rate")), tape["seed"], minutes)
        at = (sub["end"].to_numpy() - tape["start_ms"]) // MINUTE_MS
        if (at < 0).any() or (at >= minutes).any():
            raise ValueError(f"{sym}: bars outside the tape ({tape['hours']} h from {tape['start_ms']})")
        probs = syn.oracle_probabilities(path, at, horizon * bar_minutes, sub["band"].to_numpy(), paths=paths)
        parts.append(sub.with_columns(pl.Series("oracle", probs.tolist(), dtype=pl.List(pl.Float64))))
    return pl.concat(parts)


def _score(probs: np.ndarray, y: np.ndarray) -> dict:
    return {"log_loss": log_loss(probs, y), "accuracy": float(np.mean(probs.argmax(axis=1) == y)),
            "ece": classwise_ece(probs, y)}


def edge_report(df: pl.DataFrame) -> list[dict]:
    """One row per predictor on the rows every model predicted (the same rows for all): name,
    rows, log loss, accuracy, ECE, share of the oracle's edge captured; ``raw`` rows beside the
    calibrated ones."""
    have = [m for m in MODELS if m in df.columns and df[m].null_count() < df.height]
    common = df.drop_nulls(subset=have)
    if common.height == 0:
        return []
    y = common["label"].to_numpy()
    freq = np.bincount(y, minlength=3) / len(y)
    prior = _score(np.tile(freq, (len(y), 1)), y)
    oracle = _score(np.array(common["oracle"].to_list()), y)
    edge = prior["log_loss"] - oracle["log_loss"]
    out = [{"name": "class prior", "rows": len(y), **prior, "share": 0.0},
           {"name": "oracle", "rows": len(y), **oracle, "share": 1.0}]
    for m in have:
        for name, col in ((m, m), (f"{m} (raw)", f"{m}_raw")):
            s = _score(np.array(common[col].to_list()), y)
            out.append({"name": name, "rows": len(y), **s,
                        "share": (prior["log_loss"] - s["log_loss"]) / edge if edge > 0 else float("nan")})
    return out


def markdown(rows: list[dict], caption: str) -> str:
    lines = [caption, "", "| predictor | accuracy | log loss | ECE | share of the oracle's edge |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ece = "" if r["name"] in ("class prior",) else f"{r['ece']:.3f}"
        lines.append(f"| {r['name']} | {r['accuracy']:.3f} | {r['log_loss']:.4f} | {ece} | {r['share']:.0%} |")
    return "\n".join(lines)
