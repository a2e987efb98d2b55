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
