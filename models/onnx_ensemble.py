"""ONNX ensemble runtime (SPEC §5): score aligned feature rows with the K members of the newest
complete artefact version written by ``models.train``, and hot-swap newer versions without a restart.

    ens = OnnxEnsemble(Path("models/artifacts"))
    ens.expect_features(aligned_feature_names(["15m", "1h"]))   # at start: fail loudly on a mismatch
    preds = ens.score(row.features)    # {"onnx_0": Prediction, ..., "onnx_ensemble": Prediction} or {}

Which version: every sub-folder of ``artifacts_dir`` with a ``manifest.json`` (names starting with
"." are folders still being written) is a candidate; the newest by (manifest ``created_at_ms``,
version) whose files match the manifest's sha256 hashes, whose ONNX graphs load and whose features
the pipeline provides is served. A candidate failing a check is skipped with one ERROR log naming the
reason (and ``last_error``), and is looked at again only when its files change. Deleting the served
version's folder rolls back to the newest remaining one; with no usable version at all the loaded
sessions keep serving, and with none ever loaded ``score`` returns ``{}`` (the ONNX arm is ineligible).

Hot swap: ``score`` calls ``maybe_reload()`` at most every ``check_every_s`` seconds of the injected
``clock``. A reload builds the new sessions completely and then replaces one reference; ``score``
reads that reference once, so a call uses one version entirely.

NOT picklable: onnxruntime sessions cannot be pickled, so an ``OnnxEnsemble`` must live OUTSIDE
bytewax state (build it once per worker in the step's closure or a module-level factory and keep only
plain data in state). ``pickle``/``copy.deepcopy`` raise a TypeError that says so.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import polars as pl

from models.train import MANIFEST_FILE, Manifest, feature_matrix, load_manifest, sha256_bytes
from operators.signals import Prediction, make_prediction

log = logging.getLogger(__name__)

ENSEMBLE_NAME = "onnx_ensemble"
_NAN = math.nan


class _Reject(Exception):
    """A candidate version that cannot be served; the message says why."""


class _Loaded:
    """One loaded version: immutable once built; swapped as a whole."""

    __slots__ = ("folder", "manifest", "version", "names", "n", "members", "input_name", "outputs")

    def __init__(self, folder: Path, manifest: Manifest, members: list[tuple[str, Any]]):
        self.folder = folder
        self.manifest = manifest
        self.version = manifest.version
        self.names = tuple(manifest.features)
        self.n = len(self.names)
        self.members = tuple(members)  # ((member name, InferenceSession), ...)
        self.input_name = manifest.input_name
        self.outputs = [manifest.output_name]


def _stat_key(folder: Path, files: Iterable[str]) -> tuple:
    out = []
    for name in (MANIFEST_FILE, *files):
        try:
            st = (folder / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


class OnnxEnsemble:
    """K onnxruntime sessions from the newest complete artefact version, averaged."""

    def __init__(self, artifacts_dir: Path, check_every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, *,
                 expected_features: Optional[Iterable[str]] = None):
        if not check_every_s >= 0:
            raise ValueError(f"check_every_s must be >= 0, got {check_every_s}")
        self.artifacts_dir = Path(artifacts_dir)
        self.check_every_s = float(check_every_s)
        self._clock = clock
        self._available: Optional[frozenset] = None if expected_features is None else frozenset(expected_features)
        self._current: Optional[_Loaded] = None
        self._last_check: Optional[float] = None
        self._manifests: dict[Path, tuple[tuple, Any]] = {}  # folder -> (stat key, Manifest | error text)
        self._rejected: dict[Path, tuple[tuple, str]] = {}  # folder -> (stat key, reason)
        self.last_error: Optional[str] = None
        self.maybe_reload(force=True)

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
                "rejected": {str(k): v[1] for k, v in self._rejected.items()}}

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
                log.error("ONNX artefact %s dropped: %s", cur.folder, self._missing_msg(cur.version, missing))
        self.maybe_reload(force=True)
        if self._current is None:
            reasons = [r for _, r in self._rejected.values() if "needs features" in r]
            if reasons:
                raise ValueError("no ONNX artefact fits the pipeline's features: " + "; ".join(reasons))

    @staticmethod
    def _missing_msg(version: str, missing: list[str]) -> str:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        return (f"version {version} needs features the pipeline does not produce: {missing[:8]}{more}; "
                f"retrain on the current feature set or configure the overlays it was trained with")

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
                    self._reject(folder, (key,), str(e))
                self._manifests[folder] = cached
            if isinstance(cached[1], Manifest):
                m = cached[1]
                out.append((m.created_at_ms, m.version, folder, m))
        return out

    def _reject(self, folder: Path, key: tuple, reason: str) -> None:
        prev = self._rejected.get(folder)
        self._rejected[folder] = (key, reason)
        self.last_error = f"{folder.name}: {reason}"
        if prev is None or prev[0] != key:
            log.error("ONNX artefact %s ignored: %s", folder, reason)

    def _reload(self) -> bool:
        cur = self._current
        for _, _, folder, m in sorted(self._candidates(), key=lambda c: (c[0], c[1]), reverse=True):
            if cur is not None and folder == cur.folder and m is cur.manifest:
                return False  # the served version is still the newest usable one
            key = _stat_key(folder, [mb.file for mb in m.members])
            rejected = self._rejected.get(folder)
            if rejected is not None and rejected[0] == key:
                continue
            try:
                loaded = self._load(folder, m)
            except _Reject as e:
                self._reject(folder, key, str(e))
                continue
            self._rejected.pop(folder, None)
            self._current = loaded  # the swap: one reference
            log.info("ONNX ensemble serving %s (%d members)%s", loaded.version, len(loaded.members),
                     "" if cur is None else f", replacing {cur.version}")
            return True
        return False

    def _load(self, folder: Path, m: Manifest) -> _Loaded:
        import onnxruntime as ort

        if self._available is not None:
            missing = [f for f in m.features if f not in self._available]
            if missing:
                raise _Reject(self._missing_msg(m.version, missing))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        members = []
        for mb in m.members:
            path = folder / mb.file
            try:
                data = path.read_bytes()
            except OSError as e:
                raise _Reject(f"cannot read {mb.file}: {e}") from None
            digest = sha256_bytes(data)
            expected = {mb.sha256, m.files.get(mb.file, mb.sha256)}
            if len(expected) != 1 or digest not in expected:
                raise _Reject(f"sha256 mismatch for {mb.file}: manifest says {sorted(expected)}, file has "
                              f"{digest} (corrupt or half-copied)")
            try:
                sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise _Reject(f"onnxruntime cannot load {mb.file}: {e}") from None
            inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
            width = inputs[0].shape[1] if len(inputs) == 1 and len(inputs[0].shape) == 2 else None
            if len(inputs) != 1 or inputs[0].name != m.input_name or width != len(m.features):
                raise _Reject(f"{mb.file} takes {[(i.name, i.shape) for i in inputs]}, manifest says "
                              f"{m.input_name!r} [N, {len(m.features)}]")
            if m.output_name not in outputs:
                raise _Reject(f"{mb.file} has outputs {outputs}, manifest says {m.output_name!r}")
            members.append((mb.name, sess))
        return _Loaded(folder, m, members)

    # ------------------------------------------------------------------------- scoring

    def score(self, features: dict[str, Optional[float]]) -> dict[str, Prediction]:
        """Predictions of every member (``onnx_0``..) and their average (``onnx_ensemble``, with
        ``votes``) for one row of features by name (None or absent = missing = NaN); ``{}`` when
        no version is loaded."""
        self.maybe_reload()
        cur = self._current  # read once: this call uses one version entirely
        if cur is None:
            return {}
        get = features.get
        x = np.fromiter((_NAN if (v := get(n)) is None else v for n in cur.names),
                        dtype=np.float32, count=cur.n).reshape(1, cur.n)
        feed = {cur.input_name: x}
        out: dict[str, Prediction] = {}
        total = np.zeros(3)
        for name, sess in cur.members:
            p = make_prediction(name, cur.version, sess.run(cur.outputs, feed)[0][0])
            out[name] = p
            total += (p.p_down, p.p_flat, p.p_up)
        votes = tuple((name, p.p_down, p.p_flat, p.p_up) for name, p in out.items())
        out[ENSEMBLE_NAME] = make_prediction(ENSEMBLE_NAME, cur.version, total / len(cur.members), votes)
        return out

    def score_batch(self, frame: pl.DataFrame | np.ndarray, *, members: bool = False) -> np.ndarray:
        """Probabilities [N, 3] (p_down, p_flat, p_up) averaged over members, or [K, N, 3] per member
        when ``members``; ``frame`` has the manifest's feature columns (null = NaN) or is a matrix
        already in manifest order. Uses the loaded version (no reload); raises when none is loaded."""
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
        per = np.stack([sess.run(cur.outputs, {cur.input_name: x})[0] for _, sess in cur.members]).astype(np.float64)
        return per if members else per.mean(axis=0)
