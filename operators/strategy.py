"""The strategy engine: scored rows in, decisions, fills, equity and risk events out.
Pure logic: no bytewax, no I/O. One engine per strategy (production or an optimizer variant); its
whole state is this object (plain Python + a numpy Generator), so bytewax can pickle and
deep-copy it every epoch.

Time: decisions happen at the scored bar's end (``row.end``); guards and pauses run on event
time, never on the wall clock, so a replay makes the same rows. ``now_ms`` is only recorded
(``Decision.decided_at``) for latency accounting.

``on_scored(row, quality, now_ms)`` gives exactly one ``Decision`` per row (plus ``RiskEvent``s
when a pause ends):

1. gates on the signal: primary timeframe (``not_primary_tf`` when ``cfg.primary_tf`` is set and
   differs), data quality (``quality`` not None/""/"ok", e.g. ``"data_gap"``: nothing opens, no
   signal acts, and the reason is the quality flag), warm-up (``not_warm``);
2. arms (``decision.evaluate_arms``, always recorded) with the no-trade zone (``low_conf_veto``);
   on a usable signal the bandit picks one eligible arm; its side is the signal;
3. with a position on the instrument: an opposite signal closes it (``opposite_signal``, filled at
   the next 1m open) when the signal gates passed; anything else holds;
4. without one: consensus (vetoes, or only records ``shadow_vetoes`` in shadow mode), kill switch
   (``drawdown_limit``), daily loss pause (``daily_loss_limit``), loss-streak pause
   (``consecutive_losses``), ``cooldown``, ``max_positions``, ``order_pending``, sizing; if all
   pass, an entry order waits for the next 1m bar's open.

``on_bar(bar)`` for each closed 1m bar of any instrument: fill that instrument's pending order at
the bar's open (an entry is cancelled, with an ``order_cancelled`` event, if a guard tripped
since the decision), check stops / targets on the bar's range (stop first when both are
touched), update peak / trough, schedule a time stop, mark equity at the close, check the kill
switch and the daily loss limit, pay the bandit the rewards that matured
(``label_horizon`` primary bars after the decision), and emit one ``EquityPoint``.

Summary Sharpe: per-minute equity returns (one equity value per distinct mark time, the last mark
of that minute), mean / std (ddof=1) x sqrt(525,600 minutes per year) (``stats.sharpe_from_moments``
with ``MINUTES_PER_YEAR``): crypto trades around the clock, so a year is 365 x 24 x 60 minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from operators.bandit import GaussianThompson, reward_from_bps
from operators.bars import TIMEFRAMES, Bar
from operators.decision import (ArmSignal, Decision, best_p_win, consensus, entry_atr, evaluate_arms,
                                size_position)
from operators.execution import Execution
from operators.paper import ClosedTrade, EquityPoint, PaperBook
from operators.records import HOUR_MS, MINUTES_PER_YEAR
from operators.risk import (RiskEvent, RiskState, Trip, check_exit, drawdown, is_opposite, time_stop_due,
                            trip_detail)
from operators.signals import ScoredRow
from operators.stats import sharpe_from_moments
from operators.strategy_config import StrategyConfig

MARK_MEMORY_MS = 6 * HOUR_MS  # how far back EquityPoint.seq remembers mark times (see _mark_seq)

__all__ = ["StrategyEngine"]


@dataclass
class RewardDue:
    """A bandit reward waiting for its horizon: the decision's position and arm."""

    position_id: int
    arm: str
    instrument: str
    maturity: int               # decision ts + label_horizon primary bars
    final_bps: Optional[float] = None   # set when the position closed before maturity


class StrategyEngine:
    """One strategy. Its orders go to ``execution`` (``book``, an ``operators.execution.Execution``;
    default: a ``PaperBook`` with the config's initial equity, fee and slippage and the engine's tags)."""

    def __init__(self, cfg: StrategyConfig, origin: str = "production", strategy_id: str = "ensemble",
                 variant_id: str = "base", execution: Optional[Execution] = None) -> None:
        if origin not in ("production", "experimental"):
            raise ValueError(f"origin must be 'production' or 'experimental', got {origin!r}")
        self.cfg = cfg
        self.origin = origin
        self.strategy_id = strategy_id
        self.variant_id = variant_id
        self.config_hash = cfg.config_hash()
        self.tags = {"origin": origin, "strategy_id": strategy_id, "variant_id": variant_id,
                     "config_hash": self.config_hash}
        self.bandit = GaussianThompson.from_config(cfg)
        self.book: Execution = (PaperBook(cfg.initial_equity, cfg.fee_bps, cfg.slippage_bps, dict(self.tags))
                                if execution is None else execution)
        self.risk = RiskState(peak=cfg.initial_equity)
        self.rewards: list[RewardDue] = []
        self.marks_at: dict[int, int] = {}  # recent mark times -> equity points made at that ts (EquityPoint.seq)
        self.actions: dict[str, int] = {}
        self.vetoes: dict[str, int] = {}
        self.rewards_paid = 0
        # per-minute equity returns (Welford) for the Sharpe ratio
        self._curve_ts: Optional[int] = None
        self._curve_eq: Optional[float] = None
        self._curve_prev: Optional[float] = None
        self._ret_n = 0
        self._ret_mean = 0.0
        self._ret_m2 = 0.0

    # ------------------------------------------------------------------ status
    @property
    def halted(self) -> bool:
        return self.risk.halted

    @property
    def paused_until(self) -> Optional[int]:
        return self.risk.paused_until

    def equity(self) -> float:
        return self.book.equity()

    def status(self, ts: Optional[int] = None) -> dict:
        return {"halted": self.risk.halted, "halted_at": self.risk.halted_at, "paused_until": self.paused_until,
                "blocked": self.risk.blocked(ts) if ts is not None else None,
                "consecutive_losses": self.risk.consecutive_losses, "equity": self.book.equity(),
                "peak": self.risk.peak, "open_positions": len(self.book.positions),
                "pending_orders": len(self.book.pending)}

    # ------------------------------------------------------------------ records
    def _event(self, ts: int, trip: Trip, instrument: str = "") -> RiskEvent:
        ex, _, sym = instrument.partition(":")
        return RiskEvent(**self.tags, ts=ts, kind=trip.kind, reason=trip.reason, detail=trip_detail(trip.detail),
                         exchange=ex, symbol=sym)

    def _advance(self, ts: int) -> list:
        return [self._event(ts, t) for t in self.risk.advance(ts, self.book.equity())]

    # ------------------------------------------------------------------ decisions
    def on_scored(self, row: ScoredRow, quality: Optional[str] = None, now_ms: int = 0) -> list:
        cfg = self.cfg
        ts = row.end
        out: list = self._advance(ts)
        inst = row.instrument
        primary_ms = TIMEFRAMES.get(row.tf) or max(1, row.end - row.start)
        view = evaluate_arms(cfg, row.features, row.predictions)
        passed: list[str] = []
        failed: list[str] = []
        vetoes: list[str] = []
        shadow: list[str] = []

        def gate(name: str, ok: bool, reason: str) -> bool:
            if ok:
                passed.append(name)
            else:
                failed.append(name)
                if reason not in vetoes:
                    vetoes.append(reason)
            return ok

        # 1. is the signal usable at all
        if cfg.primary_tf:
            gate("timeframe", row.tf == cfg.primary_tf, "not_primary_tf")
        q = quality or ""
        gate("data_quality", q in ("", "ok"), q)
        if cfg.require_warm:
            gate("warm", bool(row.warm), "not_warm")
        signal_ok = not failed

        # 2. arms, no-trade zone, bandit (only on a usable signal: the bandit's picks are real ones)
        chosen, draws = None, {}
        if signal_ok:
            gate("no_trade_zone", not view.low_conf_vetoed, "low_conf_veto")
            if view.eligible:
                chosen, draws = self.bandit.select(view.eligible)
            if not gate("eligible_arm", chosen is not None, "no_eligible_arm"):
                for a in view.arms:
                    if a.arm in cfg.arms:
                        for r in a.reasons:
                            if r not in ("disabled", "low_conf_veto") and r not in vetoes:
                                vetoes.append(r)
        sig: Optional[ArmSignal] = view.get(chosen) if chosen else None
        side = sig.side if sig else 0

        action, reason, pid = "none", "", 0
        trend = None
        sizing = None
        pos = self.book.positions.get(inst)
        if pos is not None:
            # 3. manage the open position
            if pos.closing or self.book.has_order(inst):
                action, reason = "hold", "exit_pending"
            elif signal_ok and cfg.exit_on_opposite and is_opposite(pos.side, side):
                pid = self.book.submit_close(inst, ts, "opposite_signal") or 0
                action, reason = "close", "opposite_signal"
            else:
                action, reason = "hold", "in_position"
        else:
            # 4. entry gates
            if side != 0 and cfg.consensus_enabled:
                c = consensus(cfg, side, row.features, row.overlay_ok, row.predictions)
                trend = c.trend
                if c.veto and cfg.consensus_shadow:
                    passed.append("consensus")
                    shadow.append("consensus_veto")
                else:
                    gate("consensus", not c.veto, "consensus_veto")
            blocked = self.risk.blocked(ts)
            gate("kill_switch", "drawdown_limit" not in blocked, "drawdown_limit")
            gate("daily_loss", "daily_loss_limit" not in blocked, "daily_loss_limit")
            gate("consecutive_losses", "consecutive_losses" not in blocked, "consecutive_losses")
            gate("cooldown", not self.risk.in_cooldown(cfg, inst, ts, primary_ms), "cooldown")
            gate("max_positions", cfg.max_positions <= 0 or self.book.open_count() < cfg.max_positions,
                 "max_positions")
            gate("order_pending", not self.book.has_order(inst), "order_pending")
            if sig is not None:
                p = sig.p_win if sig.model else best_p_win(row.predictions, side)
                sizing = size_position(cfg, side, sig.strength, view.rv, p, self.book.equity())
                gate("sizing", sizing.notional > 0, sizing.reason)
            if not vetoes and sig is not None and sizing is not None:
                pid = self.book.submit_open(inst, row.exchange, row.symbol, side, sizing.notional, ts, chosen,
                                            entry_atr(row.features), primary_ms)
                self.rewards.append(RewardDue(pid, chosen, inst, ts + cfg.label_horizon * primary_ms))
                action = "open_long" if side > 0 else "open_short"
                reason = "entry"
            else:
                reason = vetoes[0] if vetoes else "no_signal"
        if action in ("hold", "close") and not reason:
            reason = "in_position"
        self.actions[action] = self.actions.get(action, 0) + 1
        for v in vetoes:
            self.vetoes[v] = self.vetoes.get(v, 0) + 1
        out.insert(0, Decision(
            **self.tags, ts=ts, decided_at=now_ms, exchange=row.exchange, symbol=row.symbol, tf=row.tf,
            bar_start=row.start, close=row.close, action=action, side=side, arm=chosen or "", reason=reason,
            arms=view.arms, gates_passed=tuple(passed), gates_failed=tuple(failed), vetoes=tuple(vetoes),
            shadow_vetoes=tuple(shadow), quality=q, best_conf=view.best_conf, conf_min=view.conf_min, rv=view.rv,
            trend=trend, size_frac=sizing.frac if sizing else 0.0, vol_scale=sizing.vol_scale if sizing else 1.0,
            kelly=sizing.kelly if sizing else None,
            notional=sizing.notional if (sizing and action.startswith("open")) else 0.0,
            position_id=pid or (pos.position_id if pos is not None else 0), bandit_draws=draws))
        return out

    # ------------------------------------------------------------------ bars
    def on_bar(self, bar: Bar) -> list:
        cfg = self.cfg
        inst = f"{bar.exchange}:{bar.symbol}"
        out: list = self._advance(bar.start)

        # 0. funding due at or before this bar's start, on the position held through it (announcements
        # this bar carries from before its start count: the minute before may have had no trade)
        self.book.note_funding(inst, getattr(bar, "perp", None), before=bar.start)
        out.extend(self.book.settle_funding(inst, bar.start))

        # 1. pending order -> fill at this bar's open (entries are dropped if a guard tripped since)
        order = self.book.pending.get(inst)
        if order is not None and order.kind == "open" and order.decision_ts <= bar.start:
            blocked = self.risk.blocked(bar.start)
            if blocked:
                self.book.cancel(inst)
                self.rewards = [r for r in self.rewards if r.position_id != order.position_id]
                out.append(self._event(bar.start, Trip("order_cancelled", blocked[0], {
                    "position_id": order.position_id, "decision_ts": order.decision_ts, "blocked": blocked}), inst))
        fills, closed = self.book.fill_pending(inst, bar.start, bar.open, getattr(bar, "walk", None))
        out.extend(fills)
        if closed is not None:
            out.extend(self._on_closed(closed, inst))

        # 2. protective exits on this bar's range, then extremes and the time stop
        pos = self.book.positions.get(inst)
        if pos is not None:
            hit = check_exit(cfg, pos.side, pos.entry_price, pos.best, pos.atr, bar.open, bar.high, bar.low)
            if hit is not None:
                fill, closed = self.book.close(inst, bar.start, hit.price, hit.reason, pos.decision_ts)
                out.append(fill)
                out.extend(self._on_closed(closed, inst))
            else:
                pos.peak = max(pos.peak, bar.high)
                pos.trough = min(pos.trough, bar.low)
                pos.bars_held += 1
                if not pos.closing and time_stop_due(cfg, pos.entry_ts, bar.end, pos.primary_ms):
                    self.book.submit_close(inst, bar.end, "time_stop")

        # 3. mark, the funding this bar announced, guards
        self.book.mark(inst, bar.close)
        self.book.note_funding(inst, getattr(bar, "perp", None))
        equity = self.book.equity()
        for trip in self.risk.on_mark(cfg, bar.end, equity, day_ts=bar.start):
            out.append(self._event(bar.end, trip, inst if trip.kind != "kill_switch" else ""))
            if trip.kind == "kill_switch" and cfg.flatten_on_halt:
                self._flatten(bar.end)

        # 4. bandit rewards that matured on this instrument
        self._pay_rewards(inst, bar)

        # 5. equity point
        self._record_curve(bar.end, equity)
        out.append(EquityPoint(
            **self.tags, ts=bar.end, seq=self._mark_seq(bar.end), equity=equity, cash=self.book.cash,
            realised_pnl=self.book.realised_gross, unrealised_pnl=equity - self.book.cash, fees=self.book.fees,
            exposure=self.book.exposure(), open_positions=len(self.book.positions), peak=self.risk.peak,
            drawdown=drawdown(equity, self.risk.peak), halted=self.risk.halted,
            funding=getattr(self.book, "funding", 0.0)))
        return out

    def _mark_seq(self, ts: int) -> int:
        """The equity point's version: the n-th mark of ``ts`` (one per instrument whose 1m bar ends
        at ts), so the last mark of a ts wins in ``equity`` (ReplacingMergeTree(seq)). Counted per
        ts, not over the run: the same bars give the same seq whatever came before (a resumed or
        repeated run writes the same rows). Mark times more than ``MARK_MEMORY_MS`` behind this one
        are forgotten (a bar that late would start its ts at 1 again)."""
        marks = self.__dict__.setdefault("marks_at", {})  # state pickled before marks_at existed
        n = marks[ts] = marks.get(ts, 0) + 1
        if len(marks) > 512:  # now and then: ~1 mark time a minute, 360 in MARK_MEMORY_MS
            for t in [t for t in marks if t < ts - MARK_MEMORY_MS]:
                del marks[t]
        return n

    def _on_closed(self, closed: ClosedTrade, inst: str) -> list:
        for r in self.rewards:
            if r.position_id == closed.position_id:
                r.final_bps = closed.pnl_bps
        return [self._event(closed.exit_ts, t, inst)
                for t in self.risk.on_trade_closed(self.cfg, closed.exit_ts, inst, closed.net_pnl)]

    def _flatten(self, ts: int) -> None:
        for inst in list(self.book.pending):
            if self.book.pending[inst].kind == "open":
                order = self.book.cancel(inst)
                self.rewards = [r for r in self.rewards if r.position_id != order.position_id]
        for inst in list(self.book.positions):
            self.book.submit_close(inst, ts, "kill_switch")

    def _pay_rewards(self, inst: str, bar: Bar) -> None:
        keep = []
        for r in self.rewards:
            if r.instrument != inst or r.maturity > bar.end:
                keep.append(r)
                continue
            bps = r.final_bps
            if bps is None:
                pos = self.book.positions.get(inst)
                if pos is not None and pos.position_id == r.position_id:
                    bps = self.book.mark_to_exit_bps(pos, bar.close)
                elif inst in self.book.pending and self.book.pending[inst].position_id == r.position_id:
                    keep.append(r)  # not filled yet (no bar since the decision): wait
                    continue
            if bps is not None:
                self.bandit.update(r.arm, reward_from_bps(self.cfg, bps))
                self.rewards_paid += 1
        self.rewards = keep

    # ------------------------------------------------------------------ kill switch
    def reset_kill_switch(self, ts_ms: int, by: str) -> RiskEvent:
        """Lift the drawdown kill switch (audited). The equity peak restarts at the current equity."""
        detail = self.risk.reset(ts_ms, self.book.equity())
        detail["by"] = by
        return self._event(ts_ms, Trip("kill_switch_reset", "manual_reset", detail))

    # ------------------------------------------------------------------ summary
    def _record_curve(self, ts: int, equity: float) -> None:
        if self._curve_ts is None:
            self._curve_ts, self._curve_eq = ts, equity
            return
        if ts > self._curve_ts:
            if self._curve_prev is not None and self._curve_prev > 0:
                self._push_return(self._curve_eq / self._curve_prev - 1.0)
            self._curve_prev = self._curve_eq
            self._curve_ts = ts
        self._curve_eq = equity

    def _push_return(self, r: float) -> None:
        self._ret_n += 1
        d = r - self._ret_mean
        self._ret_mean += d / self._ret_n
        self._ret_m2 += d * (r - self._ret_mean)

    def sharpe(self) -> float:
        """The annualised Sharpe ratio of the per-minute equity returns so far (0.0 when undefined)."""
        n, mean, m2 = self._ret_n, self._ret_mean, self._ret_m2
        if self._curve_prev is not None and self._curve_prev > 0:  # the open minute counts too
            r = self._curve_eq / self._curve_prev - 1.0
            n += 1
            d = r - mean
            mean += d / n
            m2 += d * (r - mean)
        s = sharpe_from_moments(n, mean, m2 / (n - 1) if n >= 2 else 0.0, MINUTES_PER_YEAR)
        return 0.0 if s is None else s

    def summary(self) -> dict:
        b = self.book
        equity = b.equity()
        return {
            "origin": self.origin, "strategy_id": self.strategy_id, "variant_id": self.variant_id,
            "config_hash": self.config_hash,
            "equity": equity, "pnl": equity - self.cfg.initial_equity,
            "roi": equity / self.cfg.initial_equity - 1.0,
            "realised_pnl": b.realised_gross - b.fees, "fees": b.fees,
            "trades": b.trades, "wins": b.wins, "win_rate": b.wins / b.trades if b.trades else 0.0,
            "avg_pnl": (b.gross_profit - b.gross_loss) / b.trades if b.trades else 0.0,
            "profit_factor": (b.gross_profit / b.gross_loss if b.gross_loss > 0
                              else math.inf if b.gross_profit > 0 else 0.0),
            "sharpe": self.sharpe(), "max_drawdown": self.risk.max_drawdown_seen,
            "open_positions": len(b.positions), "halted": self.risk.halted, "paused_until": self.paused_until,
            "actions": dict(self.actions), "vetoes": dict(self.vetoes), "rewards_paid": self.rewards_paid,
            "bandit": self.bandit.snapshot(),
        }
