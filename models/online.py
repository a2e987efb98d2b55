"""Online models: River models per instrument that predict at bar close and learn when
the bar's label matures (delayed labels). Pure Python + River: no bytewax, no I/O.

One ``OnlineModels`` per instrument holds two River pipelines on the same features:

- ``river_lr``:  ``StandardScaler | FillScaled(bias) | SoftmaxRegression`` — multinomial logistic
  regression (River's ``SoftmaxRegression``, SGD with ``lr`` and ``l2``). River's softmax has no
  intercept, so ``FillScaled`` adds a constant ``__bias__`` = 1.0 feature after scaling (the
  scaler would turn a constant into 0); its weights learn the class prior. Its weights are
  created for all three classes up front, so the probabilities always cover down/flat/up.
- ``river_arf``: ``StandardScaler | FillScaled | ARFClassifier(n_models=arf_models, max_depth=arf_max_depth, seed=seed)``.

Missing values, the same rule for both models: a feature that is None, NaN, ±inf or not a
number is left out
of the row given to the pipeline, so the scaler neither learns from it nor scales it; then
``FillScaled`` puts every known feature back, a missing one as 0.0 — its running mean — and
clips the scaled values to ±``clip``. Both models therefore always see the same full vector of
standardised features (for the trees the scale does not matter, but a stable feature set keeps
ARF's per-split feature sampling over all features). The feature names are fixed by the first
row (``AlignedRow.features`` always holds every key, None when missing), or by ``features`` (the
pipeline's setting ``online_features``: the primary timeframe's base features; SGD and Hoeffding
trees learning from a few hundred labels drown in ~200 mostly uninformative features, measured on
the main job's tape: calibrated log loss 1.074 with all of them, 1.025 with those 22, prior 1.066);
other keys are ignored. ``regime`` (a string) is not a model input.

Protocol, per primary bar: ``predict(row)`` at its close returns ``{model: Prediction}`` — empty
until ``warmup_labels`` labels have been learned — and remembers the row's features and those
predictions under ``row.start``. ``learn(label)``, when the label of that bar matures
(``horizon`` bars later), first scores the predictions made for the bar (rolling accuracy, log
loss, Brier per model, over the last ``metric_window`` scored labels; a model that made no
prediction for the bar is not scored), then lets both models learn on the remembered features
and forgets them. A label for a bar that was never predicted (or was already learned, or was
dropped) is ignored. At most ``max_pending`` rows are remembered: the oldest starts go first.

Calibration (models/calibration.py): each model's raw probabilities go through a
``RollingCalibrator``: vector scaling refitted every ``calibration_refit`` matured labels on the
last ``calibration_window`` of them (once ``calibration_min_labels`` are there), shrunk toward the
identity by a prior worth ``calibration_prior_rows`` rows, the identity itself before the first fit.
The probabilities a model returns (which the gates read) are calibrated by labels that matured
before the prediction only, with the raw output beside them (``Prediction.raw``).
``calibrate=False`` returns the raw output alone (tests of the mechanics only).

Metrics: accuracy counts argmax(p) == label (a tie goes to the lower class index: down, flat,
up); log loss is ``-log(max(p_label, 1e-15))`` (River's clamp: a model that says 0 for what
happens pays 34.5, not infinity; ARF can say 0); Brier is ``sum_k (p_k - [k == label])^2``
(0 perfect, 2 worst); both are ``operators.stats``'s, on one row. The probabilities scored are exactly those of the returned Predictions.

State is plain Python and River objects: picklable and deep-copyable, and a restored copy
continues exactly like the original. Same rows, labels and config (seed) give the same
predictions, in any process: River's ARF draws from ``random.Random(seed)`` and samples features
from sorted names, so string hash randomisation does not matter. Snapshot cost grows with the
forest (bytewax deep-copies the state of every key touched in an epoch): with 66 features,
~0.3 MB / ~12 ms deepcopy after 1k bars, ~2.5 MB / ~0.3-0.5 s after 12k bars — after sharing
the trees' idle random generators (``share_distribution_rngs``) and copying by pickle round trip.

The learning rate is small on purpose: with 66 mostly uninformative standardised features, SGD at
0.01-0.03 lets the noise weights wander enough to push log loss on pure noise well above the
prior's (1.21 and 1.61 vs 1.09 on the synthetic stream of the tests); 0.003 stays at ~1.12 and
learns a planted signal as well.

>>> from operators.features import AlignedRow
>>> from operators.labels import Label
>>> m = OnlineModels(OnlineConfig(seed=1, warmup_labels=1, arf_models=2))
>>> def row(i, v):
...     return AlignedRow(exchange="x", symbol="A", tf="5m", start=i, end=i + 1, close=1.0,
...                       warm=True, regime="RANGING", features={"f": v, "g": None}, overlay_ok={})
>>> m.predict(row(0, 1.0))
{}
>>> m.learn(Label(exchange="x", symbol="A", tf="5m", start=0, end=1, horizon=3, fwd_ret=0.01,
...               band=0.001, label=2, matured_at=4))
>>> sorted(m.predict(row(1, -1.0)))
['river_arf', 'river_lr']
"""

from __future__ import annotations

import math
import pickle
import random
from collections import deque
from numbers import Real
from typing import Annotated, Any, Mapping

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from models.calibration import RollingCalibrator
from models.river_imports import import_river
from operators.signals import DOWN, FLAT, UP, Prediction, make_prediction
from operators.stats import brier_score, log_loss

base, compose, forest, linear_model, optim, preprocessing = import_river(
    "base", "compose", "forest", "linear_model", "optim", "preprocessing")

CLASSES: tuple[int, int, int] = (DOWN, FLAT, UP)
LR, ARF = "river_lr", "river_arf"
MODEL_NAMES: tuple[str, str] = (LR, ARF)
VERSION = "online"
BIAS = "__bias__"
# labels between two calls of share_distribution_rngs while learning: without it, a run that keeps
# no snapshots (nothing pickles the state) kept every new distribution's own generator, 18 MB over
# 12 h of 50 instruments. A call costs ~0.2 ms on a grown forest; a label's learning ~0.6 ms.
SHARE_RNGS_EVERY = 10


@dataclass(frozen=True)
class OnlineConfig:
    """Settings of the online models; one seed for the random parts (ARF). Validated on
    construction (a ``ValueError`` naming ``OnlineConfig`` and the field)."""

    seed: int = 42
    arf_models: Annotated[int, Field(ge=1)] = 10
    # River's Hoeffding trees split a leaf whenever its statistics allow, so without a limit a
    # forest grows with every label: pickled, 16 MB after 5,000 labels and 75 MB after 20,000 (10
    # trees, the 22 default features; 288 labels a day on 5m), against 6.8 and 6.3 MB at depth 6,
    # with the same accuracy on a synthetic signal (bench/arf_memory.py). A leaf at the limit stops
    # collecting split statistics and only predicts.
    arf_max_depth: Annotated[int, Field(ge=1)] = 6
    metric_window: Annotated[int, Field(ge=1)] = 200  # matured, scored labels per model in the rolling metrics
    warmup_labels: Annotated[int, Field(ge=0)] = 50  # labels learned before a model predicts
    lr: Annotated[float, Field(gt=0)] = 0.003  # SGD learning rate of the softmax regression (small: module docstring)
    l2: Annotated[float, Field(ge=0)] = 1e-4  # L2 penalty of the softmax regression
    clip: Annotated[float, Field(gt=0)] = 5.0  # standardised values are clipped to [-clip, clip]
    max_pending: Annotated[int, Field(ge=1)] = 64  # rows remembered while their label matures (>= horizon)
    calibrate: bool = True  # gates read calibrated probabilities (module docstring)
    features: tuple = ()  # the feature names the models read (() = every feature of the first row)
    calibration_window: int = 500  # matured predictions the calibrator is fitted on (>= calibration_min_labels)
    calibration_min_labels: Annotated[int, Field(ge=1)] = 10  # matured labels before the first fit (identity until)
    calibration_refit: Annotated[int, Field(ge=1)] = 10  # refit every this many matured labels
    # weight of "the raw output is right" (models/calibration.py). Measured on the main job's tape
    # (second day, river_lr / river_arf): window 300 and 25 rows gave ECE 0.043 / 0.039 and log loss
    # 1.023 / 1.046; window 500 and 5 rows 0.039 / 0.033 and 1.018 / 1.039 (raw: 0.056, 1.026 / 1.070)
    calibration_prior_rows: float = 5.0

    @model_validator(mode="after")
    def _window_holds_the_first_fit(self) -> "OnlineConfig":
        if self.calibration_window < self.calibration_min_labels:
            raise ValueError(f"calibration_window ({self.calibration_window}) must be >= calibration_min_labels "
                             f"({self.calibration_min_labels})")
        return self


class FillScaled(base.Transformer):
    """After a StandardScaler: every name in ``names`` present (a missing one as 0.0, the running
    mean), values clipped to [-clip, clip], and with ``bias`` a constant ``__bias__`` = 1.0.

    >>> FillScaled(("a", "b"), clip=2.0, bias=True).transform_one({"a": 7.0})
    {'a': 2.0, 'b': 0.0, '__bias__': 1.0}
    """

    def __init__(self, names: tuple[str, ...] = (), clip: float = 5.0, bias: bool = False):
        self.names = tuple(names)
        self.clip = clip
        self.bias = bias

    def transform_one(self, x: dict) -> dict:
        c = self.clip
        out = {}
        for n in self.names:
            v = x.get(n, 0.0)
            out[n] = c if v > c else (-c if v < -c else v)
        if self.bias:
            out[BIAS] = 1.0
        return out


def present(features: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """The finite values among ``names`` as floats; None, NaN, ±inf, bools and non-numbers
    (strings included) are missing and left out."""
    out = {}
    for n in names:
        v = features.get(n)
        if isinstance(v, Real) and not isinstance(v, bool):
            f = float(v)
            if math.isfinite(f):
                out[n] = f
    return out


def score(probs: tuple[float, float, float], y: int) -> tuple[float, float, float]:
    """(correct, log loss, Brier) of probabilities [p_down, p_flat, p_up] against class ``y``
    (``operators.stats``' log loss and Brier score of this one row)."""
    best = max(range(len(probs)), key=lambda k: probs[k])  # first max: ties go to the lower class
    row, label = [probs], [y]
    return (1.0 if best == y else 0.0, log_loss(row, label), brier_score(row, label))


def build_models(names: tuple[str, ...], config: OnlineConfig) -> dict[str, compose.Pipeline]:
    """The two River pipelines for a feature set (see the module docstring)."""
    softmax = linear_model.SoftmaxRegression(optimizer=optim.SGD(config.lr), l2=config.l2)
    for c in CLASSES:  # weights for every class from the start: p covers down/flat/up at once
        softmax.weights[c]
    lr = preprocessing.StandardScaler() | FillScaled(names, config.clip, bias=True) | softmax
    arf = (
        preprocessing.StandardScaler()
        | FillScaled(names, config.clip)
        | forest.ARFClassifier(n_models=config.arf_models, max_depth=config.arf_max_depth, seed=config.seed)
    )
    return {LR: lr, ARF: arf}


def share_distribution_rngs(arf: Any, rng: random.Random) -> int:
    """Point the random generator of every per-class distribution in ``arf``'s trees at ``rng``;
    returns how many were changed.

    Each ``proba.Gaussian`` of River's Gaussian splitters owns a ``random.Random`` used only by its
    ``sample()``, which the trees never call (River 0.26). There are classes x sampled features x
    leaves x trees of them, and a Random's state is 625 ints: with 66 features a grown 10-tree
    forest pickled to ~14 MB and took ~0.7 s to deep-copy after 3k bars, almost all of it those generators.
    Sharing one generator (one copy in a pickle or deepcopy) shrinks both by two orders of
    magnitude without changing any prediction. Reads River internals defensively: an unknown
    layout changes nothing.
    """
    changed = 0
    trees = [*getattr(arf, "data", ()), *(getattr(arf, "_background", None) or ())]
    for tree in trees:
        root = getattr(tree, "_root", None)
        if root is None or not hasattr(root, "iter_leaves"):
            continue
        for leaf in root.iter_leaves():
            for splitter in (getattr(leaf, "splitters", None) or {}).values():
                for dist in (getattr(splitter, "_att_dist_per_class", None) or {}).values():
                    if isinstance(getattr(dist, "_rng", None), random.Random) and dist._rng is not rng:
                        dist._rng = rng
                        changed += 1
    return changed


class OnlineModels:
    """River models of one instrument: predict at bar close, learn on matured labels, rolling
    metrics. Plain state (picklable, deep-copyable); see the module docstring."""

    def __init__(self, config: OnlineConfig | None = None):
        self.config = config if config is not None else OnlineConfig()
        self.names: tuple[str, ...] | None = None  # fixed by the first row
        self.models: dict[str, compose.Pipeline] = {}
        self.n_learned = 0
        # start -> (features present, {model: probabilities returned for that bar},
        #           {model: raw probabilities of that bar}); the raw ones train the calibrators
        self.pending: dict[int, tuple[dict[str, float], dict, dict]] = {}
        c = self.config
        self.calibrators: dict[str, RollingCalibrator] = {
            m: RollingCalibrator(c.calibration_window, c.calibration_min_labels, c.calibration_refit,
                                 c.calibration_prior_rows)
            for m in MODEL_NAMES}
        # model -> last metric_window (correct, log loss, Brier)
        self.scores: dict[str, deque] = {m: deque(maxlen=self.config.metric_window) for m in MODEL_NAMES}
        self._spare_rng = random.Random(self.config.seed)  # shared by the trees' distributions

    def __getstate__(self) -> dict:
        # pickle (and so deepcopy) comes here: share the trees' unused per-distribution
        # generators first (see share_distribution_rngs), in place.
        if ARF in self.models:
            share_distribution_rngs(self.models[ARF][-1], self._spare_rng)
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        # a snapshot taken before calibration existed resumes with empty calibrators
        self.__dict__.update(state)
        if "calibrators" not in state:
            c = self.config
            self.calibrators = {m: RollingCalibrator(c.calibration_window, c.calibration_min_labels,
                                                     c.calibration_refit, c.calibration_prior_rows) for m in MODEL_NAMES}
            self.pending = {k: (v[0], v[1], {}) for k, v in self.pending.items()}

    def __deepcopy__(self, memo: dict) -> "OnlineModels":
        # bytewax deep-copies state at every epoch. The state is self-contained, so a pickle
        # round trip is the same deep copy, and about twice as fast as copy.deepcopy's
        # object-by-object walk on a grown forest (~0.4 s vs ~0.8 s after 12k bars, 66 features).
        return pickle.loads(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))

    def _select(self, features: Mapping[str, Any]) -> tuple[str, ...]:
        """The names the models read: ``config.features`` (each one must be in the row: a renamed
        feature would otherwise be dropped without a word), or every feature of the row."""
        wanted = self.config.features
        if not wanted:
            return tuple(features)
        missing = [n for n in wanted if n not in features]
        if missing:
            raise ValueError(f"online models: features {missing} are not among the row's {len(features)} features "
                             "(setting online_features)")
        return tuple(wanted)

    @property
    def warm(self) -> bool:
        return self.n_learned >= self.config.warmup_labels

    def predict(self, row: Any) -> dict[str, Prediction]:
        """Predictions for ``row`` (an ``AlignedRow``: ``start`` and ``features``); empty before
        warm-up. Remembers the row's features (and these predictions) under ``row.start``;
        predicting the same start again replaces them."""
        if self.names is None:
            self.names = self._select(row.features)
            self.models = build_models(self.names, self.config)
        x = present(row.features, self.names)
        out: dict[str, Prediction] = {}
        probs: dict[str, tuple[float, float, float]] = {}
        raws: dict[str, tuple[float, float, float]] = {}
        if self.warm:
            calibrate = self.config.calibrate
            for name, model in self.models.items():
                p = model.predict_proba_one(x)
                raw = make_prediction(name, VERSION, [p.get(c, 0.0) for c in CLASSES])
                raws[name] = (raw.p_down, raw.p_flat, raw.p_up)
                if not calibrate:
                    pred = raw
                else:
                    pred = make_prediction(name, VERSION, self.calibrators[name].apply(raws[name]), raw=raws[name])
                out[name] = pred
                probs[name] = (pred.p_down, pred.p_flat, pred.p_up)
        pending = self.pending
        pending[row.start] = (x, probs, raws)
        while len(pending) > self.config.max_pending:
            del pending[min(pending)]
        return out

    def learn(self, label: Any) -> None:
        """Score the predictions made for ``label.start`` and learn on that bar's remembered
        features, then forget them. Ignored when that bar is not remembered."""
        if label.start not in self.pending:
            return
        y = int(label.label)
        if y not in CLASSES:
            raise ValueError(f"label class must be one of {CLASSES} (down, flat, up), got {label.label!r}")
        x, probs, raws = self.pending.pop(label.start)
        for name, p in probs.items():
            self.scores[name].append(score(p, y))
        for name, raw in raws.items():  # matured: may now calibrate later predictions
            self.calibrators[name].add(raw, y)
        for model in self.models.values():
            model.learn_one(x, y)
        self.n_learned += 1
        if self.n_learned % SHARE_RNGS_EVERY == 0 and ARF in self.models:
            share_distribution_rngs(self.models[ARF][-1], self._spare_rng)

    def metrics(self) -> dict[str, dict[str, float]]:
        """model -> {"accuracy", "log_loss", "brier", "n"} over its last ``metric_window`` scored
        labels; a model with nothing scored yet is absent."""
        out: dict[str, dict[str, float]] = {}
        for name, window in self.scores.items():
            n = len(window)
            if n:
                out[name] = {
                    "accuracy": math.fsum(s[0] for s in window) / n,
                    "log_loss": math.fsum(s[1] for s in window) / n,
                    "brier": math.fsum(s[2] for s in window) / n,
                    "n": n,
                }
        return out
