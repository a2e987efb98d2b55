"""Roll-ups: closed 1m bars merged into the bars of higher timeframes (5m ... 1d), the open periods
per instrument, and ``BarGroup``, what one closed minute produces. Pure logic, no bytewax.

Roll-ups merge closed 1m bars. Every field merges exactly: sums add, the running-delta
extremes shift by the delta accumulated before each sub-bar, and volume profiles add bin by
bin, so a 1h bar equals the bar one would compute from the hour's trades directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec

from operators.bars import Bar, finish_bar, tf_ms, with_value_area
from operators.perp import merge as merge_perp
from operators.volume_profiles import add_profiles, scaled_bin

_ADDITIVE = ("volume", "notional", "trades", "buy_volume", "sell_volume", "parent_orders",
             "pro_orders", "amateur_orders", "pros_gross", "pros_net", "amateurs_gross", "amateurs_net")


def merge(acc: Bar, bar: Bar, tf: str, start: int, end: int, value_area_fraction: float | None) -> Bar:
    """``acc`` (earlier sub-bars of a period) followed by ``bar`` -> the period's bar so far.
    With ``value_area_fraction=None`` POC/VAH/VAL are left for ``with_value_area`` (roll-ups
    compute them once, when the period is emitted). Profiles on different bins (a coarse
    sub-bar) are re-binned onto the coarser one (see ``add_profiles``)."""
    base = acc.profile_bin / acc.profile_scale
    if not math.isclose(base, bar.profile_bin / bar.profile_scale, rel_tol=1e-9):
        raise ValueError(f"instrument profile bin changed inside {acc.instrument} {tf} bar at {start}")
    profile, scale = add_profiles(acc.profile, acc.profile_scale, bar.profile, bar.profile_scale)
    profile_bin = (acc.profile_bin if scale == acc.profile_scale else
                   bar.profile_bin if scale == bar.profile_scale else scaled_bin(base, scale))
    return finish_bar(
        exchange=acc.exchange, symbol=acc.symbol, tf=tf, start=start, end=end,
        open=acc.open, high=max(acc.high, bar.high), low=min(acc.low, bar.low), close=bar.close,
        **{k: getattr(acc, k) + getattr(bar, k) for k in _ADDITIVE},
        min_delta=min(acc.min_delta, acc.delta + bar.min_delta),
        max_delta=max(acc.max_delta, acc.delta + bar.max_delta),
        largest_trade=max(acc.largest_trade, bar.largest_trade),
        largest_notional=max(acc.largest_notional, bar.largest_notional),
        pro_threshold=bar.pro_threshold, amateur_threshold=bar.amateur_threshold,
        profile_bin=profile_bin, profile=profile, profile_scale=scale, va_fraction=value_area_fraction,
        perp=merge_perp(acc.perp, bar.perp),
    )


def as_period(bar: Bar, tf: str, start: int, end: int) -> Bar:
    """A 1m bar relabelled as the first sub-bar of a higher-timeframe period (profiles are
    never modified, so the period shares the minute's)."""
    return msgspec.structs.replace(bar, tf=tf, start=start, end=end, walk=None)


class BarGroup(msgspec.Struct, frozen=True):
    """The bars one closed 1m bar produced: that minute and the higher periods it closed, in
    (end, timeframe) order. Downstream sees them together, e.g. a 5m bar with the 1h bar that
    closed at the same moment."""

    bars: list


@dataclass
class RollupState:
    """Per instrument: the open (partial) bar of every higher timeframe."""

    open: dict = field(default_factory=dict)  # tf -> Bar (partial; bars are replaced, never mutated)
    last_end: int | None = None  # end of the newest 1m bar seen

    def __deepcopy__(self, memo: dict) -> "RollupState":
        return RollupState(dict(self.open), self.last_end)


def rollup(state: RollupState, bar: Bar, timeframes: list[str], value_area_fraction: float) -> list[Bar]:
    """Feed a closed 1m bar; return the higher-timeframe bars it closes (oldest first).

    A period closes as soon as its last minute is in, or when a later minute arrives.
    """
    out: list[Bar] = []
    state.last_end = bar.end if state.last_end is None else max(state.last_end, bar.end)
    for tf in timeframes:
        ms = tf_ms(tf)
        start = bar.start - bar.start % ms
        acc = state.open.get(tf)
        if acc is not None and acc.start != start:
            out.append(acc)
            acc = None
        acc = as_period(bar, tf, start, start + ms) if acc is None else merge(
            acc, bar, tf, start, start + ms, None)
        if bar.end >= start + ms:
            out.append(acc)
            state.open.pop(tf, None)
        else:
            state.open[tf] = acc
    return _emit(out, value_area_fraction)


def close_until(state: RollupState, watermark: int, value_area_fraction: float) -> list[Bar]:
    """Close every open period that ends at or before ``watermark``."""
    done = [b for b in state.open.values() if b.end <= watermark]
    for b in done:
        del state.open[b.tf]
    return _emit(done, value_area_fraction)


def open_periods(state: RollupState, value_area_fraction: float) -> list[Bar]:
    """The open periods as they stand, marked partial, without closing them (EOF)."""
    return [msgspec.structs.replace(b, partial=True) for b in _emit(list(state.open.values()), value_area_fraction)]


def _emit(bars: list[Bar], fraction: float) -> list[Bar]:
    bars.sort(key=lambda b: (b.end, tf_ms(b.tf)))
    return [with_value_area(b, fraction) for b in bars]
