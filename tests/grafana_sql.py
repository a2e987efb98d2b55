"""Grafana dashboard SQL made runnable: template variables and the ClickHouse datasource's macros
expanded for a concrete time range, the way Grafana (variables, in the browser) and the
grafana-clickhouse-datasource plugin (macros, in its backend, pkg/macros/macros.go) do it.

Variables: ``${name}``, ``${name:format}`` and ``$name``; formats ``sqlstring`` ('a','b' with ''
escaping), ``singlequote`` ('a','b' with \\' escaping), ``csv``, ``raw``. A multi-value variable
(a list) must name its format: the default rendering of a list differs between Grafana versions.

Macros (times are UTC; the plugin's second-precision forms):
``$__timeFilter(c)``      -> ``c >= toDateTime(from) AND c <= toDateTime(to)``
``$__timeFilter_ms(c)``   -> ``c >= fromUnixTimestamp64Milli(from_ms) AND c <= fromUnixTimestamp64Milli(to_ms)``
``$__dateFilter(c)``      -> ``c >= toDate('YYYY-MM-DD') AND c <= toDate('YYYY-MM-DD')``
``$__dateTimeFilter(d, t)`` / ``$__dt(d, t)`` -> both of the above, each in parentheses
``$__fromTime`` / ``$__toTime`` (``toDateTime(s)``), ``$__fromTime_ms`` / ``$__toTime_ms``
``$__timeInterval(c)``    -> ``toStartOfInterval(toDateTime(c), INTERVAL n second)``
``$__timeInterval_ms(c)`` -> ``toStartOfInterval(toDateTime64(c, 3), INTERVAL n millisecond)``
``$__interval_s``         -> ``n``
Anything else that starts with ``$`` is an error (an unknown macro or variable never reaches SQL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator, Mapping, Sequence, Union

Value = Union[str, Sequence[str]]

_VAR = re.compile(r"\$\{([A-Za-z_]\w*)(?::(\w+))?\}|\$([A-Za-z]\w*)")
_MACRO = re.compile(r"\$__(\w+)")


class ExpandError(ValueError):
    pass


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_s: int = 60

    def __post_init__(self) -> None:
        for t in (self.start, self.end):
            if t.tzinfo is None:
                raise ExpandError("time range bounds must be timezone-aware (UTC)")
        if self.end < self.start:
            raise ExpandError("time range ends before it starts")


def _format(name: str, value: Value, fmt: str | None) -> str:
    values = [value] if isinstance(value, str) else list(value)
    if not isinstance(value, str) and fmt is None:
        raise ExpandError(f"multi-value variable ${name} needs an explicit format, e.g. ${{{name}:sqlstring}}")
    if fmt in (None, "raw"):
        return values[0] if isinstance(value, str) else ",".join(values)
    if fmt == "sqlstring":
        return ",".join("'" + v.replace("'", "''") + "'" for v in values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "csv":
        return ",".join(values)
    raise ExpandError(f"unsupported variable format {fmt!r} for ${name}")


def expand_variables(sql: str, variables: Mapping[str, Value]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name not in variables:
            raise ExpandError(f"unknown template variable ${name}")
        return _format(name, variables[name], m.group(2))

    return _VAR.sub(sub, sql)


def _split_args(text: str) -> list[str]:
    """Top-level comma split of a macro's argument text (parentheses, brackets and quotes nest)."""
    args, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"`":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    args.append("".join(cur).strip())
    return [a for a in args if a] if any(args) else []


def _dt(t: datetime) -> str:
    return f"toDateTime({int(t.timestamp())})"


def _dt_ms(t: datetime) -> str:
    return f"fromUnixTimestamp64Milli({int(round(t.timestamp() * 1000))})"


def _date(t: datetime) -> str:
    return f"toDate('{t.astimezone(timezone.utc):%Y-%m-%d}')"


def _macro(name: str, args: list[str], tr: TimeRange) -> str:
    def need(n: int) -> None:
        if len(args) != n:
            raise ExpandError(f"$__{name} takes {n} argument(s), got {len(args)}: {args}")

    f, t = tr.start, tr.end
    if name in ("timeFilter", "timeFilter_ms", "dateFilter"):
        need(1)
        conv = {"timeFilter": _dt, "timeFilter_ms": _dt_ms, "dateFilter": _date}[name]
        return f"{args[0]} >= {conv(f)} AND {args[0]} <= {conv(t)}"
    if name in ("dateTimeFilter", "dt"):
        need(2)
        d, c = args
        return f"({d} >= {_date(f)} AND {d} <= {_date(t)}) AND ({c} >= {_dt(f)} AND {c} <= {_dt(t)})"
    if name in ("fromTime", "toTime", "fromTime_ms", "toTime_ms", "interval_s"):
        need(0)
        if name == "interval_s":
            return str(max(int(tr.interval_s), 1))
        conv = _dt_ms if name.endswith("_ms") else _dt
        return conv(f if name.startswith("from") else t)
    if name == "timeInterval":
        need(1)
        return f"toStartOfInterval(toDateTime({args[0]}), INTERVAL {max(int(tr.interval_s), 1)} second)"
    if name == "timeInterval_ms":
        need(1)
        return (f"toStartOfInterval(toDateTime64({args[0]}, 3), "
                f"INTERVAL {max(int(tr.interval_s * 1000), 1)} millisecond)")
    raise ExpandError(f"unknown macro $__{name}")


def expand_macros(sql: str, tr: TimeRange) -> str:
    out, pos = [], 0
    while True:
        m = _MACRO.search(sql, pos)
        if m is None:
            out.append(sql[pos:])
            break
        out.append(sql[pos:m.start()])
        end = m.end()
        args: list[str] = []
        if end < len(sql) and sql[end] == "(":
            depth, i, quote = 0, end, None
            while i < len(sql):
                ch = sql[i]
                if quote:
                    quote = None if ch == quote else quote
                elif ch in "'\"`":
                    quote = ch
                elif ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            else:
                raise ExpandError(f"unbalanced parentheses after $__{m.group(1)}")
            args = _split_args(sql[end + 1:i])
            end = i + 1
        out.append(_macro(m.group(1), args, tr))
        pos = end
    return "".join(out)


def expand(sql: str, tr: TimeRange, variables: Mapping[str, Value] | None = None) -> str:
    """Variables first (Grafana), then macros (the plugin); nothing starting with ``$`` may remain."""
    text = expand_macros(expand_variables(sql, variables or {}), tr)
    if "$" in text:
        raise ExpandError(f"unexpanded token left in: {text}")
    return text


# ---------------------------------------------------------------------------------------- dashboards

@dataclass(frozen=True)
class Query:
    """One SQL text of a dashboard: a panel target, an annotation or a template variable."""

    dashboard: str   # dashboard uid
    kind: str        # "panel" | "annotation" | "variable"
    title: str       # panel title, annotation name or variable name
    ref: str         # target refId ("" for annotations and variables)
    sql: str
    fmt: object      # the target's format (0 time series, 1 table), None for variables
    datasource: object


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows."""
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def variable_sql(var: dict) -> str:
    q = var.get("query")
    return q.get("rawSql") or q.get("query", "") if isinstance(q, dict) else (q or "")


def queries(dashboard: dict) -> Iterator[Query]:
    uid = dashboard["uid"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            yield Query(uid, "variable", var["name"], "", variable_sql(var), None, var.get("datasource"))
    for ann in dashboard.get("annotations", {}).get("list", []):
        target = ann.get("target") or {}
        if "rawSql" in target:
            yield Query(uid, "annotation", ann["name"], target.get("refId", ""), target["rawSql"],
                        target.get("format"), ann.get("datasource"))
    for p in panels(dashboard):
        for t in p.get("targets", []):
            yield Query(uid, "panel", p["title"], t.get("refId", ""), t.get("rawSql", ""), t.get("format"),
                        t.get("datasource", p.get("datasource")))


def resolve_variables(dashboard: dict, run: Callable[[str], list[tuple]], tr: TimeRange) -> dict[str, Value]:
    """Values for every template variable, in dashboard order (a query variable may use earlier ones):
    custom -> its current value (or first option); query -> run its SQL, take the first column; a
    multi-value variable with "All" gets every value, a single-value one its current value when that
    is among the options, else the first option. Raises if a variable has no options."""
    values: dict[str, Value] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var["name"], var.get("type")
        if kind == "custom":
            options = [o.split(" : ")[-1].strip() for o in var["query"].split(",") if o.strip()]
        elif kind == "query":
            options = [str(r[0]) for r in run(expand(variable_sql(var), tr, values))]
        elif kind == "constant":
            options = [var["query"]]
        else:
            raise ExpandError(f"variable {name}: unsupported type {kind!r}")
        if not options:
            raise ExpandError(f"variable {name} of {dashboard['uid']} has no options")
        current = (var.get("current") or {}).get("value")
        if var.get("multi") and var.get("includeAll"):
            values[name] = options
        elif var.get("multi"):
            values[name] = [c for c in (current or []) if c in options] or options[:1]
        else:
            values[name] = current if isinstance(current, str) and current in options else options[0]
    return values
