"""The daily report (SPEC §9, ``tapeflow report --day YYYY-MM-DD``): a markdown summary of one UTC
day of one strategy, with PNG charts, and optionally a few sentences from an LLM.

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

The optional LLM summary (``LlmConfig``, from ``TAPEFLOW_LLM_*``; off unless configured) receives
``aggregates()`` only: counts, sums and rates, never a trade, a symbol or a raw row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import SecretStr

from dataflows.logs import register_dsn, register_secret, redact_text
from sinks.clickhouse import Store

log = logging.getLogger("tapeflow.report")

DAY_MS = 86_400_000
LOW_CONF = 0.6                     # entries whose decision's best_conf is below this are "low confidence"
MAX_LISTED = 50                    # rows listed per table in the markdown (the counts cover all)
KILL_SWITCH_KINDS = ("kill_switch", "kill_switch_reset")
GUARD_KINDS = ("daily_loss_limit", "consecutive_losses")

SECTIONS = ("Trades", "Best and worst trade", "Closed trades", "Equity", "Low-confidence entries",
            "Vetoes by reason", "Kill switch and risk guards", "Model quality")

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
    cols, rows = store.query(QUERIES[name], dict(params))
    return [dict(zip(cols, r)) for r in rows]


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


# -- the optional LLM summary --------------------------------------------------------------------

@dataclass(frozen=True)
class LlmConfig:
    """An OpenAI-compatible chat endpoint: POST ``{base_url}/chat/completions``."""

    base_url: str
    model: str
    api_key: Optional[SecretStr] = None
    timeout_s: float = 30.0
    max_tokens: int = 400

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["LlmConfig"]:
        """``TAPEFLOW_LLM_BASE_URL`` + ``TAPEFLOW_LLM_MODEL`` (+ ``TAPEFLOW_LLM_API_KEY``,
        ``TAPEFLOW_LLM_TIMEOUT_S``). None (summary off) unless the base URL is set. The key and any
        password in the URL are registered with the log redaction."""
        env = os.environ if environ is None else environ
        base = (env.get("TAPEFLOW_LLM_BASE_URL") or "").strip()
        if not base:
            return None
        model = (env.get("TAPEFLOW_LLM_MODEL") or "").strip()
        if not model:
            raise ValueError("TAPEFLOW_LLM_BASE_URL is set but TAPEFLOW_LLM_MODEL is not: name the model "
                             "(or unset TAPEFLOW_LLM_BASE_URL to turn the LLM summary off)")
        key = env.get("TAPEFLOW_LLM_API_KEY") or None
        timeout = env.get("TAPEFLOW_LLM_TIMEOUT_S") or "30"
        try:
            timeout_s = float(timeout)
        except ValueError:
            raise ValueError(f"TAPEFLOW_LLM_TIMEOUT_S must be a number of seconds, got {timeout!r}") from None
        register_dsn(base)
        if key:
            register_secret(key)
        return cls(base_url=base, model=model, api_key=SecretStr(key) if key else None, timeout_s=timeout_s)


SYSTEM_PROMPT = ("You summarise one day of a paper-trading crypto strategy for its operator. You get JSON "
                 "aggregates only. Write 3 to 6 plain sentences: how the day went, what stands out "
                 "(vetoes, kill switch, low-confidence entries, model quality), nothing invented.")


def llm_request(cfg: LlmConfig, agg: Mapping) -> tuple[str, dict, bytes]:
    """The URL, headers and body that would be POSTed for these aggregates. Credentials in the base
    URL (user:pw@) are not sent; the endpoint gets ``TAPEFLOW_LLM_API_KEY`` as a bearer token."""
    parts = urlsplit(cfg.base_url.rstrip("/") + "/chat/completions")
    url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    body = json.dumps({
        "model": cfg.model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": json.dumps(agg, sort_keys=True, default=str)}],
        "temperature": 0.2, "max_tokens": cfg.max_tokens,
    }).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if cfg.api_key is not None:
        headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
    return url, headers, body


def llm_summary(cfg: LlmConfig, agg: Mapping) -> Optional[str]:
    """The model's summary of the aggregates, or None (logged) when the call fails in any way."""
    url, headers, body = llm_request(cfg, agg)
    try:
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:  # noqa: S310 - configured endpoint
            payload = json.loads(resp.read().decode("utf-8"))
        text = payload["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the response has no message content")
        return text.strip()
    except urllib.error.HTTPError as err:
        log.warning("LLM summary failed: HTTP %s from %s", err.code, redact_text(url))
    except Exception as err:  # noqa: BLE001 - the report is written without the summary
        log.warning("LLM summary failed (%s) calling %s: %s", type(err).__name__, redact_text(url),
                    redact_text(str(err)))
    return None


# -- charts ----------------------------------------------------------------------------------

def _figure(width: float = 9.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _key(r: Mapping) -> str:
    return f"{r['origin']}/{r['strategy_id']}/{r['variant_id']}"


def equity_chart(data: DayData, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    curves: dict[str, tuple[list, list]] = {}
    for r in data.equity:
        xs, ys = curves.setdefault(_key(r), ([], []))
        xs.append(r["ts"])
        ys.append(r["equity"])
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, linewidth=1.2, label=name)
    for e in data.events:
        if e["kind"] in KILL_SWITCH_KINDS:
            ax.axvline(e["ts"], color="red" if e["kind"] == "kill_switch" else "green", linestyle="--",
                       linewidth=1, label=e["kind"])
    ax.set_title(f"Equity {data.day.isoformat()} (UTC)")
    ax.set_ylabel("equity")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    import matplotlib.dates as mdates

    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    fig.tight_layout()
    fig.savefig(path, format="png")


def pnl_chart(data: DayData, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    pnl = [t["pnl"] for t in data.trades]
    ax.bar(range(1, len(pnl) + 1), pnl, color=["tab:green" if p > 0 else "tab:red" for p in pnl])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"PnL per closed trade {data.day.isoformat()} (in exit order, net of fees)")
    ax.set_xlabel("trade")
    ax.set_ylabel("PnL")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


# -- markdown --------------------------------------------------------------------------------

def _money(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.4f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


def _time(t: Optional[datetime]) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M")


def _side(s: int) -> str:
    return {1: "long", -1: "short"}.get(int(s), str(s))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _listed(rows: list, noun: str) -> tuple[list, list[str]]:
    if len(rows) <= MAX_LISTED:
        return rows, []
    return rows[:MAX_LISTED], ["", f"_… and {len(rows) - MAX_LISTED} more {noun} (the counts above cover all)._"]


def render(data: DayData, summary: Optional[str] = None, llm_failed: bool = False) -> str:
    s, d = data.stats, data.day.isoformat()
    agg = aggregates_of(data)
    many = len({_key(r) for r in data.equity_summary} | {_key(t) for t in data.trades}) > 1
    L: list[str] = [f"# tapeflow daily report — {d} (UTC)", "",
                    f"Strategy: **{data.strategy}** · day {d}T00:00Z – {data.day + timedelta(days=1)}T00:00Z · "
                    f"generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}Z", ""]
    if summary:
        L += ["## Summary", "", summary, "", "_Written by a language model from the aggregates below only._", ""]
    elif llm_failed:
        L += ["_An LLM summary was requested but could not be produced (see the logs)._", ""]

    L += ["## Trades", ""]
    if s["trades"] == 0:
        L += [f"No trade closed on {d} for strategy {data.strategy}.", ""]
    L += _table(["what", "value"], [
        ["closed trades", s["trades"]], ["wins", s["wins"]], ["losses", s["losses"]],
        ["win rate", _pct(s["win_rate"])], ["realised PnL (net of fees)", _money(s["pnl"])],
        ["average PnL per trade", _money(s["avg_pnl"])], ["gross profit", _money(s["gross_profit"])],
        ["gross loss", _money(s["gross_loss"])], ["fees paid (all fills of the day)", _money(data.fees["fees"])],
        ["entries", data.fees["entries"]], ["instruments traded", s["instruments"]],
        ["equity at open", _money(agg["equity_open"])], ["equity at close", _money(agg["equity_close"])],
        ["equity change", _money(agg["equity_change"])],
        ["max drawdown", _pct(agg["max_drawdown"])],
    ]) + ["", "A win is a closed trade with PnL > 0; every other closed trade counts as a loss.", ""]

    L += ["## Best and worst trade", ""]
    if data.best is None:
        L += ["No trade closed on this day, so there is no best or worst trade.", ""]
    else:
        L += _table(["", "symbol", "side", "entry", "exit", "exit reason", "PnL", "bps"], [
            [which, f"{t['exchange']}:{t['symbol']}", _side(t["side"]), _time(t["entry_ts"]), _time(t["exit_ts"]),
             t["exit_reason"], _money(t["pnl"]), f"{t['pnl_bps']:.1f}" if t["pnl_bps"] is not None else "-"]
            for which, t in (("best", data.best), ("worst", data.worst))]) + [""]

    L += ["## Closed trades", ""]
    if not data.trades:
        L += ["No trade closed on this day: nothing to list or chart.", ""]
    else:
        rows, more = _listed(data.trades, "trades")
        L += [f"![PnL per trade]({data.charts['pnl']})", ""] if "pnl" in data.charts else []
        L += _table((["strategy"] if many else []) + ["#", "symbol", "side", "entry", "exit", "exit reason", "arm", "PnL"],
                    [([_key(t)] if many else []) + [t["position_id"], f"{t['exchange']}:{t['symbol']}", _side(t["side"]),
                      _time(t["entry_ts"]), _time(t["exit_ts"]), t["exit_reason"], t["arm"] or "-", _money(t["pnl"])]
                     for t in rows]) + more + [""]

    L += ["## Equity", ""]
    if not data.equity:
        L += [f"No equity mark for strategy {data.strategy} on this day (the pipeline did not run over it).", ""]
    else:
        L += [f"![Equity]({data.charts['equity']})", ""] if "equity" in data.charts else []
        L += _table(["strategy", "open", "close", "low", "high", "max drawdown", "halted"], [
            [_key(r), _money(r["open"]), _money(r["close"]), _money(r["low"]), _money(r["high"]),
             _pct(r["max_drawdown"]), "yes" if r["halted"] else "no"] for r in data.equity_summary]) + [""]

    L += ["## Low-confidence entries", ""]
    low, none = data.low_conf_entries, data.no_conf_entries
    L += [f"Entries whose opening decision had a best model confidence below {data.low_conf:.2f}: "
          f"**{len(low)}** of {len(data.entries)} entries"
          + (f" ({len(none)} more had no model prediction at all)." if none else "."), ""]
    if not data.entries:
        L += ["No position was opened on this day.", ""]
    elif not low:
        L += ["None: every entry of the day was taken at or above the threshold.", ""]
    else:
        rows, more = _listed(low, "entries")
        L += _table(["#", "symbol", "side", "entry", "arm", "best conf", "conf min", "PnL"], [
            [e["position_id"], f"{e['exchange']}:{e['symbol']}", _side(e["side"]), _time(e["entry_ts"]),
             e["arm"] or "-", f"{e['best_conf']:.3f}", f"{e['conf_min']:.2f}",
             _money(e["pnl"]) if e["pnl"] is not None else "open"] for e in rows]) + more + [""]

    L += ["## Vetoes by reason", ""]
    if not data.vetoes:
        L += [f"No veto on this day ({data.decisions['decisions']} decisions).", ""]
    else:
        L += [f"{data.decisions['vetoed']} of {data.decisions['decisions']} decisions carried at least one veto "
              "(a decision can carry several).", ""]
        L += _table(["reason", "decisions"], [[v["reason"], v["decisions"]] for v in data.vetoes]) + [""]

    L += ["## Kill switch and risk guards", ""]
    if not data.events:
        L += ["No kill-switch trip, reset or risk-guard trip on this day.", ""]
    else:
        L += [f"Kill-switch trips: **{agg['kill_switch_trips']}**, resets: **{agg['kill_switch_resets']}**"
              + "".join(f", {k.replace('_', ' ')}: **{n}**" for k, n in agg["risk_guard_trips"].items()) + ".", ""]
        L += _table(["time", "event", "reason", "strategy"], [
            [_time(e["ts"]), e["kind"], e["reason"], e["source"]] for e in data.events]) + [""]

    L += ["## Model quality", ""]
    if not data.models:
        L += ["No prediction of this day has a matured label yet: nothing to score.", ""]
    else:
        def ece(model: str, kind: str) -> str:
            v = data.ece(model, kind)
            return "-" if v is None else f"{v:.3f}"

        L += _table(["model", "labels", "accuracy", "log loss", "Brier", "ECE", "ECE (raw)"], [
            [m["model"], m["n"], f"{m['accuracy']:.3f}", f"{m['log_loss']:.4f}", f"{m['brier']:.4f}",
             ece(m["model"], "calibrated"), ece(m["model"], "raw")]
            for m in data.models]) + ["", "Predictions of the day's bars against their matured labels "
                                          "(Brier: sum over the three classes, lower is better; ECE: classwise "
                                          "expected calibration error of the probabilities the gates read, and of "
                                          "the model's raw output, 10 bins; models/calibration.py).", ""]

    L += ["---", "", "Every number above comes from a named query in `dataflows/report.py` "
          f"({', '.join(QUERIES)}).", ""]
    return "\n".join(L)


def write_report(store: Store, day: date, out_dir: Path, *, strategy: str = "production",
                 llm: Optional[LlmConfig] = None, low_conf: float = LOW_CONF) -> Path:
    """Write ``out_dir/report-YYYY-MM-DD.md`` and its charts (``report-YYYY-MM-DD-equity.png``,
    ``report-YYYY-MM-DD-pnl.png``, each only when there is something to draw); returns the
    markdown's path. ``llm``: an LLM summary from the aggregates (None: no summary)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(store, day, strategy=strategy, low_conf=low_conf)
    stem = f"report-{day.isoformat()}"
    if data.equity:
        equity_chart(data, out_dir / f"{stem}-equity.png")
        data.charts["equity"] = f"{stem}-equity.png"
    if data.trades:
        pnl_chart(data, out_dir / f"{stem}-pnl.png")
        data.charts["pnl"] = f"{stem}-pnl.png"
    summary = llm_summary(llm, aggregates_of(data)) if llm is not None else None
    path = out_dir / f"{stem}.md"
    path.write_text(render(data, summary, llm_failed=llm is not None and summary is None), encoding="utf-8")
    log.info("report written", extra={"path": str(path), "day": day.isoformat(), "strategy": strategy})
    return path
