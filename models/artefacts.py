"""Artefact versions for the ONNX runtime (``models.onnx_ensemble``): what the pipeline is
(``RunFacts``), the rules a version must pass to be served, and loading one version's onnxruntime
sessions with its files checked.

An artefact belongs to the data it was trained on (its manifest's ``data``), so which version,
and for which bars:

- **named** (``model=``: a version folder name in ``artifacts_dir`` or a folder's path): only that
  version, whatever store or instruments it was trained on. If it cannot be served (missing,
  corrupt, features or timeframe that do not fit ``facts``) the constructor raises ``ModelRefused``.
- **picked** (the default): every sub-folder with a ``manifest.json`` (names starting with "." are
  still being written) is a candidate; the newest by (``created_at_ms``, version) is served whose
  files match their sha256 hashes, whose ONNX graphs load, whose features, primary timeframe and
  label horizon fit ``facts`` and which was trained on the same store (``facts.store`` and
  ``facts.database``). A row is scored only when its instrument is one the version was trained on.
- **always**, named or picked: a bar starting before the version's ``data.last_bar_end`` (the end
  of the last bar its training read, labels included) is not scored by it: those would be
  in-sample predictions that look like skill. Later bars of the same run are scored. This is
  checked per row, so a hot swap mid-run respects it too.

Only what passed the deployment gate (``models.deployment``) is ever served: a version whose
manifest says ``deployment.status`` = "rejected", or that has no deployment record (written before
the gate existed), is skipped when picking (its rejection was reported when it was trained) and
refused when named (``ModelRefused``).

onnxruntime is imported inside ``load_version``: importing this module stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from models.manifest import MANIFEST_FILE, Manifest, sha256_bytes


class ModelRefused(ValueError):
    """An explicitly named ensemble that cannot be served; the message says why, in one line."""


@dataclass(frozen=True)
class RunFacts:
    """What the scoring pipeline is. An ensemble must fit it (it reads ``features`` by name, its
    rows are ``primary_tf`` bars, it predicts ``horizon`` bars ahead) and, unless named, must have
    been trained on this store (``store``: ``dataflows.model_io.store_identity``; ``database``)."""

    store: str
    database: str
    primary_tf: str
    horizon: int
    features: tuple[str, ...]


class Rejected(Exception):
    """A candidate version that cannot be served; the message says why, ``rule`` which check."""

    def __init__(self, reason: str, rule: str):
        super().__init__(reason)
        self.rule = rule


class Loaded:
    """One loaded version: immutable once built; swapped as a whole."""

    __slots__ = ("folder", "manifest", "version", "names", "n", "members", "input_name", "outputs",
                 "instruments", "after", "calibration")

    def __init__(self, folder: Path, manifest: Manifest, members: list[tuple[str, Any]], named: bool):
        self.folder = folder
        self.manifest = manifest
        self.version = manifest.version
        self.names = tuple(manifest.features)
        self.n = len(self.names)
        self.members = tuple(members)  # ((member name, InferenceSession), ...)
        self.input_name = manifest.input_name
        self.outputs = [manifest.output_name]
        # rows it may score: its instruments (any, when named) and bars starting after its data
        self.instruments = None if named else frozenset(manifest.data.instruments)
        self.after = manifest.data.last_bar_end
        self.calibration = manifest.calibration.ensemble  # gate_refusal made sure there is one


def stat_key(folder: Path, files: Iterable[str]) -> tuple:
    out = []
    for name in (MANIFEST_FILE, *files):
        try:
            st = (folder / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def gate_refusal(m: Manifest) -> Optional[str]:
    """Why version ``m`` may not be served by the deployment gate's record, or None."""
    d = m.deployment
    if d is None or m.calibration is None:
        return (f"version {m.version} was written before models were calibrated and gated (no deployment "
                "record): retrain it (tapeflow train)")
    if d.status != "accepted":
        return f"version {m.version} was rejected by the deployment gate: {d.reason}"
    return None


def missing_features(m: Manifest, missing: list[str]) -> str:
    """Why version ``m`` cannot be served without the features ``missing``."""
    more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
    return (f"version {m.version} needs features the pipeline does not produce: {missing[:8]}{more}; "
            f"retrain on the current feature set or configure the overlays it was trained with "
            f"({m.data.overlay_tfs})")


def misfit(m: Manifest, available: Optional[frozenset], facts: Optional[RunFacts]) -> Optional[tuple[str, str]]:
    """(rule, reason) when version ``m`` does not fit the pipeline (``available``: the feature names it
    provides, None: any), else None."""
    if available is not None:
        missing = [f for f in m.features if f not in available]
        if missing:
            return "features", missing_features(m, missing)
    f = facts
    if f is not None and m.data.primary_tf != f.primary_tf:
        return "timeframe", (f"version {m.version} was trained on {m.data.primary_tf} rows, the pipeline "
                             f"scores {f.primary_tf} rows (primary_tf)")
    if f is not None and m.horizon != f.horizon:
        return "horizon", (f"version {m.version} predicts {m.horizon} bars ahead, the pipeline's label "
                           f"horizon is {f.horizon}")
    return None


def foreign(m: Manifest, facts: Optional[RunFacts], named: bool) -> Optional[str]:
    """Why a picked (not named) version belongs to another store, else None."""
    f = facts
    if named or f is None:
        return None
    if (m.data.store, m.data.database) != (f.store, f.database):
        return (f"version {m.version} was trained on store {m.data.store} database {m.data.database}, "
                f"this pipeline scores into {f.store} database {f.database} (name it to use it anyway)")
    return None


def load_version(folder: Path, m: Manifest, *, available: Optional[frozenset], facts: Optional[RunFacts],
                 named: bool) -> Loaded:
    """Version ``m`` in ``folder`` with its members' onnxruntime sessions, once every rule passed and every
    file matched its sha256; raises ``Rejected`` naming the rule otherwise."""
    import onnxruntime as ort

    gated = gate_refusal(m)
    if gated is not None:
        raise Rejected(gated, "gate")
    unfit = misfit(m, available, facts)
    if unfit is not None:
        raise Rejected(unfit[1], unfit[0])
    elsewhere = foreign(m, facts, named)
    if elsewhere is not None:
        raise Rejected(elsewhere, "store")
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
            raise Rejected(f"cannot read {mb.file}: {e}", "files") from None
        digest = sha256_bytes(data)
        expected = {mb.sha256, m.files.get(mb.file, mb.sha256)}
        if len(expected) != 1 or digest not in expected:
            raise Rejected(f"sha256 mismatch for {mb.file}: manifest says {sorted(expected)}, file has "
                           f"{digest} (corrupt or half-copied)", "files")
        try:
            sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise Rejected(f"onnxruntime cannot load {mb.file}: {e}", "files") from None
        inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
        width = inputs[0].shape[1] if len(inputs) == 1 and len(inputs[0].shape) == 2 else None
        if len(inputs) != 1 or inputs[0].name != m.input_name or width != len(m.features):
            raise Rejected(f"{mb.file} takes {[(i.name, i.shape) for i in inputs]}, manifest says "
                           f"{m.input_name!r} [N, {len(m.features)}]", "files")
        if m.output_name not in outputs:
            raise Rejected(f"{mb.file} has outputs {outputs}, manifest says {m.output_name!r}", "files")
        members.append((mb.name, sess))
    return Loaded(folder, m, members, named=named)
