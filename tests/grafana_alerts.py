"""Grafana alert rules made runnable: the provisioned rule files read the way Grafana reads them
(pkg/services/provisioning/alerting: apiVersion 1, ``groups`` of ``rules``, each with ``data``
queries and a ``condition``), each rule's ClickHouse query run on a store, and its threshold
expression applied the way Grafana's server-side expressions do (pkg/expr/threshold.go).

A table-format query is alerted on as numeric data: every row is one alert instance, its string
columns are the labels and its single numeric column the value. So a rule's query must return
exactly one numeric column, the other columns strings (no time column), and distinct label sets.
A NULL value gives no result for that instance (not firing), as in Grafana.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTING = ROOT / "infra" / "grafana" / "provisioning" / "alerting"

# pkg/expr/threshold.go: the predicates of the threshold expression
PREDICATES: dict[str, Callable[[float, list], bool]] = {
    "gt": lambda v, p: v > p[0],
    "lt": lambda v, p: v < p[0],
    "gte": lambda v, p: v >= p[0],
    "lte": lambda v, p: v <= p[0],
    "eq": lambda v, p: v == p[0],
    "ne": lambda v, p: v != p[0],
    "within_range": lambda v, p: p[0] < v < p[1],
    "outside_range": lambda v, p: v < p[0] or v > p[1],
    "within_range_included": lambda v, p: p[0] <= v <= p[1],
    "outside_range_included": lambda v, p: v <= p[0] or v >= p[1],
}

_NUMERIC = re.compile(r"^(Nullable\()?(U?Int\d+|Float\d+|Decimal.*)\)?$")
_STRING = re.compile(r"^(Nullable\()?(LowCardinality\()?(Nullable\()?String\)*$")


@dataclass(frozen=True)
class Rule:
    group: str
    uid: str
    title: str
    raw: dict          # the rule as provisioned
    sql: str           # the ClickHouse query the condition is computed from
    query_ref: str
    threshold: str     # predicate type
    params: tuple      # predicate parameters


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ALERTING / name).read_text())


def rules() -> list[Rule]:
    """Every provisioned rule whose condition is a threshold over one ClickHouse query."""
    out = []
    for f in sorted(ALERTING.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        for g in doc.get("groups", []):
            for r in g["rules"]:
                by_ref = {d["refId"]: d for d in r["data"]}
                cond = by_ref[r["condition"]]["model"]
                query = by_ref[cond["expression"]]
                ev = cond["conditions"][0]["evaluator"]
                out.append(Rule(g["name"], r["uid"], r["title"], r, query["model"]["rawSql"], query["refId"],
                                ev["type"], tuple(float(x) for x in ev["params"])))
    return out


def rule(uid: str) -> Rule:
    (r,) = [r for r in rules() if r.uid == uid]
    return r


@dataclass(frozen=True)
class Instance:
    labels: dict
    value: Optional[float]
    firing: bool


def evaluate(store, r: Rule) -> list[Instance]:
    """Run the rule's query on ``store`` and apply its threshold to every row. Raises if the
    result is not something Grafana can alert on (see the module docstring)."""
    described = store.query(f"DESCRIBE ({r.sql})")[1]
    types = [(c[0], c[1]) for c in described]
    numeric = [n for n, t in types if _NUMERIC.match(t)]
    if len(numeric) != 1:
        raise AssertionError(f"{r.uid}: needs exactly one numeric column, got {types}")
    others = [(n, t) for n, t in types if n != numeric[0]]
    bad = [(n, t) for n, t in others if not _STRING.match(t)]
    if bad:
        raise AssertionError(f"{r.uid}: label columns must be strings, got {bad}")
    cols, rows = store.query(r.sql)
    out, seen = [], set()
    pred = PREDICATES[r.threshold]
    for row in rows:
        rec = dict(zip(cols, row))
        value = rec.pop(numeric[0])
        key = tuple(sorted(rec.items()))
        if key in seen:
            raise AssertionError(f"{r.uid}: two rows with the same labels {rec}")
        seen.add(key)
        v = None if value is None else float(value)
        out.append(Instance(rec, v, v is not None and pred(v, list(r.params))))
    return out


def firing(store, r: Rule) -> list[dict]:
    """The label sets of the instances that fire, sorted."""
    return sorted((i.labels for i in evaluate(store, r) if i.firing), key=lambda d: sorted(d.items()))
