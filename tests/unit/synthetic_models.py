"""Synthetic training frames for the model tests: aligned feature names (primary + 15m + 1h = 66
columns), several instruments on one 5m grid, a weak planted signal, NaNs sprinkled (except in
NO_NAN_FEATURE, so LightGBM also learns splits whose missing type is "None")."""

from __future__ import annotations

import numpy as np
import polars as pl

from models.manifest import DataOrigin
from operators.features import aligned_feature_names
from operators.feature_catalog import FEATURE_NAMES

T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
BAR_MS = 300_000
HORIZON = 3
NAMES = aligned_feature_names(["15m", "1h"])
# The columns that carry values: the original 22 features of each timeframe (the planted signal and
# the noise these tests are tuned on); every other feature is missing throughout (all NaN), which
# LightGBM drops as unsplittable, so adding features to the pipeline does not change these models.
FILLED = FEATURE_NAMES[:22] + [f"{tf}_{f}" for tf in ("15m", "1h") for f in FEATURE_NAMES[:22]]
SIGNAL = ("ret_1", "15m_rsi", "1h_rsi")  # the planted signal reads these
NO_NAN_FEATURE = "1h_rsi"
LABEL_DEFINITION = {"horizon": HORIZON, "classes": {"0": "down", "1": "flat", "2": "up"},
                    "band": "k * atr / close", "k": 0.5}


def synthetic_frame(n_times: int = 1500, instruments: tuple = ("A", "B"), seed: int = 1,
                    strength: float = 0.6, nan_rate: float = 0.05) -> pl.DataFrame:
    """``n_times * len(instruments)`` rows, time-major; the last HORIZON labels of each instrument
    are null (not matured)."""
    rng = np.random.default_rng(seed)
    n = n_times * len(instruments)
    x = rng.normal(size=(n, len(FILLED)))
    idx = [FILLED.index(f) for f in SIGNAL]
    latent = strength * (x[:, idx[0]] - x[:, idx[1]] + x[:, idx[2]]) / np.sqrt(3) + rng.normal(size=n)
    label = np.where(latent > 0.5, 2, np.where(latent < -0.5, 0, 1)).astype(np.float64)
    nan = rng.random(x.shape) < nan_rate
    nan[:, FILLED.index(NO_NAN_FEATURE)] = False
    x[nan] = np.nan
    start = np.repeat(T0 + np.arange(n_times) * BAR_MS, len(instruments))
    symbol = np.tile(np.array(instruments), n_times)
    label[start > T0 + (n_times - 1 - HORIZON) * BAR_MS] = np.nan  # not matured yet
    return pl.DataFrame({
        "exchange": ["x"] * n,
        "symbol": symbol,
        "start": start,
        "label": pl.Series(label).fill_nan(None).cast(pl.Int8),
        **{name: x[:, FILLED.index(name)] if name in FILLED else np.full(n, np.nan) for name in NAMES},
    })

# where synthetic_frame's rows "come from" (train() records it in the manifest's data)
ORIGIN = DataOrigin(store="chdb:///synthetic", database="tapeflow", primary_tf="5m", overlay_tfs=["15m", "1h"])
INSTRUMENTS = ("x:A", "x:B")  # synthetic_frame's default instruments as "exchange:symbol"
