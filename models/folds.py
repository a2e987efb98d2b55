"""Walk-forward folds over time-ordered training rows (a purge gap before each validation block),
and the out-of-sample metrics of a fold.

Fold k validates on a contiguous later block of time and trains on everything before it except the
last ``purge`` time steps (purge >= label horizon, so no training label overlaps the validation
block). The validation block is never used for fitting (no early stopping on it), so the fold
metrics in the manifest are out of sample.
"""

from __future__ import annotations

import numpy as np

from operators.stats import brier_score, log_loss


def walk_forward_splits(n_rows: int, folds: int, purge: int, min_train: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Expanding-window walk-forward splits over ``n_rows`` rows in time order.

    The rows after the first ``min_train + purge`` are cut into ``folds`` contiguous validation
    blocks (sizes differ by at most one, the later blocks take the remainder). Fold k trains on
    rows ``[0, v0 - purge)`` where ``v0`` is its first validation row: only rows before the block,
    with a gap of ``purge`` rows (>= the label horizon) between the last training row and the
    first validation row. Nothing after a validation block trains its fold, so no embargo is
    needed. Returns ``[(train_idx, valid_idx), ...]`` as int64 arrays.

    >>> [(t.tolist(), v.tolist()) for t, v in walk_forward_splits(10, 2, 1, 4)]
    [([0, 1, 2, 3], [5, 6]), ([0, 1, 2, 3, 4, 5], [7, 8, 9])]
    """
    for name, v in (("n_rows", n_rows), ("folds", folds), ("purge", purge), ("min_train", min_train)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"walk_forward_splits: {name} must be an int, got {type(v).__name__}")
    if folds < 1:
        raise ValueError(f"walk_forward_splits: folds must be >= 1, got {folds}")
    if purge < 0:
        raise ValueError(f"walk_forward_splits: purge must be >= 0 rows, got {purge}")
    if min_train < 1:
        raise ValueError(f"walk_forward_splits: min_train must be >= 1 row, got {min_train}")
    need = min_train + purge + folds
    if n_rows < need:
        raise ValueError(
            f"walk_forward_splits: {n_rows} rows are too few for min_train={min_train} + purge={purge}"
            f" + {folds} validation block(s) of at least one row (need >= {need})")
    size, extra = divmod(n_rows - min_train - purge, folds)
    out = []
    v0 = min_train + purge
    for k in range(folds):
        v1 = v0 + size + (1 if k >= folds - extra else 0)
        out.append((np.arange(0, v0 - purge, dtype=np.int64), np.arange(v0, v1, dtype=np.int64)))
        v0 = v1
    return out



def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """logloss (probabilities clipped to [1e-15, 1]), multiclass Brier (sum over classes of
    (p - onehot)^2, averaged over rows; both ``operators.stats``) and accuracy."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    return {
        "logloss": log_loss(p, y),
        "brier": brier_score(p, y),
        "accuracy": float(np.mean(p.argmax(axis=1) == y)),
    }
