"""Read-backs from the store for summaries (run summary, killswitch status)."""

from __future__ import annotations

import math
from typing import Optional

from sinks.clickhouse import Store

MINUTES_PER_YEAR = 365 * 24 * 60


def strategy_summary(store: Store, initial_equity: float) -> list[dict]:
    """Per strategy/variant: PnL, ROI, trades, win rate, Sharpe (per-minute equity returns,
    annualised) and max drawdown, from the stored fills and equity."""
    _, fills = store.query(
        "SELECT origin, strategy_id, variant_id, count() AS trades, countIf(realised_pnl > 0) AS wins, "
        "sum(realised_pnl) AS realised, sum(fee) AS fees FROM fills FINAL "
        "WHERE realised_pnl IS NOT NULL GROUP BY origin, strategy_id, variant_id")
    by = {(o, s, v): {"trades": t, "wins": w, "realised": r or 0.0} for o, s, v, t, w, r, _ in fills}
    _, series = store.query(
        "SELECT origin, strategy_id, variant_id, toStartOfMinute(ts) AS m, argMax(equity, (ts, seq)) AS eq, "
        "max(drawdown) AS dd FROM equity FINAL GROUP BY origin, strategy_id, variant_id, m "
        "ORDER BY origin, strategy_id, variant_id, m")
    curves: dict = {}
    for o, s, v, _, eq, dd in series:
        c = curves.setdefault((o, s, v), {"eq": [], "dd": 0.0})
        c["eq"].append(eq)
        c["dd"] = max(c["dd"], dd)
    out = []
    for key in sorted(set(by) | set(curves)):
        f = by.get(key, {"trades": 0, "wins": 0, "realised": 0.0})
        c = curves.get(key, {"eq": [], "dd": 0.0})
        last = c["eq"][-1] if c["eq"] else initial_equity
        out.append({
            "origin": key[0], "strategy_id": key[1], "variant_id": key[2],
            "pnl": last - initial_equity, "roi": last / initial_equity - 1, "realised_pnl": f["realised"],
            "trades": f["trades"], "win_rate": f["wins"] / f["trades"] if f["trades"] else None,
            "sharpe": sharpe([initial_equity] + c["eq"]), "max_drawdown": c["dd"],
        })
    return out


def sharpe(equity: list[float], periods_per_year: int = MINUTES_PER_YEAR) -> Optional[float]:
    """Annualised Sharpe of per-period simple returns of an equity curve (None if undefined)."""
    rets = [b / a - 1 for a, b in zip(equity, equity[1:]) if a > 0]
    if len(rets) < 2:
        return None
    mean = sum(rets) / len(rets)
    var = sum((r - mean) ** 2 for r in rets) / (len(rets) - 1)
    return mean / math.sqrt(var) * math.sqrt(periods_per_year) if var > 0 else None


def kill_switch_status(store: Store) -> list[dict]:
    cols, rows = store.query(
        "SELECT source, argMax(kind, ts) AS last_kind, max(ts) AS at, argMax(reason, ts) AS reason "
        "FROM events FINAL WHERE kind IN ('kill_switch', 'kill_switch_reset') GROUP BY source ORDER BY source")
    return [dict(zip(cols, r)) for r in rows]


def leaderboard(store: Store, strategy_id: Optional[str] = None) -> list[dict]:
    """The newest metrics row of every variant (and production), best deflated Sharpe first."""
    where = "WHERE strategy_id = {sid:String}" if strategy_id else ""
    cols, rows = store.query(
        "SELECT origin, strategy_id, variant_id, argMax(status, ts) AS status, max(ts) AS at, "
        "argMax(runtime_ms, ts) AS runtime_ms, argMax(trades, ts) AS trades, argMax(roi, ts) AS roi, "
        "argMax(win_rate, ts) AS win_rate, argMax(sharpe, ts) AS sharpe, argMax(sortino, ts) AS sortino, "
        "argMax(max_drawdown, ts) AS max_drawdown, argMax(dsr, ts) AS dsr, argMax(config, ts) AS config "
        f"FROM variant_metrics FINAL {where} GROUP BY origin, strategy_id, variant_id "
        "ORDER BY origin = 'production' DESC, ifNull(dsr, -1) DESC, ifNull(sharpe, -1e9) DESC",
        {"sid": strategy_id} if strategy_id else None)
    return [dict(zip(cols, r)) for r in rows]


def promotions(store: Store) -> list[dict]:
    cols, rows = store.query("SELECT ts, reason, detail FROM events FINAL WHERE kind = 'promotion' ORDER BY ts")
    return [dict(zip(cols, r)) for r in rows]
