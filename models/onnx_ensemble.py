"""ONNX ensemble runtime: score aligned feature rows with the K members of an artefact
version written by ``models.train``, and hot-swap newer versions without a restart.

    ens = OnnxEnsemble(Path("data/artifacts"), facts=RunFacts(store, database, "5m", 3, names))
    preds = ens.score(row.features, instrument="binance:BTC/USDT", start=row.start)
    # {"onnx_0": Prediction, ..., "onnx_ensemble": Prediction}, or {} (no opinion on this bar)
    records = ens.take_events()   # model_refused events for the ``events`` table

Which version is served, and for which bars (named or picked; never a bar its training read;
only what passed the deployment gate): ``models.artefacts``.

Calibration: the members' probabilities are their raw outputs (votes); ``onnx_ensemble`` is their
mean mapped through the manifest's calibration (``calibration.ensemble``, fitted at training time on
out-of-sample predictions), with the mean kept as ``Prediction.raw``. The gates read the calibrated one.

A refused candidate is logged once (WARNING when it belongs to other data or does not fit the
pipeline, ERROR when its files are broken) and queued as a ``model_refused`` event; it is looked at
again only when its files change. A row refused by a rule is logged and queued once per (version,
instrument, rule). Deleting the served version's folder rolls back to the newest remaining one;
with no usable version at all the loaded sessions keep serving, and with none ever loaded
``score`` returns ``{}`` (the ONNX arm is ineligible).

Hot swap: ``score`` calls ``maybe_reload()`` at most every ``check_every_s`` seconds of the injected
``clock``. A reload builds the new sessions completely and then replaces one reference; ``score``
reads that reference once, so a call uses one version entirely.

NOT picklable: onnxruntime sessions cannot be pickled, so an ``OnnxEnsemble`` must live OUTSIDE
bytewax state (build it once per worker in the step's closure or a module-level factory and keep only
plain data in state). ``pickle``/``copy.deepcopy`` raise a TypeError that says so.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import polars as pl

from models.artefacts import (
    Loaded, ModelRefused, Rejected, RunFacts, gate_refusal, load_version, missing_features, stat_key,
)
from models.manifest import MANIFEST_FILE, Manifest, load_manifest
from models.onnx_export import as_lightgbm_sees, feature_matrix
from operators.records import Event
from operators.signals import Prediction, make_prediction

log = logging.getLogger(__name__)

ENSEMBLE_NAME = "onnx_ensemble"
REFUSED = "model_refused"  # events.kind of every refusal
_NAN = math.nan
_FILE_RULES = frozenset({"files", "manifest"})  # broken artefacts: ERROR; any other refusal: WARNING


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class OnnxEnsemble:
    """K onnxruntime sessions from one artefact version, averaged; which version and which rows:
    ``models.artefacts``."""

    def __init__(self, artifacts_dir: Path, check_every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, *,
                 expected_features: Optional[Iterable[str]] = None, facts: Optional[RunFacts] = None,
                 model: Optional[str | Path] = None):
        if not check_every_s >= 0:
            raise ValueError(f"check_every_s must be >= 0, got {check_every_s}")
        self.artifacts_dir = Path(artifacts_dir)
        self.check_every_s = float(check_every_s)
        self._clock = clock
        self.facts = facts
        if expected_features is None and facts is not None:
            expected_features = facts.features
        self._available: Optional[frozenset] = None if expected_features is None else frozenset(expected_features)
        self.model = None if model is None or str(model) == "" else str(model)
        self._only: Optional[Path] = None if self.model is None else self._named_folder(self.model)
        self._current: Optional[Loaded] = None
        self._last_check: Optional[float] = None
        self._manifests: dict[Path, tuple[tuple, Any]] = {}  # folder -> (stat key, Manifest | error text)
        self._rejected: dict[Path, tuple[tuple, str]] = {}  # folder -> (stat key, reason)
        self._not_deployed: set[Path] = set()  # folders the deployment gate rejected (never served)
        self._row_refusals: set[tuple[str, str, str]] = set()  # (version, instrument, rule) reported
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()
        self.last_error: Optional[str] = None
        self.maybe_reload(force=True)
        if self._only is not None and self._current is None:
            raise ModelRefused(self._named_error())

    def _named_folder(self, model: str) -> Path:
        """A plain name is a version in ``artifacts_dir``; anything with a path separator a folder."""
        p = Path(model).expanduser()
        return p.resolve() if p.is_absolute() or len(p.parts) > 1 else self.artifacts_dir / model

    def _named_error(self) -> str:
        folder = self._only
        if not (folder / MANIFEST_FILE).is_file():
            try:
                there = sorted(p.name for p in self.artifacts_dir.iterdir()
                               if (p / MANIFEST_FILE).is_file() and not p.name.startswith("."))
            except OSError:
                there = []
            return (f"the named ONNX ensemble {self.model!r} does not exist: no {folder / MANIFEST_FILE} "
                    f"(versions in {self.artifacts_dir}: {', '.join(there[-5:]) or 'none'})")
        return f"the named ONNX ensemble {self.model!r} cannot be served: {self.last_error or 'unknown reason'}"

    # ------------------------------------------------------------------------------ state

    @property
    def version(self) -> Optional[str]:
        cur = self._current
        return None if cur is None else cur.version

    @property
    def manifest(self) -> Optional[Manifest]:
        cur = self._current
        return None if cur is None else cur.manifest

    @property
    def members(self) -> tuple[str, ...]:
        cur = self._current
        return () if cur is None else tuple(m for m, _ in cur.members)

    @property
    def eligible(self) -> bool:
        return self._current is not None

    def status(self) -> dict:
        return {"version": self.version, "members": list(self.members), "last_error": self.last_error,
                "named": self.model, "rejected": {str(k): v[1] for k, v in self._rejected.items()}}

    def take_events(self) -> list[Event]:
        """The ``model_refused`` events queued since the last call (for the ``events`` table)."""
        out = []
        while True:
            try:
                out.append(self._events.popleft())
            except IndexError:
                return out

    def __reduce__(self):
        raise TypeError("OnnxEnsemble holds onnxruntime sessions and cannot be pickled or deep-copied: "
                        "keep it outside bytewax state (build it in the step's closure, once per worker)")

    # ------------------------------------------------------------------------- features

    def expect_features(self, names: Iterable[str]) -> None:
        """Declare the feature names the pipeline provides. Versions needing other names become
        ineligible (logged); raises ValueError naming the missing features when artefacts exist
        but none of them can be served with these names."""
        self._available = frozenset(names)
        self._rejected.clear()
        cur = self._current
        if cur is not None:
            missing = [f for f in cur.names if f not in self._available]
            if missing:
                self._current = None
                self._refused(cur.folder, missing_features(cur.manifest, missing), "features")
        self.maybe_reload(force=True)
        if self._current is None:
            reasons = [r for _, r in self._rejected.values() if "needs features" in r]
            if reasons:
                raise (ModelRefused if self._only else ValueError)(
                    "no ONNX artefact fits the pipeline's features: " + "; ".join(reasons))

    # ------------------------------------------------------------------------- loading

    def maybe_reload(self, force: bool = False) -> bool:
        """Look for a newer complete version at most every ``check_every_s`` (unless ``force``);
        load and swap it in. Returns True when the served version changed. Never raises."""
        now = self._clock()
        if not force and self._last_check is not None and now - self._last_check < self.check_every_s:
            return False
        self._last_check = now
        try:
            return self._reload()
        except Exception as e:  # filesystem trouble must not stop scoring
            self.last_error = f"reload failed: {e!r}"
            log.exception("ONNX artefact reload from %s failed", self.artifacts_dir)
            return False

    def _candidates(self) -> list[tuple[int, str, Path, Manifest]]:
        if self._only is not None:
            folders = [self._only]
        else:
            try:
                folders = [p for p in self.artifacts_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
            except FileNotFoundError:
                return []
        out = []
        for folder in folders:
            mpath = folder / MANIFEST_FILE
            try:
                st = mpath.stat()
            except OSError:
                continue  # no manifest yet: still being written (or not an artefact)
            key = (st.st_mtime_ns, st.st_size)
            cached = self._manifests.get(folder)
            if cached is None or cached[0] != key:
                try:
                    cached = (key, load_manifest(mpath))
                except ValueError as e:
                    cached = (key, str(e))
                    self._reject(folder, (key,), str(e), "manifest")
                self._manifests[folder] = cached
            if isinstance(cached[1], Manifest):
                m = cached[1]
                if self._only is None and gate_refusal(m) is not None:
                    if folder not in self._not_deployed:  # reported when it was trained: only a debug line here
                        self._not_deployed.add(folder)
                        log.debug("ONNX artefact %s skipped: %s", folder, gate_refusal(m))
                    continue
                out.append((m.created_at_ms, m.version, folder, m))
        return out

    def _reject(self, folder: Path, key: tuple, reason: str, rule: str) -> None:
        prev = self._rejected.get(folder)
        self._rejected[folder] = (key, reason)
        self.last_error = f"{folder.name}: {reason}"
        if prev is None or prev[0] != key:
            self._refused(folder, reason, rule)

    def _refused(self, folder: Path, reason: str, rule: str, instrument: str = "",
                 span: tuple[Optional[int], Optional[int]] = (None, None)) -> None:
        """Make a refusal visible: one log line and one ``model_refused`` event."""
        if rule in _FILE_RULES:
            log.error("ONNX artefact %s ignored: %s", folder, reason)
        else:
            log.warning("ONNX artefact %s refused: %s", folder, reason)
        exchange, _, symbol = instrument.partition(":")
        self._events.append(Event(
            kind=REFUSED, ts=_wall_ms(), exchange=exchange, symbol=symbol, from_ts=span[0], to_ts=span[1],
            reason=reason, detail=json.dumps({"version": folder.name, "rule": rule, "folder": str(folder),
                                              "named": self.model is not None}),
            source="pipeline"))

    def _reload(self) -> bool:
        cur = self._current
        for _, _, folder, m in sorted(self._candidates(), key=lambda c: (c[0], c[1]), reverse=True):
            if cur is not None and folder == cur.folder and m is cur.manifest:
                return False  # the served version is still the newest usable one
            key = stat_key(folder, [mb.file for mb in m.members])
            rejected = self._rejected.get(folder)
            if rejected is not None and rejected[0] == key:
                continue
            try:
                loaded = load_version(folder, m, available=self._available, facts=self.facts,
                                      named=self._only is not None)
            except Rejected as e:
                self._reject(folder, key, str(e), e.rule)
                continue
            self._rejected.pop(folder, None)
            self._current = loaded  # the swap: one reference
            log.info("ONNX ensemble serving %s (%d members%s), bars starting after %s%s", loaded.version,
                     len(loaded.members), ", named" if self._only else "", _iso(loaded.after),
                     "" if cur is None else f", replacing {cur.version}")
            return True
        return False

    def _refuse_row(self, cur: Loaded, instrument: str, rule: str) -> None:
        key = (cur.version, instrument, rule)
        with self._lock:
            if key in self._row_refusals:
                return
            self._row_refusals.add(key)
        d = cur.manifest.data
        if rule == "instruments":
            more = len(d.instruments) - 6
            shown = ", ".join(d.instruments[:6]) + (f" (+{more} more)" if more > 0 else "")
            reason = (f"version {cur.version} was not trained on {instrument} (trained on {shown}): "
                      f"its rows are scored without it (name the version to use it anyway)")
            span = (None, None)
        else:
            reason = (f"version {cur.version} was trained on bars up to {_iso(cur.after)}: bars of {instrument} "
                      f"starting before then are scored without it")
            span = (d.first_bar_end, cur.after)
        self._refused(cur.folder, reason, rule, instrument, span)

    # ------------------------------------------------------------------------- scoring

    def score(self, features: dict[str, Optional[float]], *, instrument: str, start: int) -> dict[str, Prediction]:
        """Predictions of every member (``onnx_0``..) and their average (``onnx_ensemble``, with
        ``votes``) for one row of features by name (None or absent = missing = NaN) of the bar of
        ``instrument`` ("exchange:symbol") starting at ``start`` (ms); ``{}`` when no version is
        loaded or the served one may not score this bar (an instrument it was not trained on, a
        bar it was trained on)."""
        self.maybe_reload()
        cur = self._current  # read once: this call uses one version entirely
        if cur is None:
            return {}
        if cur.instruments is not None and instrument not in cur.instruments:
            self._refuse_row(cur, instrument, "instruments")
            return {}
        if start < cur.after:  # its data is not all strictly after what the training read
            self._refuse_row(cur, instrument, "span")
            return {}
        get = features.get
        x = as_lightgbm_sees(np.fromiter((_NAN if (v := get(n)) is None else v for n in cur.names),
                                         dtype=np.float32, count=cur.n).reshape(1, cur.n))
        feed = {cur.input_name: x}
        out: dict[str, Prediction] = {}
        total = np.zeros(3)
        for name, sess in cur.members:
            p = make_prediction(name, cur.version, sess.run(cur.outputs, feed)[0][0])
            out[name] = p
            total += (p.p_down, p.p_flat, p.p_up)
        votes = tuple((name, p.p_down, p.p_flat, p.p_up) for name, p in out.items())
        raw = total / len(cur.members)
        out[ENSEMBLE_NAME] = make_prediction(ENSEMBLE_NAME, cur.version, cur.calibration.apply_one(raw), votes,
                                             raw=raw)
        return out

    def score_batch(self, frame: pl.DataFrame | np.ndarray, *, members: bool = False,
                    calibrated: bool = False) -> np.ndarray:
        """Probabilities [N, 3] (p_down, p_flat, p_up) averaged over members (raw, or through the
        version's calibration map with ``calibrated``), or [K, N, 3] raw per member when
        ``members``; ``frame`` has the manifest's feature columns (null = NaN) or is a matrix
        already in manifest order. Uses the loaded version (no reload); raises when none is loaded.
        Offline evaluation: the caller chooses the rows, no provenance rule is applied here."""
        cur = self._current
        if cur is None:
            raise RuntimeError(f"no ONNX artefact loaded from {self.artifacts_dir}"
                               + (f" (last error: {self.last_error})" if self.last_error else ""))
        if isinstance(frame, pl.DataFrame):
            x = feature_matrix(frame, cur.names)
        else:
            x = np.ascontiguousarray(np.asarray(frame, dtype=np.float32))
            if x.ndim != 2 or x.shape[1] != cur.n:
                raise ValueError(f"expected a [N, {cur.n}] matrix in manifest feature order, got {x.shape}")
        x = as_lightgbm_sees(x)
        per = np.stack([sess.run(cur.outputs, {cur.input_name: x})[0] for _, sess in cur.members]).astype(np.float64)
        if members:
            return per
        mean = per.mean(axis=0)
        return cur.calibration.apply(mean) if calibrated else mean

    def incumbent(self) -> Optional["_Incumbent"]:
        """The version serving now as the deployment gate compares with it (models.deployment), or
        None when none is loaded."""
        cur = self._current
        return None if cur is None else _Incumbent(self, cur)


class _Incumbent:
    """One loaded version seen by the deployment gate: which rows it may score, its calibrated
    probabilities on them."""

    def __init__(self, ens: OnnxEnsemble, cur: Loaded):
        self._ens, self._cur = ens, cur
        self.version, self.after, self.instruments = cur.version, cur.after, cur.instruments

    def predict(self, frame: pl.DataFrame) -> np.ndarray:
        if self._ens._current is not self._cur:
            raise RuntimeError("the ensemble swapped versions while being compared")
        return self._ens.score_batch(frame, calibrated=True)
