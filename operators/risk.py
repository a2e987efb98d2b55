"""Risk: exits and guards as small pure functions and one small state class. No
bytewax, no I/O.

Exits are checked on every 1m bar of the instrument, against that bar's open, high and low:

- stop loss: ``stop_loss_pct`` from the ENTRY price, never from the peak (Ensemble's
  ``trader.py`` measured it from the peak, so a position up 100% could give back 50% and more);
- trailing stop: once the best price since entry (peak for a long, trough for a short) has gone
  ``trailing_activation_pct`` beyond the entry, a stop ``trailing_distance_pct`` from that best
  price. The peak used is the one through the PREVIOUS bar; the bar's own high (low) updates it
  after the check, because the order of high and low inside a bar is unknown;
- take profit ``take_profit_pct`` from entry; ATR stop / take profit at ``atr_sl_mult`` /
  ``atr_tp_mult`` x the ATR recorded at entry.

Of the protective stops the one nearest the price is in force (highest for a long); of the
targets the nearest too. A bar that opens beyond a level fills at the open (a gap); otherwise at
the level. Same-bar ambiguity: when the bar's range touches both the stop and the target, the stop
is assumed to have been hit first (against the strategy). Time stop and opposite signal are
decisions taken at a bar close and fill at the next bar's open (see ``paper``).

Guards (``RiskState``): drawdown kill switch (halts until an explicit ``reset``), daily loss
limit (pauses until the next UTC day) and consecutive-loss breaker (pauses until the next UTC
day). ``RiskEvent`` is the record written when one trips or resets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from operators.decision import Tagged
from operators.records import DAY_MS, Event
from operators.strategy_config import StrategyConfig

# order of precedence among stops / targets at the same level
STOP_REASONS = ("stop_loss", "atr_stop", "trailing_stop")
TARGET_REASONS = ("take_profit", "atr_take_profit")
EXIT_REASONS = STOP_REASONS + TARGET_REASONS + ("time_stop", "opposite_signal", "kill_switch")


class RiskEvent(Tagged, kw_only=True):
    ts: int
    kind: str                  # kill_switch | kill_switch_reset | daily_loss_limit | consecutive_losses
    #                            | pause_end | order_cancelled
    reason: str
    detail: str = "{}"         # JSON
    exchange: str = ""
    symbol: str = ""

    def as_event(self) -> Event:
        """The same fact as an ``Event`` row (table ``events``)."""
        detail = json.loads(self.detail or "{}")
        detail.update(origin=self.origin, strategy_id=self.strategy_id, variant_id=self.variant_id,
                      config_hash=self.config_hash)
        return Event(kind=self.kind, ts=self.ts, exchange=self.exchange, symbol=self.symbol, reason=self.reason,
                     detail=json.dumps(detail, sort_keys=True),
                     source=f"strategy:{self.strategy_id}/{self.variant_id}")


def utc_day(ts_ms: int) -> int:
    return ts_ms // DAY_MS


def next_utc_day(ts_ms: int) -> int:
    """Start (ms) of the UTC day after the one containing ``ts_ms``."""
    return (ts_ms // DAY_MS + 1) * DAY_MS


def drawdown(equity: float, peak: float) -> float:
    return 0.0 if peak <= 0 else max(0.0, (peak - equity) / peak)


# --------------------------------------------------------------------------------------------
# exits
# --------------------------------------------------------------------------------------------

def stop_levels(cfg: StrategyConfig, side: int, entry: float, best: float,
                atr: Optional[float]) -> list[tuple[str, float]]:
    """Active protective stops as (reason, price). ``best`` = peak (long) or trough (short) through
    the previous bar."""
    out = []
    if cfg.stop_loss_pct > 0:
        out.append(("stop_loss", entry * (1 - side * cfg.stop_loss_pct)))
    if cfg.atr_sl_mult > 0 and atr is not None and atr > 0:
        out.append(("atr_stop", entry - side * cfg.atr_sl_mult * atr))
    if cfg.trailing_distance_pct > 0 and trailing_active(cfg, side, entry, best):
        out.append(("trailing_stop", best * (1 - side * cfg.trailing_distance_pct)))
    return out


def trailing_active(cfg: StrategyConfig, side: int, entry: float, best: float) -> bool:
    """The best price has moved ``trailing_activation_pct`` in our favour (>= for a long)."""
    if side > 0:
        return best >= entry * (1 + cfg.trailing_activation_pct)
    return best <= entry * (1 - cfg.trailing_activation_pct)


def target_levels(cfg: StrategyConfig, side: int, entry: float, atr: Optional[float]) -> list[tuple[str, float]]:
    out = []
    if cfg.take_profit_pct > 0:
        out.append(("take_profit", entry * (1 + side * cfg.take_profit_pct)))
    if cfg.atr_tp_mult > 0 and atr is not None and atr > 0:
        out.append(("atr_take_profit", entry + side * cfg.atr_tp_mult * atr))
    return out


def nearest(levels: list[tuple[str, float]], side: int, kind: str) -> Optional[tuple[str, float]]:
    """The level the price meets first: for a long the highest stop / lowest target, for a short
    the lowest stop / highest target. Ties keep the earlier reason."""
    if not levels:
        return None
    hi = (side > 0) == (kind == "stop")
    best = levels[0]
    for lv in levels[1:]:
        if (lv[1] > best[1]) if hi else (lv[1] < best[1]):
            best = lv
    return best


@dataclass(frozen=True)
class ExitHit:
    reason: str
    price: float               # reference price before slippage (level, or the open on a gap)
    level: float


def check_exit(cfg: StrategyConfig, side: int, entry: float, best: float, atr: Optional[float],
               bar_open: float, high: float, low: float) -> Optional[ExitHit]:
    """The exit triggered inside one bar, if any, with stop-first resolution of ambiguity."""
    stop = nearest(stop_levels(cfg, side, entry, best, atr), side, "stop")
    target = nearest(target_levels(cfg, side, entry, atr), side, "target")
    if side > 0:
        # the open is the first price of the bar: a gap through a level decides alone
        if stop and bar_open <= stop[1]:
            return ExitHit(stop[0], bar_open, stop[1])
        if target and bar_open >= target[1]:
            return ExitHit(target[0], bar_open, target[1])
        if stop and low <= stop[1]:
            return ExitHit(stop[0], stop[1], stop[1])  # also when the high touched the target
        if target and high >= target[1]:
            return ExitHit(target[0], target[1], target[1])
    else:
        if stop and bar_open >= stop[1]:
            return ExitHit(stop[0], bar_open, stop[1])
        if target and bar_open <= target[1]:
            return ExitHit(target[0], bar_open, target[1])
        if stop and high >= stop[1]:
            return ExitHit(stop[0], stop[1], stop[1])
        if target and low <= target[1]:
            return ExitHit(target[0], target[1], target[1])
    return None


def time_stop_due(cfg: StrategyConfig, entry_ts: int, now_ts: int, primary_ms: int) -> bool:
    """Held for ``time_stop_bars`` primary bars (measured from the entry fill to ``now_ts``)."""
    return cfg.time_stop_bars > 0 and now_ts - entry_ts >= cfg.time_stop_bars * primary_ms


def is_opposite(position_side: int, signal_side: int) -> bool:
    return signal_side != 0 and signal_side == -position_side


# --------------------------------------------------------------------------------------------
# guards
# --------------------------------------------------------------------------------------------

@dataclass
class Trip:
    """A guard that tripped: becomes a RiskEvent in the engine."""

    kind: str
    reason: str
    detail: dict


@dataclass
class RiskState:
    """Portfolio guards of one strategy. Plain data: picklable and deep-copyable.

    ``on_mark`` after every equity mark, ``on_trade_closed`` after every exit, ``advance`` when
    time moves (day roll, end of pauses), ``blocked`` before an entry."""

    peak: float
    day: int = -1
    day_start_equity: float = 0.0
    halted: bool = False
    halted_at: Optional[int] = None
    daily_paused_until: Optional[int] = None
    streak_paused_until: Optional[int] = None
    consecutive_losses: int = 0
    max_drawdown_seen: float = 0.0
    resets: int = 0
    last_exit_ts: dict = field(default_factory=dict)   # instrument -> ts of the last exit fill

    def advance(self, ts: int, equity: float) -> list[Trip]:
        """Roll the UTC day (the new day starts from the current equity) and end expired pauses."""
        trips = []
        d = utc_day(ts)
        if d > self.day:
            self.day = d
            self.day_start_equity = equity
        if self.daily_paused_until is not None and ts >= self.daily_paused_until:
            trips.append(Trip("pause_end", "daily_loss_limit", {"paused_until": self.daily_paused_until}))
            self.daily_paused_until = None
        if self.streak_paused_until is not None and ts >= self.streak_paused_until:
            trips.append(Trip("pause_end", "consecutive_losses", {"paused_until": self.streak_paused_until}))
            self.streak_paused_until = None
        return trips

    def on_mark(self, cfg: StrategyConfig, ts: int, equity: float, day_ts: Optional[int] = None) -> list[Trip]:
        """Update the peak and check the kill switch and the daily loss limit at one mark at ``ts``.
        ``day_ts`` says which UTC day the mark closes (a 1m bar's start: the mark at a bar's end
        of 00:00 still closes the previous day); default ``ts``."""
        trips = []
        self.peak = max(self.peak, equity)
        dd = drawdown(equity, self.peak)
        self.max_drawdown_seen = max(self.max_drawdown_seen, dd)
        if cfg.max_drawdown > 0 and not self.halted and dd >= cfg.max_drawdown:
            self.halted, self.halted_at = True, ts
            trips.append(Trip("kill_switch", "drawdown_limit",
                              {"equity": equity, "peak": self.peak, "drawdown": dd, "limit": cfg.max_drawdown}))
        if cfg.daily_loss_limit > 0 and self.daily_paused_until is None and self.day_start_equity > 0:
            loss = (self.day_start_equity - equity) / self.day_start_equity
            if loss >= cfg.daily_loss_limit:
                self.daily_paused_until = next_utc_day(ts if day_ts is None else day_ts)
                trips.append(Trip("daily_loss_limit", "daily_loss_limit",
                                  {"equity": equity, "day_start_equity": self.day_start_equity, "loss": loss,
                                   "limit": cfg.daily_loss_limit, "paused_until": self.daily_paused_until}))
        return trips

    def on_trade_closed(self, cfg: StrategyConfig, ts: int, instrument: str, net_pnl: float) -> list[Trip]:
        self.last_exit_ts[instrument] = ts
        if net_pnl < 0:
            self.consecutive_losses += 1
        else:
            self.consecutive_losses = 0
        if cfg.max_consecutive_losses > 0 and self.consecutive_losses >= cfg.max_consecutive_losses:
            n, self.consecutive_losses = self.consecutive_losses, 0
            self.streak_paused_until = next_utc_day(ts)
            return [Trip("consecutive_losses", "consecutive_losses",
                         {"losses": n, "limit": cfg.max_consecutive_losses,
                          "paused_until": self.streak_paused_until})]
        return []

    def blocked(self, ts: int) -> list[str]:
        """Reasons an entry at ``ts`` is refused by the portfolio guards (empty: allowed)."""
        out = []
        if self.halted:
            out.append("drawdown_limit")
        if self.daily_paused_until is not None and ts < self.daily_paused_until:
            out.append("daily_loss_limit")
        if self.streak_paused_until is not None and ts < self.streak_paused_until:
            out.append("consecutive_losses")
        return out

    def in_cooldown(self, cfg: StrategyConfig, instrument: str, ts: int, primary_ms: int) -> bool:
        last = self.last_exit_ts.get(instrument)
        return cfg.cooldown_bars > 0 and last is not None and ts < last + cfg.cooldown_bars * primary_ms

    def reset(self, ts: int, equity: float) -> dict:
        """Lift the kill switch; the peak restarts at the current equity (otherwise the next mark
        would trip it again). Returns the audit detail."""
        detail = {"was_halted": self.halted, "halted_at": self.halted_at, "old_peak": self.peak,
                  "new_peak": equity, "equity": equity}
        self.halted, self.halted_at = False, None
        self.peak = equity
        self.resets += 1
        return detail

    @property
    def paused_until(self) -> Optional[int]:
        ps = [p for p in (self.daily_paused_until, self.streak_paused_until) if p is not None]
        return max(ps) if ps else None


def trip_detail(detail: dict) -> str:
    return json.dumps(detail, sort_keys=True, default=float)
