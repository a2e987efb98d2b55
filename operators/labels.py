"""Labels: direction of the forward log return over ``horizon`` primary bars.

For the bar at index i (its close c_i and ATR a_i):

    fwd_ret = log(c_{i+horizon} / c_i)
    band    = k * a_i / c_i                      (ATR-scaled flat band, k default 0.5)
    label   = 2 (up)   if fwd_ret >  band
              0 (down) if fwd_ret < -band
              1 (flat) otherwise                 (|fwd_ret| <= band: the band edges are flat)

The label of bar i needs the close of bar i + horizon, so it MATURES with that bar and is emitted
then, never earlier; ``matured_at`` is the end of that bar. Horizons count bars: the rows fed to
one instrument are assumed to be consecutive primary bars. A bar whose ATR is not defined yet
(warm-up) gets no label (``label_frame`` gives nulls there too).

``update`` is the streaming form (delayed labels for online learning); ``label_frame`` is the
vectorised form for offline training; both give the same labels.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import msgspec
import polars as pl

DOWN, FLAT, UP = 0, 1, 2
DEFAULT_HORIZON = 3
DEFAULT_K = 0.5


class Label(msgspec.Struct, kw_only=True):
    exchange: str
    symbol: str
    tf: str
    start: int  # start of the labelled bar
    end: int  # end of the labelled bar
    horizon: int
    fwd_ret: float
    band: float
    label: int
    matured_at: int  # end of the bar whose close completed the label


def classify(fwd_ret: float, band: float) -> int:
    """0 down, 1 flat, 2 up; |fwd_ret| <= band is flat."""
    if fwd_ret > band:
        return UP
    if fwd_ret < -band:
        return DOWN
    return FLAT


def flat_band(close: float, atr: Optional[float], k: float) -> Optional[float]:
    if atr is None or close is None or close <= 0 or math.isnan(atr):
        return None
    return k * atr / close


@dataclass
class LabelState:
    """Pending (not yet matured) rows per instrument: (exchange, symbol, tf) -> deque of
    (start, end, close, atr), at most ``horizon`` of them. Plain and picklable."""

    horizon: int = DEFAULT_HORIZON
    k: float = DEFAULT_K
    pending: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"label horizon must be >= 1 bar, got {self.horizon}")
        if not self.k >= 0:
            raise ValueError(f"label band multiplier k must be >= 0, got {self.k}")


def _atr_of(row: Any) -> Optional[float]:
    values = getattr(row, "values", None)
    if values is None:
        values = getattr(row, "features", None) or {}
    return values.get("atr")


def update(state: LabelState, row: Any) -> list[Label]:
    """Feed the newest primary row (a ``FeatureRow`` or ``AlignedRow``: exchange, symbol, tf,
    start, end, close and an ``atr`` feature). Returns the labels that matured with it (at most
    one for consecutive bars). A row not newer than the last one fed is ignored."""
    key = (row.exchange, row.symbol, row.tf)
    q = state.pending.get(key)
    if q is None:
        q = state.pending[key] = deque()
    if q and row.start <= q[-1][0]:
        return []
    q.append((row.start, row.end, row.close, _atr_of(row)))
    out: list[Label] = []
    while len(q) > state.horizon:
        start, end, close, atr = q.popleft()
        band = flat_band(close, atr, state.k)
        if band is None or close <= 0 or row.close <= 0:
            continue
        fwd = math.log(row.close / close)
        out.append(Label(
            exchange=row.exchange, symbol=row.symbol, tf=row.tf, start=start, end=end,
            horizon=state.horizon, fwd_ret=fwd, band=band, label=classify(fwd, band),
            matured_at=row.end,
        ))
    return out


def label_frame(df: pl.DataFrame, horizon: int = DEFAULT_HORIZON, k: float = DEFAULT_K) -> pl.DataFrame:
    """``df`` (consecutive primary bars, oldest first; columns start, end, close, atr, and when
    present exchange/symbol/tf, labelled per instrument) with columns fwd_ret, band, label (Int8)
    and matured_at added: nulls where the label has not matured (the last ``horizon`` rows of an
    instrument) or the ATR is undefined."""
    if horizon < 1:
        raise ValueError(f"label horizon must be >= 1 bar, got {horizon}")
    groups = [c for c in ("exchange", "symbol", "tf") if c in df.columns]
    c, atr = pl.col("close").cast(pl.Float64), pl.col("atr").cast(pl.Float64)

    def over(e: pl.Expr) -> pl.Expr:
        return e.over(groups) if groups else e

    fwd_close = over(c.shift(-horizon))
    band = pl.when(atr.is_not_null() & (c > 0)).then(pl.lit(float(k)) * atr / c)
    fwd = pl.when(band.is_not_null() & (fwd_close > 0)).then((fwd_close / c).log())
    out = df.with_columns(fwd.alias("fwd_ret"), band.alias("band"))
    f, b = pl.col("fwd_ret"), pl.col("band")
    label = (
        pl.when(f.is_null()).then(None)
        .when(f > b).then(pl.lit(UP))
        .when(f < -b).then(pl.lit(DOWN))
        .otherwise(pl.lit(FLAT))
        .cast(pl.Int8)
    )
    matured = pl.when(f.is_not_null()).then(over(pl.col("end").shift(-horizon)))
    return out.with_columns(
        pl.when(f.is_not_null()).then(b).alias("band"), label.alias("label"), matured.alias("matured_at"),
    )
