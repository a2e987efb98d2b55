"""The deployment gate: a trained ensemble is served only if it has shown skill out of sample.

A model that cannot beat the class prior only adds noise to the decisions, with confidence; a
model that is worse than the one already serving is a step back. So ``models.train`` ends every
training with a decision, recorded in the manifest (``Deployment``) and, by ``dataflows.model_io``,
as an ``events`` row (``model_accepted`` / ``model_rejected``) saying why.

What is measured. Walk-forward training gives every validation block j an honest out-of-sample
ensemble: the members 0..j, each trained on rows before its own block (so before block j). Its
probabilities on the block are calibrated the way the served ensemble is (vector scaling shrunk
toward the raw output, ``models.calibration``), *cross-fitted*: each half of the block with the map
fitted on the other half, so no row is scored by a map that saw it.

- **Against the class prior**, on the walk-forward record: the blocks whose ensemble has two
  members or more (all but the first, whose lone member trained on the fewest rows), each block
  against the class frequencies of the rows before it. The per-bar log-loss difference, averaged
  per time step over instruments, must exceed ``margin + z * se``, ``se`` the Newey-West standard
  error (lags = the label horizon: overlapping labels make neighbouring bars correlated). With
  z = 1.645 a model without skill passes about one time in twenty (one-sided 5%), not one time in
  two as "a lower point estimate" would. The record is the training procedure's out-of-sample
  history; the last block alone (~40 time steps of the main job) is too short to tell skill from
  luck. The test is made on the *raw* ensemble probabilities, which no row of the record helped
  to fit: the cross-fitted calibrated ones share a fitted map per half block, a dependence a
  standard error over rows cannot see (measured on pure noise: 3 false acceptances in 20 with the
  calibrated record, none with the raw one). The calibrated record is reported beside it.
- **Against the active model** (the one the pipeline serves now for this store) on the most recent
  span, the last block, where every member is out of sample: on the rows of it the active model was
  not trained on (bars after its ``last_bar_end``, instruments it knows), with its own calibration,
  the candidate's mean log loss must be lower by more than ``margin``. With fewer than ``min_rows``
  such rows the comparison cannot be made and is skipped (the reason says so).

Rejected ensembles are still written (their folder documents what was tried); the runtime
(``models.onnx_ensemble``) never serves one, nor a manifest without a deployment record.
"""

from __future__ import annotations

from typing import Optional, Protocol

import msgspec
import numpy as np

from models.calibration import VectorScaling
from operators.sharpe_inference import hac_se
from operators.stats import log_losses

ACCEPTED, REJECTED = "accepted", "rejected"


class GateRule(msgspec.Struct, frozen=True, kw_only=True):
    """The thresholds (settings ``model_gate_margin``, ``model_gate_z``)."""

    margin: float = 0.0  # nats of log loss the candidate must win by
    z: float = 1.645  # one-sided z of the test against the prior
    min_rows: int = 30  # rows of the span the active model must be out of sample on to compare


class Calibration(msgspec.Struct, kw_only=True):
    """How the ensemble's probabilities are calibrated (models/calibration.py): the map fitted on
    the last validation block, where the served ensemble (all members) is out of sample."""

    ensemble: VectorScaling
    fit_rows: int
    fit_start: int  # ms, bar starts of the rows it was fitted on
    fit_end: int


class Deployment(msgspec.Struct, kw_only=True):
    """The gate's decision and the numbers it was made on (log losses in nats; spans are bar starts
    in ms). ``record_*``: the walk-forward record (module docstring); ``span_*``: the last block."""

    status: str  # accepted | rejected
    reason: str
    record_start: int
    record_end: int
    record_rows: int
    record_steps: int
    logloss: float  # the record, calibrated (cross-fitted)
    logloss_raw: float  # the record, uncalibrated: what the test against the prior measures
    logloss_prior: float
    gain_prior: float  # mean per time step of prior - raw
    se_prior: float  # its Newey-West standard error
    span_start: int
    span_end: int
    span_rows: int
    span_logloss: float  # the whole ensemble on the last block, calibrated (cross-fitted)
    span_logloss_raw: float
    span_logloss_prior: float
    ece: float  # classwise ECE on the last block, calibrated (cross-fitted)
    ece_raw: float
    active_version: Optional[str] = None
    active_rows: int = 0
    logloss_active: Optional[float] = None  # the active model on its out-of-sample rows of the span
    logloss_candidate_on_active_rows: Optional[float] = None
    margin: float = 0.0
    z: float = 1.645

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED


class Incumbent(Protocol):
    """The model serving now, as the gate needs it (``models.onnx_ensemble.OnnxEnsemble.incumbent``)."""

    version: str
    after: int  # it scores only bars starting after this (ms): its training span's end
    instruments: Optional[frozenset]  # None: any

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, 3] for rows of its features (a frame or matrix)."""


def _per_step(values: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Mean of ``values`` per distinct time, in time order (one number per time step)."""
    _, inv = np.unique(times, return_inverse=True)
    return np.bincount(inv, weights=values) / np.bincount(inv)


def paired_gain(base_loss: np.ndarray, cand_loss: np.ndarray, times: np.ndarray, lags: int) -> tuple[float, float]:
    """(mean gain, Newey-West se) of ``base - cand`` per-row losses, averaged per time step."""
    d = _per_step(np.asarray(base_loss, float) - np.asarray(cand_loss, float), np.asarray(times))
    se = hac_se(d, lags)
    return float(d.mean()), float("inf") if se is None else float(se)


class Evidence(msgspec.Struct, kw_only=True):
    """Rows the gate looks at: bar starts, labels, calibrated and raw candidate probabilities [N, 3]
    and the baseline's (class prior) [N, 3]."""

    times: np.ndarray
    y: np.ndarray
    cand: np.ndarray
    raw: np.ndarray
    prior: np.ndarray


def decide(*, rule: GateRule, lags: int, record: Evidence, span: Evidence, ece: float, ece_raw: float,
           active: Optional[tuple[str, np.ndarray, np.ndarray]] = None) -> Deployment:
    """The decision (module docstring). ``active``: (version, mask of the span's rows it is out of
    sample on, its calibrated probabilities on those rows), or None when nothing is serving."""
    ll_r, ll_p = log_losses(record.raw, record.y), log_losses(record.prior, record.y)
    gain, se = paired_gain(ll_p, ll_r, record.times, lags)
    sp_c = log_losses(span.cand, span.y)
    d = Deployment(
        status=ACCEPTED, reason="", record_start=int(record.times.min()), record_end=int(record.times.max()),
        record_rows=len(record.y), record_steps=len(np.unique(record.times)),
        logloss=float(log_losses(record.cand, record.y).mean()), logloss_raw=float(ll_r.mean()),
        logloss_prior=float(ll_p.mean()),
        gain_prior=gain, se_prior=se, span_start=int(span.times.min()), span_end=int(span.times.max()),
        span_rows=len(span.y), span_logloss=float(sp_c.mean()), span_logloss_raw=float(log_losses(span.raw, span.y).mean()),
        span_logloss_prior=float(log_losses(span.prior, span.y).mean()), ece=ece, ece_raw=ece_raw,
        margin=rule.margin, z=rule.z)
    need = rule.margin + rule.z * se
    why = []
    if not gain > need:
        why.append(f"out-of-sample log loss {d.logloss_raw:.4f} does not beat the class prior {d.logloss_prior:.4f} "
                   f"(gain {gain:.4f} nats over {d.record_steps} time steps, needs > {need:.4f} = margin "
                   f"{rule.margin:g} + {rule.z:g} x se {se:.4f})")
    beat = (f"out-of-sample log loss {d.logloss_raw:.4f} (calibrated {d.logloss:.4f}) beats the class prior "
            f"{d.logloss_prior:.4f} by {gain:.4f} nats (> {need:.4f}, {d.record_steps} time steps)")
    if active is not None:
        version, mask, probs = active
        d.active_version, d.active_rows = version, int(mask.sum())
        if d.active_rows >= rule.min_rows:
            d.logloss_active = float(log_losses(probs, span.y[mask]).mean())
            d.logloss_candidate_on_active_rows = float(sp_c[mask].mean())
            if not d.logloss_candidate_on_active_rows < d.logloss_active - rule.margin:
                why.append(f"log loss {d.logloss_candidate_on_active_rows:.4f} does not beat the active model "
                           f"{version} ({d.logloss_active:.4f}) on the {d.active_rows} rows of the latest span it "
                           f"was not trained on")
            else:
                beat += (f", and the active model {version} ({d.logloss_candidate_on_active_rows:.4f} vs "
                         f"{d.logloss_active:.4f} on {d.active_rows} rows of the latest span)")
        else:
            beat += (f"; the active model {version} was trained on all but {d.active_rows} rows of the latest "
                     f"span (< {rule.min_rows}): not compared")
    d.status = REJECTED if why else ACCEPTED
    d.reason = "; ".join(why) if why else beat
    return d
