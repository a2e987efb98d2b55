"""Records that cross from scoring to decisions: one model's probabilities and the scored primary row.

Scoring (models/) produces them; decisions (operators/decision.py, risk.py, paper.py) read them.
Neither side imports the other.
"""

from __future__ import annotations

from typing import Optional

import msgspec

DOWN, FLAT, UP = 0, 1, 2


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    """One model's view of the next ``horizon`` primary bars. ``p_*`` are what decisions use:
    calibrated on held-out data (models/calibration.py) for the models that are (River, the ONNX
    ensemble), with the model's own output kept in ``raw``."""

    model: str  # "river_lr", "river_arf", "onnx_0".."onnx_{K-1}", "onnx_ensemble"
    version: str  # model version ("online" for River; the artefact version for ONNX)
    p_down: float
    p_flat: float
    p_up: float
    votes: tuple = ()  # ensemble only: ((member, p_down, p_flat, p_up), ...) of the raw member outputs
    raw: tuple = ()  # (p_down, p_flat, p_up) before calibration; () = not calibrated (p_* are the raw output)

    @property
    def confidence(self) -> float:
        return max(self.p_up, self.p_down)

    @property
    def alpha(self) -> float:
        return abs(self.p_up - self.p_down)

    @property
    def raw_probs(self) -> tuple[float, float, float]:
        """The model's own output: ``raw``, or ``p_*`` for a model that is not calibrated."""
        return self.raw if self.raw else (self.p_down, self.p_flat, self.p_up)

    @property
    def side(self) -> int:
        """+1 if up is likelier than down, -1 if down is, 0 on a tie."""
        return (self.p_up > self.p_down) - (self.p_up < self.p_down)


def _normalised(probs) -> tuple[float, float, float]:
    d, f, u = (float(p) for p in probs)
    s = d + f + u
    if not s > 0:
        return 1 / 3, 1 / 3, 1 / 3
    return d / s, f / s, u / s


def make_prediction(model: str, version: str, probs, votes: tuple = (), raw=None) -> Prediction:
    """From [p_down, p_flat, p_up] (any sequence), normalised to sum to 1; ``raw``: the model's
    output before calibration (``probs`` being the calibrated probabilities), normalised too."""
    d, f, u = _normalised(probs)
    return Prediction(model=model, version=version, p_down=d, p_flat=f, p_up=u, votes=votes,
                      raw=() if raw is None else _normalised(raw))


class ScoredRow(msgspec.Struct, frozen=True, kw_only=True):
    """A closed primary-timeframe bar with its aligned features and every model's prediction.

    ``features`` holds the primary timeframe's features by name (e.g. ``rsi``, ``atr``, ``rv``,
    ``s_top``, ``s_bot``, ``ret_12``) and the overlays' prefixed by timeframe (``1h_ret_12``,
    ``1h_rsi``...); a missing value is None. ``overlay_ok[tf]`` is False when that overlay was stale
    or not closed. ``predictions`` maps model name to Prediction; a model without an opinion (no
    ONNX artefact yet, River not warm) is simply absent.
    """

    exchange: str
    symbol: str
    tf: str
    start: int
    end: int  # decisions are made at this time (bar close)
    close: float
    warm: bool
    regime: str
    features: dict
    overlay_ok: dict
    predictions: dict  # model -> Prediction
    scored_at: int = 0  # wall-clock ms when scoring finished (latency accounting)
    closed_at: int = 0  # wall-clock ms when the bar's last 1m window closed

    @property
    def instrument(self) -> str:
        return f"{self.exchange}:{self.symbol}"

    def feature(self, name: str, default: Optional[float] = None) -> Optional[float]:
        v = self.features.get(name)
        return default if v is None else v


class ModelMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Rolling quality of one online model on one instrument, after a matured label."""

    exchange: str
    symbol: str
    model: str
    ts: int
    accuracy: float
    log_loss: float
    brier: float
    n: int


def scored(row, predictions: dict, now_ms: int = 0, closed_at: int = 0) -> ScoredRow:
    """An aligned primary row (operators.features.AlignedRow) with its predictions."""
    return ScoredRow(exchange=row.exchange, symbol=row.symbol, tf=row.tf, start=row.start, end=row.end,
                     close=row.close, warm=row.warm, regime=row.regime, features=row.features,
                     overlay_ok=row.overlay_ok, predictions=predictions, scored_at=now_ms, closed_at=closed_at)


def metrics_rows(label, metrics: dict) -> list[ModelMetrics]:
    """Rows of ``{model: {accuracy, log_loss, brier, n}}`` as of the label that just matured."""
    return [ModelMetrics(exchange=label.exchange, symbol=label.symbol, model=m, ts=label.matured_at,
                         accuracy=v["accuracy"], log_loss=v["log_loss"], brier=v["brier"], n=int(v["n"]))
            for m, v in sorted(metrics.items()) if v.get("n")]
