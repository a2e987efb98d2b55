"""``compute_features``: the features of a frame of bars (research, training, tests), computed by the
same ``FeatureState`` that streaming uses, so streaming equals batch by construction."""

from __future__ import annotations

from types import SimpleNamespace

import polars as pl

from operators.feature_catalog import (
    FEATURE_NAMES, INPUT_COLUMNS, KEY_COLUMNS, PERP_COLUMNS, WARM_BARS, regime_of,
)
from operators.feature_state import FeatureState
from operators.perp import NAMES as PERP_NAMES
from operators.perp import PerpSnap


def compute_features(bars: pl.DataFrame, tf_ms: int) -> pl.DataFrame:
    """Features for every row of ``bars`` (consecutive bars of one instrument and timeframe,
    oldest first; finite values and positive prices, as ``operators.bars`` makes them), computed
    by one ``FeatureState`` stepping through the rows: what streaming gives, bar for bar.

    Perp data comes from the optional columns ``PERP_COLUMNS`` (a bar's ``PerpSnap`` fields; without
    them the perp features are null).

    Returns the KEY_COLUMNS present in ``bars``, FEATURE_NAMES and the perp features (Float64, null
    while undefined), ``regime`` (String, null while undefined) and ``warm`` (Boolean: the row has
    WARM_BARS bars of history, from which on every FEATURE_NAMES feature is defined)."""
    missing = [c for c in INPUT_COLUMNS if c not in bars.columns]
    if missing:
        raise ValueError(f"compute_features needs bar columns {missing}")
    if tf_ms <= 0:
        raise ValueError(f"compute_features needs a positive tf_ms, got {tf_ms}")
    keys = [k for k in KEY_COLUMNS if k in bars.columns]
    perp_cols = [c for c in PERP_COLUMNS if c in bars.columns]
    state = FeatureState()
    rows = []
    for r in bars.select(*INPUT_COLUMNS, *perp_cols).iter_rows(named=True):
        snap = PerpSnap(**{c: r.pop(c) for c in perp_cols}) if perp_cols else None
        rows.append(state.step(SimpleNamespace(**r, perp=snap), tf_ms))
    names = FEATURE_NAMES + PERP_NAMES
    out = pl.DataFrame({name: [r[name] for r in rows] for name in names}, schema={name: pl.Float64 for name in names})
    return pl.concat([bars.select(keys), out], how="horizontal").with_columns(
        pl.Series("regime", [regime_of(r["adx"], r["atr_pct"]) for r in rows], dtype=pl.String),
        (pl.int_range(pl.len()) >= WARM_BARS - 1).alias("warm"),
    )
