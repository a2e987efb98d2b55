"""Probability calibration for the three-class models (down, flat, up), and how to measure it.

Why: the strategy gates on probabilities (``conf_min`` 0.65, ``alpha_min`` 0.10, the 0.55 no-trade
zone), so "0.65" must mean "happens 65% of the time". Raw LightGBM and River scores do not: trees
trained on a few hundred rows are over-confident, an online softmax drifts.

The map: **vector scaling** (Guo et al. 2017, "On Calibration of Modern Neural Networks", §4.2,
applied to log-probabilities): ``q = softmax(a * log p + b)`` with one slope ``a`` >= 0 and a bias
per class (``b_flat`` = 0, so three free parameters). Few parameters on purpose: it is fitted on a
few hundred held-out rows. ``a`` < 1 shrinks an over-confident model, ``a`` = 0 with ``b`` = log of
the class frequencies is the class prior (what a model without skill becomes), and the biases fix
a model that misjudges the class balance. Fitted by maximum likelihood (projected Newton with the
analytic gradient and Hessian, ``_minimize``) with a ridge on (a - 1, b) toward the identity map worth ``PRIOR_ROWS`` rows of evidence
(ridge = PRIOR_ROWS / n on the mean log loss): a Gaussian prior centred on "the model is right",
which the data outweighs as rows accumulate. Measured on synthetic tapes: a free map fitted on the
~100-200 rows of the ensemble's last validation block (or on the earlier blocks, whose ensembles had
fewer, weaker members) made the regularised LightGBM ensemble worse than its raw output; shrunk
toward it, it improved log loss and ECE on every tape tried. Isotonic regression was not chosen: with hundreds of
rows per class it makes step functions that over-fit, and it does not keep the classes summing to 1.

Held-out only, always: ``models.train`` fits the ensemble's map on walk-forward out-of-sample
predictions and evaluates it on a later block it was not fitted on; ``RollingCalibrator`` (River)
fits on predictions whose labels have matured, and is applied to later predictions only.

Calibration error: the **classwise ECE** (Kull et al. 2019, "Beyond temperature scaling", §3):
for each class k, the probabilities ``p_k`` are put into ``bins`` equal-width bins over [0, 1] and
``ECE_k = sum_b (n_b / n) * |mean(y == k in b) - mean(p_k in b)|``; the ECE is the mean over the
classes. It asks exactly what the gates need: does ``p_up`` = 0.6 mean up 60% of the time? The
SQL view ``model_calibration`` (infra/clickhouse) computes the same numbers.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence

import msgspec
import numpy as np

N_CLASSES = 3
EPS = 1e-6  # probabilities are clipped to [EPS, 1] before the log
RIDGE = 1e-4  # on (a - 1) and b: a unique optimum when the data cannot tell
PRIOR_ROWS = 25.0  # the identity map weighs this many rows (ridge = PRIOR_ROWS / n)
MAX_SLOPE = 5.0
ECE_BINS = 10


class VectorScaling(msgspec.Struct, frozen=True, kw_only=True):
    """``q = softmax(a * log p + b)``; ``b`` = (b_down, b_flat, b_up) with b_flat = 0. Stored in
    the manifest (``models.train``) and in River's state: plain numbers."""

    a: float = 1.0
    b: tuple = (0.0, 0.0, 0.0)
    rows: int = 0  # rows it was fitted on
    method: str = "vector_scaling"

    def apply(self, probs) -> np.ndarray:
        """Calibrated probabilities, same shape as ``probs`` ([3] or [N, 3])."""
        p = np.asarray(probs, dtype=np.float64)
        z = self.a * np.log(np.clip(p, EPS, 1.0)) + np.asarray(self.b, dtype=np.float64)
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def apply_one(self, probs: Sequence[float]) -> tuple[float, float, float]:
        """One row, without numpy's per-call overhead (the pipeline calls it once per bar and model)."""
        a, b = self.a, self.b
        z = [a * math.log(min(max(float(p), EPS), 1.0)) + b[k] for k, p in enumerate(probs)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        s = e[0] + e[1] + e[2]
        return (e[0] / s, e[1] / s, e[2] / s)


def _nll(theta: np.ndarray, logp: np.ndarray, y: np.ndarray, ridge: float,
         hessian: bool = False) -> tuple[float, np.ndarray, Optional[np.ndarray]]:
    """Mean log loss of the map ``theta`` = (a, b_down, b_up) plus the ridge, its gradient and
    (``hessian``) its Hessian. Per row, with z = a log p + b and q = softmax(z), dL/dz = q - onehot(y)
    and d2L/dz2 = diag(q) - q q^T; z is linear in theta (dz/da = log p, dz/db_k = e_k)."""
    a, b0, b2 = theta
    z = a * logp + np.array([b0, 0.0, b2])
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    q = e / e.sum(axis=1, keepdims=True)
    n = len(y)
    rows = np.arange(n)
    loss = -np.mean(np.log(np.clip(q[rows, y], 1e-300, 1.0)))
    d = q.copy()
    d[rows, y] -= 1.0  # dL/dz per row
    grad = np.array([np.mean(np.sum(d * logp, axis=1)), np.mean(d[:, 0]), np.mean(d[:, 2])])
    loss += ridge * ((a - 1.0) ** 2 + b0 ** 2 + b2 ** 2)
    grad += 2 * ridge * np.array([a - 1.0, b0, b2])
    if not hessian:
        return float(loss), grad, None
    ql = np.sum(q * logp, axis=1)  # per row: u^T (diag(q) - q q^T) v = sum(u q v) - (u.q)(v.q)
    h = np.empty((3, 3))
    h[0, 0] = np.mean(np.sum(q * logp * logp, axis=1) - ql * ql)
    h[0, 1] = h[1, 0] = np.mean(q[:, 0] * logp[:, 0] - ql * q[:, 0])
    h[0, 2] = h[2, 0] = np.mean(q[:, 2] * logp[:, 2] - ql * q[:, 2])
    h[1, 1] = np.mean(q[:, 0] - q[:, 0] ** 2)
    h[2, 2] = np.mean(q[:, 2] - q[:, 2] ** 2)
    h[1, 2] = h[2, 1] = np.mean(-q[:, 0] * q[:, 2])
    return float(loss), grad, h + 2 * ridge * np.eye(3)


BOUNDS = (np.array([0.0, -10.0, -10.0]), np.array([MAX_SLOPE, 10.0, 10.0]))  # (a, b_down, b_up)


def _minimize(logp: np.ndarray, y: np.ndarray, ridge: float, max_iter: int = 100) -> np.ndarray:
    """The (a, b_down, b_up) within ``BOUNDS`` that minimises ``_nll``: projected Newton (Bertsekas
    1982) from the identity map. The loss is convex in theta (a softmax log loss of a map linear in
    it, plus the ridge), so Newton steps with an Armijo backtrack along the projection converge in a
    few iterations. A bound holds a parameter while the gradient pushes it outward; the Newton step
    is taken in the others. Written out rather than ``scipy.optimize.minimize`` (which it matches,
    tests/unit/test_calibration.py): River's calibrators refit in the dataflow every 10 labels, and
    importing SciPy's optimizer there cost 21 MB resident and a 0.4 s stall of the worker."""
    lo, hi = BOUNDS
    x = np.array([1.0, 0.0, 0.0])
    for _ in range(max_iter):
        f, g, h = _nll(x, logp, y, ridge, hessian=True)
        held = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
        free = ~held
        step = np.zeros(3)
        if free.any():
            hf = h[np.ix_(free, free)] + 1e-12 * np.eye(int(free.sum()))  # ridge 0: keep it invertible
            step[free] = -np.linalg.solve(hf, g[free])
        t = 1.0
        while True:
            new = np.clip(x + t * step, lo, hi)
            if _nll(new, logp, y, ridge)[0] <= f + 1e-4 * float(g @ (new - x)) or t < 1e-10:
                break
            t *= 0.5
        if np.max(np.abs(new - x)) < 1e-10:
            return new
        x = new
    return x


def fit_vector_scaling(probs, labels, ridge: float = RIDGE) -> VectorScaling:
    """Maximum-likelihood vector scaling of ``probs`` [N, 3] against ``labels`` (0, 1, 2), with
    ``ridge`` x ((a - 1)^2 + |b|^2) added to the mean log loss (``shrunk`` for the usual prior).
    Raises ValueError without rows."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != N_CLASSES or len(p) != len(y):
        raise ValueError(f"probs must be [N, 3] and labels [N], got {p.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("no rows to fit a calibration on")
    if y.min() < 0 or y.max() > 2:
        raise ValueError("labels must be 0 (down), 1 (flat) or 2 (up)")
    a, b0, b2 = (float(v) for v in _minimize(np.log(np.clip(p, EPS, 1.0)), y, ridge))
    return VectorScaling(a=a, b=(b0, 0.0, b2), rows=int(len(y)))


def shrunk(probs, labels, prior_rows: float = PRIOR_ROWS) -> VectorScaling:
    """The map with the identity prior worth ``prior_rows`` rows (module docstring)."""
    n = len(labels)
    return fit_vector_scaling(probs, labels, ridge=prior_rows / max(n, 1))


def cross_fitted(probs, labels, times, prior_rows: float = PRIOR_ROWS) -> np.ndarray:
    """Out-of-sample calibrated probabilities of a span whose map would be fitted on the span
    itself: the span is cut at its middle time step, and each half is mapped with the map fitted
    on the other half. No row is calibrated by a map that saw it, so the log loss of the result
    estimates what the map fitted on the whole span does on new rows (for the deployment gate)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    t = np.asarray(times)
    steps = np.unique(t)
    if len(steps) < 2:
        raise ValueError("cross-fitting needs rows at two time steps at least")
    second = t >= steps[len(steps) // 2]
    out = np.empty_like(p)
    out[second] = shrunk(p[~second], y[~second], prior_rows).apply(p[second])
    out[~second] = shrunk(p[second], y[second], prior_rows).apply(p[~second])
    return out


# ------------------------------------------------------------------------------------ measuring


def classwise_ece(probs, labels, bins: int = ECE_BINS) -> Optional[float]:
    """Classwise expected calibration error (module docstring); None without rows."""
    curve = reliability(probs, labels, bins)
    if not curve:
        return None
    n = int(np.asarray(labels).size)
    per_class = np.zeros(N_CLASSES)
    for r in curve:
        per_class[r["cls"]] += r["n"] / n * abs(r["observed"] - r["predicted"])
    return float(per_class.mean())


def reliability(probs, labels, bins: int = ECE_BINS) -> list[dict]:
    """The reliability curve: per class and non-empty bin of ``p_class`` (equal width over [0, 1],
    bin ``i`` = [i/bins, (i+1)/bins), 1.0 in the last), ``n``, mean ``predicted`` and ``observed``
    frequency of the class."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return []
    out = []
    for k in range(N_CLASSES):
        idx = np.minimum((p[:, k] * bins).astype(np.int64), bins - 1)
        hit = (y == k).astype(np.float64)
        for b in np.unique(idx):
            m = idx == b
            out.append({"cls": k, "bin": int(b), "n": int(m.sum()), "predicted": float(p[m, k].mean()),
                        "observed": float(hit[m].mean())})
    return out


# ---------------------------------------------------------------------------------- online (River)


class RollingCalibrator:
    """Vector scaling for an online model, refitted on its last ``window`` matured predictions.

    ``add(raw, label)`` is called when a label matures, with the raw probabilities the model gave
    for that bar back then; every ``refit_every`` additions (once ``min_labels`` are there) the map
    is refitted on the window, shrunk toward the identity by a prior worth ``prior_rows`` rows.
    ``apply(raw)`` maps a new prediction with the map fitted so far; before the first fit that is
    the prior itself, the identity (with no evidence, the raw output is the best guess; the prior
    keeps the first fits on few labels close to it). A prediction is therefore only ever
    calibrated by labels that matured before it was made.

    Plain state (deques of floats, a frozen map): picklable, cheap to snapshot.
    """

    def __init__(self, window: int = 300, min_labels: int = 10, refit_every: int = 10,
                 prior_rows: float = PRIOR_ROWS):
        if not (window >= min_labels >= 1 and refit_every >= 1 and prior_rows >= 0):
            raise ValueError(f"RollingCalibrator needs window >= min_labels >= 1, refit_every >= 1 and prior_rows >= 0, "
                             f"got {window}, {min_labels}, {refit_every}, {prior_rows}")
        self.window, self.min_labels, self.refit_every, self.prior_rows = window, min_labels, refit_every, prior_rows
        self.raw: deque = deque(maxlen=window)
        self.labels: deque = deque(maxlen=window)
        self.map: Optional[VectorScaling] = None
        self.since_fit = 0

    def add(self, raw: Sequence[float], label: int) -> None:
        self.raw.append(tuple(float(v) for v in raw))
        self.labels.append(int(label))
        self.since_fit += 1
        if len(self.labels) >= self.min_labels and (self.map is None or self.since_fit >= self.refit_every):
            self.map = shrunk(np.array(self.raw), np.array(self.labels), self.prior_rows)
            self.since_fit = 0

    def apply(self, raw: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(v) for v in raw) if self.map is None else self.map.apply_one(raw)
