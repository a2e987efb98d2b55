"""The daily report's data: the named queries, one UTC day of one strategy read with them, and
the aggregates an LLM may see.

Every number in the report comes from one of the named queries in ``QUERIES`` (run them with
``tapeflow sql`` to check a figure; parameters: ``t0``/``t1`` = the day's bounds in epoch ms,
``strategy`` = an origin or a strategy id, ``low_conf`` = the low-confidence threshold).

What belongs to the day [t0, t1):
- a trade is counted on the day its exit fill happened (``fills.ts``, the 1m bar it used); its
  PnL is the exit fill's ``realised_pnl`` (net of both fees); a win has PnL > 0, every other
  closed trade is a loss (break-even included), so wins + losses = trades;
- an entry (for low-confidence entries) on the day of its entry fill; its confidence is the
  ``best_conf`` of the decision that opened the position (same position_id);
- decisions (vetoes) by their ``ts`` (the scored bar's end, when the decision was made);
- model quality by the prediction's bar ``start``;
- equity marks are taken at 1m bar closes, so the day's curve is the marks in (t0, t1] and the
  day opens at the last mark at or before t0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Mapping, Optional

from operators.records import DAY_MS
from sinks.store import Store

LOW_CONF = 0.6                     # entries whose decision's best_conf is below this are "low confidence"
KILL_SWITCH_KINDS = ("kill_switch", "kill_switch_reset")
GUARD_KINDS = ("daily_loss_limit", "consecutive_losses")

_DAY = "ts >= fromUnixTimestamp64Milli({t0:Int64}, 'UTC') AND ts < fromUnixTimestamp64Milli({t1:Int64}, 'UTC')"
_WHOSE = "{strategy:String} IN (origin, strategy_id)"

# -- the named queries -----------------------------------------------------------------------

_CLOSED = f"""
SELECT x.origin AS origin, x.strategy_id AS strategy_id, x.variant_id AS variant_id,
       x.position_id AS position_id, x.exchange AS exchange, x.symbol AS symbol,
       x.position_side AS side, e.ts AS entry_ts, x.ts AS exit_ts, e.price AS entry_price,
       x.price AS exit_price, x.reason AS exit_reason, x.arm AS arm, x.realised_pnl AS pnl,
       x.pnl_bps AS pnl_bps
FROM (SELECT * FROM fills FINAL WHERE realised_pnl IS NOT NULL AND {_DAY} AND {_WHOSE}) AS x
LEFT JOIN (SELECT origin, strategy_id, variant_id, position_id, ts, price FROM fills FINAL
           WHERE reason = 'entry') AS e
    ON x.origin = e.origin AND x.strategy_id = e.strategy_id AND x.variant_id = e.variant_id
   AND x.position_id = e.position_id
"""

CLOSED_TRADES = _CLOSED + "ORDER BY exit_ts, position_id SETTINGS join_use_nulls = 1"
BEST_TRADE = _CLOSED + "ORDER BY pnl DESC, exit_ts, position_id LIMIT 1 SETTINGS join_use_nulls = 1"
WORST_TRADE = _CLOSED + "ORDER BY pnl ASC, exit_ts, position_id LIMIT 1 SETTINGS join_use_nulls = 1"

TRADE_STATS = f"""
SELECT count() AS trades, countIf(realised_pnl > 0) AS wins, countIf(realised_pnl <= 0) AS losses,
       if(count() > 0, countIf(realised_pnl > 0) / count(), NULL) AS win_rate,
       sum(realised_pnl) AS pnl, if(count() > 0, avg(realised_pnl), NULL) AS avg_pnl,
       sumIf(realised_pnl, realised_pnl > 0) AS gross_profit, sumIf(realised_pnl, realised_pnl <= 0) AS gross_loss,
       if(count() > 0, max(realised_pnl), NULL) AS best_pnl, if(count() > 0, min(realised_pnl), NULL) AS worst_pnl,
       uniqExact(exchange, symbol) AS instruments
FROM fills FINAL
WHERE realised_pnl IS NOT NULL AND {_DAY} AND {_WHOSE}
"""

FEES = f"""
SELECT count() AS fills, sum(fee) AS fees, countIf(reason = 'entry') AS entries
FROM fills FINAL WHERE {_DAY} AND {_WHOSE}
"""

ENTRIES = f"""
SELECT f.origin AS origin, f.strategy_id AS strategy_id, f.variant_id AS variant_id,
       f.position_id AS position_id, f.exchange AS exchange, f.symbol AS symbol,
       f.position_side AS side, f.ts AS entry_ts, f.arm AS arm, d.best_conf AS best_conf,
       d.conf_min AS conf_min, x.realised_pnl AS pnl,
       (d.best_conf IS NOT NULL AND d.best_conf < {{low_conf:Float64}}) AS low_conf,
       d.best_conf IS NULL AS no_conf
FROM (SELECT * FROM fills FINAL WHERE reason = 'entry' AND {_DAY} AND {_WHOSE}) AS f
LEFT JOIN (SELECT origin, strategy_id, variant_id, position_id, best_conf, conf_min FROM decisions FINAL
           WHERE action IN ('open_long', 'open_short')) AS d
    ON f.origin = d.origin AND f.strategy_id = d.strategy_id AND f.variant_id = d.variant_id
   AND f.position_id = d.position_id
LEFT JOIN (SELECT origin, strategy_id, variant_id, position_id, realised_pnl FROM fills FINAL
           WHERE realised_pnl IS NOT NULL) AS x
    ON f.origin = x.origin AND f.strategy_id = x.strategy_id AND f.variant_id = x.variant_id
   AND f.position_id = x.position_id
ORDER BY entry_ts, position_id
SETTINGS join_use_nulls = 1
"""

DECISION_STATS = f"""
SELECT count() AS decisions, countIf(length(vetoes) > 0) AS vetoed,
       countIf(action IN ('open_long', 'open_short')) AS opens
FROM decisions FINAL WHERE {_DAY} AND {_WHOSE}
"""

VETOES = f"""
SELECT reason, count() AS decisions
FROM decisions FINAL ARRAY JOIN vetoes AS reason
WHERE {_DAY} AND {_WHOSE}
GROUP BY reason ORDER BY decisions DESC, reason
"""

RISK_EVENTS = f"""
SELECT ts, kind, reason, exchange, symbol, source, detail
FROM events FINAL
WHERE kind IN {KILL_SWITCH_KINDS + GUARD_KINDS} AND {_DAY}
  AND {{strategy:String}} IN (JSONExtractString(detail, 'origin'), JSONExtractString(detail, 'strategy_id'))
ORDER BY ts, kind
"""

MODEL_QUALITY = """
SELECT model, count() AS n, avg(predicted = label) AS accuracy,
       avg(-log(greatest(p_true, 1e-15))) AS log_loss, avg(brier) AS brier
FROM prediction_outcomes
WHERE start >= fromUnixTimestamp64Milli({t0:Int64}, 'UTC') AND start < fromUnixTimestamp64Milli({t1:Int64}, 'UTC')
GROUP BY model ORDER BY model
"""

# classwise expected calibration error per model of the day's predictions (models/calibration.py):
# calibrated (what the gates read) and raw (the model's own output), from the prediction_calibration view
MODEL_CALIBRATION = """
SELECT model, kind, sum(n) / 3 AS labels, sum(n * abs(observed - predicted)) / sum(n) AS ece
FROM (SELECT model, kind, cls, bin, count() AS n, avg(p) AS predicted, avg(hit) AS observed
      FROM prediction_calibration
      WHERE start >= fromUnixTimestamp64Milli({t0:Int64}, 'UTC') AND start < fromUnixTimestamp64Milli({t1:Int64}, 'UTC')
      GROUP BY model, kind, cls, bin)
GROUP BY model, kind ORDER BY model, kind
"""

EQUITY_CURVE = f"""
SELECT origin, strategy_id, variant_id, ts, equity, drawdown, halted
FROM equity FINAL
WHERE ts > fromUnixTimestamp64Milli({{t0:Int64}}, 'UTC') AND ts <= fromUnixTimestamp64Milli({{t1:Int64}}, 'UTC')
  AND {_WHOSE}
ORDER BY origin, strategy_id, variant_id, ts
"""

EQUITY_SUMMARY = f"""
SELECT c.origin AS origin, c.strategy_id AS strategy_id, c.variant_id AS variant_id,
       if(o.open IS NULL, c.first, o.open) AS open, c.close AS close, c.low AS low, c.high AS high,
       c.max_drawdown AS max_drawdown, c.halted AS halted, c.marks AS marks
FROM (SELECT origin, strategy_id, variant_id, argMin(equity, ts) AS first, argMax(equity, ts) AS close,
             min(equity) AS low, max(equity) AS high, max(drawdown) AS max_drawdown, max(halted) AS halted,
             count() AS marks
      FROM equity FINAL
      WHERE ts > fromUnixTimestamp64Milli({{t0:Int64}}, 'UTC') AND ts <= fromUnixTimestamp64Milli({{t1:Int64}}, 'UTC')
        AND {_WHOSE}
      GROUP BY origin, strategy_id, variant_id) AS c
LEFT JOIN (SELECT origin, strategy_id, variant_id, argMax(equity, ts) AS open FROM equity FINAL
           WHERE ts <= fromUnixTimestamp64Milli({{t0:Int64}}, 'UTC') AND {_WHOSE}
           GROUP BY origin, strategy_id, variant_id) AS o
    ON c.origin = o.origin AND c.strategy_id = o.strategy_id AND c.variant_id = o.variant_id
ORDER BY origin, strategy_id, variant_id
SETTINGS join_use_nulls = 1
"""

QUERIES: dict[str, str] = {
    "closed_trades": CLOSED_TRADES, "trade_stats": TRADE_STATS, "fees": FEES, "best_trade": BEST_TRADE,
    "worst_trade": WORST_TRADE, "entries": ENTRIES, "decision_stats": DECISION_STATS, "vetoes": VETOES,
    "risk_events": RISK_EVENTS, "model_quality": MODEL_QUALITY, "model_calibration": MODEL_CALIBRATION,
    "equity_curve": EQUITY_CURVE,
    "equity_summary": EQUITY_SUMMARY,
}


def day_bounds(day: date) -> tuple[int, int]:
    t0 = int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp() * 1000)
    return t0, t0 + DAY_MS


def parameters(day: date, strategy: str = "production", low_conf: float = LOW_CONF) -> dict:
    t0, t1 = day_bounds(day)
    return {"t0": t0, "t1": t1, "strategy": strategy, "low_conf": float(low_conf)}


def run_query(store: Store, name: str, params: Mapping) -> list[dict]:
    """One named query as a list of row dicts."""
    return store.query_dicts(QUERIES[name], dict(params))

def strategy_key(r: Mapping) -> str:
    """A row's strategy as ``origin/strategy_id/variant_id``."""
    return f"{r['origin']}/{r['strategy_id']}/{r['variant_id']}"


# -- the day's data ----------------------------------------------------------------------------

@dataclass
class DayData:
    day: date
    strategy: str
    low_conf: float
    stats: dict
    fees: dict
    best: Optional[dict]
    worst: Optional[dict]
    trades: list[dict]
    entries: list[dict]
    decisions: dict
    vetoes: list[dict]
    events: list[dict]
    models: list[dict]
    equity: list[dict]
    equity_summary: list[dict]
    charts: dict = field(default_factory=dict)  # name -> file name, once written
    calibration: list[dict] = field(default_factory=list)  # model_calibration rows (model, kind, labels, ece)

    def ece(self, model: str, kind: str) -> Optional[float]:
        return next((r["ece"] for r in self.calibration if r["model"] == model and r["kind"] == kind), None)

    @property
    def low_conf_entries(self) -> list[dict]:
        return [e for e in self.entries if e["low_conf"]]

    @property
    def no_conf_entries(self) -> list[dict]:
        return [e for e in self.entries if e["no_conf"]]


def collect(store: Store, day: date, *, strategy: str = "production", low_conf: float = LOW_CONF) -> DayData:
    """Run every named query for the day and strategy (``strategy``: an origin, e.g. production,
    or a strategy id)."""
    p = parameters(day, strategy, low_conf)
    q = lambda name: run_query(store, name, p)  # noqa: E731
    stats = q("trade_stats")[0]
    best, worst = q("best_trade"), q("worst_trade")
    return DayData(
        day=day, strategy=strategy, low_conf=float(low_conf), stats=stats, fees=q("fees")[0],
        best=best[0] if best else None, worst=worst[0] if worst else None, trades=q("closed_trades"),
        entries=q("entries"), decisions=q("decision_stats")[0], vetoes=q("vetoes"), events=q("risk_events"),
        models=q("model_quality"), equity=q("equity_curve"), equity_summary=q("equity_summary"),
        calibration=q("model_calibration"))


def _num(x: Any) -> Any:
    """A number for the aggregates: NaN -> None, floats rounded to 6 decimals (enough for money
    and rates, and stable against the summation order of a parallel query)."""
    if x is None:
        return None
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 6)
    return x


def aggregates_of(data: DayData) -> dict:
    """What an LLM may see: counts, sums, rates and per-model scores. No trade, symbol or raw row."""
    s = data.stats
    eq_open = sum(r["open"] for r in data.equity_summary) if data.equity_summary else None
    eq_close = sum(r["close"] for r in data.equity_summary) if data.equity_summary else None
    kinds = [e["kind"] for e in data.events]
    return {
        "day": data.day.isoformat(),
        "strategy": data.strategy,
        "trades": int(s["trades"]), "wins": int(s["wins"]), "losses": int(s["losses"]),
        "win_rate": _num(s["win_rate"]), "realised_pnl": _num(s["pnl"]), "avg_pnl": _num(s["avg_pnl"]),
        "gross_profit": _num(s["gross_profit"]), "gross_loss": _num(s["gross_loss"]),
        "best_trade_pnl": _num(s["best_pnl"]), "worst_trade_pnl": _num(s["worst_pnl"]),
        "instruments_traded": int(s["instruments"]),
        "fees": _num(data.fees["fees"]), "entries": int(data.fees["entries"]),
        "low_conf_threshold": data.low_conf,
        "low_conf_entries": len(data.low_conf_entries), "entries_without_model_conf": len(data.no_conf_entries),
        "decisions": int(data.decisions["decisions"]), "decisions_vetoed": int(data.decisions["vetoed"]),
        "vetoes_by_reason": {v["reason"]: int(v["decisions"]) for v in data.vetoes},
        "kill_switch_trips": kinds.count("kill_switch"), "kill_switch_resets": kinds.count("kill_switch_reset"),
        "risk_guard_trips": {k: kinds.count(k) for k in GUARD_KINDS if k in kinds},
        "equity_open": _num(eq_open), "equity_close": _num(eq_close),
        "equity_change": _num(eq_close - eq_open) if eq_open is not None else None,
        "max_drawdown": _num(max((r["max_drawdown"] for r in data.equity_summary), default=None)),
        "models": {m["model"]: {"labels": int(m["n"]), "accuracy": _num(m["accuracy"]),
                                "log_loss": _num(m["log_loss"]), "brier": _num(m["brier"]),
                                "ece": _num(data.ece(m["model"], "calibrated")),
                                "ece_raw": _num(data.ece(m["model"], "raw"))} for m in data.models},
    }


def aggregates(store: Store, day: date, *, strategy: str = "production", low_conf: float = LOW_CONF) -> dict:
    """The aggregates of a day (exactly what the LLM summary would be sent)."""
    return aggregates_of(collect(store, day, strategy=strategy, low_conf=low_conf))
