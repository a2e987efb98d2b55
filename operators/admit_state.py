"""What admission works with, per instrument: its rules (``AdmitConfig``), its state
(``AdmitState``, with the memory of ids seen for dedup) and its result (``Admitted``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from operators.records import MINUTE_MS, Chunk, LateTrades, NamedCount


@pydantic_dataclass(frozen=True)
class AdmitConfig:
    """Admission rules per instrument. ``jump_ms``/``jump_confirm``/``receipt_skew_ms`` make event
    time robust to a bad timestamp (see ``operators.admission.admit``)."""

    lateness_ms: int = Field(2_000, ge=0)
    dedup_horizon_ms: int = Field(10 * MINUTE_MS, gt=0)
    dedup_max_ids: int = Field(500_000, gt=0)
    window_ms: int = Field(MINUTE_MS, gt=0)
    jump_ms: int = Field(15 * MINUTE_MS, gt=0)
    jump_confirm: int = Field(3, ge=1)
    receipt_skew_ms: int = Field(5 * MINUTE_MS, ge=0)


@dataclass
class AdmitState:
    """Per instrument: the confirmed frontier (newest accepted ts), the ids seen within the dedup
    horizon, and the trades of a jump that is not confirmed yet (arrival order)."""

    max_ts: int | None = None
    seen: set = field(default_factory=set)
    expiry: deque = field(default_factory=deque)  # (frontier when the group came, tuple of the group's ids)
    n_seen: int = 0
    pending: pl.DataFrame | None = None
    news: tuple = ()  # data-gap events that came before any accepted trade: carried by the first chunk
    perp: tuple = ()  # perp updates ahead of every accepted trade: placed when the trades reach their ts

    def __deepcopy__(self, memo: dict) -> "AdmitState":
        # ids are immutable strings in immutable tuples, frames are immutable: copying containers is enough
        return AdmitState(self.max_ts, set(self.seen), deque(self.expiry), self.n_seen, self.pending,
                          getattr(self, "news", ()), getattr(self, "perp", ()))


@dataclass
class Admitted:
    """What admission made of one instrument's slice: window chunks, rows that missed their bar, a
    duplicate count and events."""

    chunks: list[Chunk]
    late: LateTrades | None  # behind the watermark
    duplicates: int
    outliers: LateTrades | None = None  # ts_outlier / ts_jump_unconfirmed
    extra: list = field(default_factory=list)  # events (perp updates that could not be placed)

    def records(self) -> list:
        """What goes downstream: chunks, late and outlier rows, events, the duplicate count."""
        out: list[Any] = list(self.chunks)
        out += [x for x in (self.late, self.outliers) if x is not None]
        out += self.extra
        if self.duplicates:
            out.append(NamedCount("duplicates", self.duplicates))
        return out


def remember(state: AdmitState, ids: list[str], newest: int, cfg: AdmitConfig) -> None:
    """Note ``ids`` as seen (they came when the frontier was ``newest``) and forget the groups that left
    the dedup horizon or overflow ``dedup_max_ids``."""
    state.seen.update(ids)
    state.expiry.append((newest, tuple(ids)))
    state.n_seen += len(ids)
    horizon_start = (state.max_ts if state.max_ts is not None else newest) - cfg.dedup_horizon_ms
    while state.expiry and (state.expiry[0][0] < horizon_start or state.n_seen > cfg.dedup_max_ids):
        if len(state.expiry) == 1 and state.expiry[0][0] >= horizon_start:
            break  # never forget the group we just added
        _, old = state.expiry.popleft()
        state.seen.difference_update(old)
        state.n_seen -= len(old)

