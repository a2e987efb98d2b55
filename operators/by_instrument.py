"""One batch's trades and news split per instrument: what the pipeline's ``by_instrument`` step
sends on to admission (``operators.admission``), keyed ``exchange:symbol``."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import polars as pl

from operators.perp import PerpUpdate


def split_instruments(frame: pl.DataFrame, events: list = (), route: Mapping[str, str] = MappingProxyType({})
                      ) -> list[tuple[str, Any]]:
    """``[(key, trades of that instrument in arrival order), ...]``, the key being the instrument's
    ``exchange:symbol`` or its routing key in ``route`` (``operators.routing``); an instrument
    with data-gap events or perp updates (``operators.perp``) in the batch gets an
    ``InstrumentSlice`` (its trades, or None, and those items), so they travel with its trades
    (``admit``: news carried to the portfolio, perp data placed in its bars)."""
    extra: dict[str, list] = {}
    for ev in events:
        if isinstance(ev, PerpUpdate) or (getattr(ev, "kind", None) == "data_gap" and ev.exchange and ev.symbol):
            extra.setdefault(f"{ev.exchange}:{ev.symbol}", []).append(ev)
    parts = {} if frame.height == 0 else {
        f"{ex}:{sym}": part for (ex, sym), part in
        frame.partition_by("exchange", "symbol", as_dict=True, maintain_order=True).items()}
    out: list[tuple[str, Any]] = []
    for inst, part in parts.items():
        out.append((route.get(inst, inst), InstrumentSlice(part, tuple(extra.pop(inst))) if inst in extra else part))
    out.extend((route.get(inst, inst), InstrumentSlice(None, tuple(evs))) for inst, evs in extra.items())
    return out


@dataclass(frozen=True)
class InstrumentSlice:
    """One instrument's part of a batch when it carries data-gap events or perp updates (else a bare frame)."""

    trades: pl.DataFrame | None
    events: tuple
