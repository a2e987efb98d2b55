"""Labels: forward log return over `horizon` primary bars, three classes with an
ATR-scaled flat band; emitted only when matured; streaming == vectorised."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import polars as pl
import pytest

from operators.feature_catalog import FEATURE_NAMES
from operators.features import FeatureRow
from operators.labels import DOWN, FLAT, UP, Label, LabelState, classify, label_frame, update

M5 = 300_000
T0 = 1_704_067_200_000


def row(i: int, close: float, atr: float | None, symbol: str = "A/USDT:USDT") -> FeatureRow:
    values = {f: None for f in FEATURE_NAMES}
    values["atr"] = atr
    return FeatureRow(exchange="x", symbol=symbol, tf="5m", start=T0 + i * M5, end=T0 + (i + 1) * M5,
                      close=close, warm=atr is not None, regime="UNKNOWN", values=values)


def test_classify_band_edges_are_flat():
    assert classify(0.01, 0.01) == FLAT
    assert classify(-0.01, 0.01) == FLAT
    assert classify(math.nextafter(0.01, 1.0), 0.01) == UP
    assert classify(math.nextafter(-0.01, -1.0), 0.01) == DOWN
    assert classify(0.0, 0.0) == FLAT  # no band, no move
    assert classify(1e-12, 0.0) == UP and classify(-1e-12, 0.0) == DOWN
    assert (DOWN, FLAT, UP) == (0, 1, 2)


def test_hand_numbers_with_the_atr_band():
    # bar 0: close 100, ATR 2, k 0.5 -> band = 0.5 * 2 / 100 = 0.01 (a 1% log move)
    cases = [
        (101.0, FLAT),  # log(1.01)  = 0.00995 <= 0.01
        (101.1, UP),  # log(1.011) = 0.01094 >  0.01
        (99.1, FLAT),  # log(0.991) = -0.00904
        (99.0, DOWN),  # log(0.99)  = -0.01005 < -0.01
    ]
    for fwd_close, want in cases:
        st = LabelState(horizon=3, k=0.5)
        rows = [row(0, 100.0, 2.0), row(1, 150.0, 2.0), row(2, 50.0, 2.0), row(3, fwd_close, 2.0)]
        out = [lab for r in rows for lab in update(st, r)]
        assert len(out) == 1
        lab = out[0]
        assert lab.label == want, fwd_close
        assert lab.band == pytest.approx(0.01, rel=1e-15)
        assert lab.fwd_ret == pytest.approx(math.log(fwd_close / 100.0), rel=1e-15)
        # the path in between (150, 50) does not matter: only the close `horizon` bars later
        assert (lab.start, lab.end, lab.horizon, lab.matured_at) == (T0, T0 + M5, 3, T0 + 4 * M5)


def test_k_is_configurable():
    rows = [row(0, 100.0, 2.0), row(1, 100.5, 2.0)]  # +0.4988% with horizon 1
    wide = LabelState(horizon=1, k=1.0)  # band 2%
    narrow = LabelState(horizon=1, k=0.1)  # band 0.2%
    assert [lab.label for r in rows for lab in update(wide, r)] == [FLAT]
    assert [lab.label for r in rows for lab in update(narrow, r)] == [UP]
    with pytest.raises(ValueError):
        LabelState(horizon=0)
    with pytest.raises(ValueError):
        LabelState(k=-1.0)


def test_labels_are_emitted_only_when_matured():
    st = LabelState(horizon=3)
    closes = [100.0, 101.0, 102.0, 103.0, 104.0, 90.0]
    emitted = [update(st, row(i, c, 1.0)) for i, c in enumerate(closes)]
    assert emitted[0] == emitted[1] == emitted[2] == []  # bar 0 needs the close of bar 3
    assert [lab.start for lab in emitted[3]] == [T0]
    assert [lab.start for lab in emitted[4]] == [T0 + M5]
    assert [lab.start for lab in emitted[5]] == [T0 + 2 * M5]
    for i, labs in enumerate(emitted[3:], start=3):
        (lab,) = labs
        assert lab.matured_at == T0 + (i + 1) * M5  # the end of the bar that completed it
        assert lab.matured_at >= lab.end + 3 * M5  # never before `horizon` more bars closed
    assert emitted[3][0].label == UP and emitted[5][0].label == DOWN  # 102 -> 90
    # bars 3, 4, 5 are still pending
    assert len(st.pending[("x", "A/USDT:USDT", "5m")]) == 3


def test_no_label_where_atr_is_undefined_but_bars_still_count():
    st = LabelState(horizon=2)
    rows = [row(0, 100.0, None), row(1, 100.0, 1.0), row(2, 105.0, 1.0), row(3, 95.0, 1.0)]
    out = [update(st, r) for r in rows]
    assert out[2] == []  # bar 0 matured, but its band is undefined (warm-up): no label
    assert [(lab.start, lab.label) for lab in out[3]] == [(T0 + M5, DOWN)]  # 100 -> 95, band 1%


def test_duplicate_or_stale_rows_are_ignored():
    st = LabelState(horizon=1)
    assert update(st, row(0, 100.0, 1.0)) == []
    assert update(st, row(0, 999.0, 1.0)) == []
    (lab,) = update(st, row(1, 102.0, 1.0))
    assert lab.fwd_ret == pytest.approx(math.log(1.02))
    assert update(st, row(1, 50.0, 1.0)) == []


def test_instruments_are_kept_apart_and_state_is_plain():
    st = LabelState(horizon=1)
    update(st, row(0, 100.0, 1.0, "A"))
    update(st, row(0, 10.0, 1.0, "B"))
    restored = pickle.loads(pickle.dumps(st))
    copied = copy.deepcopy(st)
    for s in (st, restored, copied):
        (a,) = update(s, row(1, 103.0, 1.0, "A"))
        assert a.symbol == "A" and a.label == UP
        (b,) = update(s, row(1, 9.0, 1.0, "B"))
        assert b.symbol == "B" and b.label == DOWN


def _random_rows(n: int, symbol: str, seed: int) -> list[FeatureRow]:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, n)))
    atr = close * rng.uniform(0.001, 0.01, n)
    return [row(i, float(close[i]), None if i < 15 else float(atr[i]), symbol) for i in range(n)]


@pytest.mark.parametrize("horizon,k", [(3, 0.5), (1, 0.0), (6, 1.5)])
def test_streaming_equals_label_frame(horizon, k):
    rows = {s: _random_rows(300, s, seed) for seed, s in enumerate(["A", "B"])}
    interleaved = [r for pair in zip(rows["A"], rows["B"]) for r in pair]
    st = LabelState(horizon=horizon, k=k)
    streamed: dict[tuple, Label] = {}
    for r in interleaved:
        for lab in update(st, r):
            assert lab.matured_at == r.end
            streamed[(lab.symbol, lab.start)] = lab
    df = pl.DataFrame({
        "exchange": [r.exchange for r in interleaved], "symbol": [r.symbol for r in interleaved],
        "tf": [r.tf for r in interleaved], "start": [r.start for r in interleaved],
        "end": [r.end for r in interleaved], "close": [r.close for r in interleaved],
        "atr": [r.values["atr"] for r in interleaved],
    })
    out = label_frame(df, horizon=horizon, k=k)
    labelled = out.filter(pl.col("label").is_not_null())
    assert labelled.height == len(streamed) == 2 * (300 - horizon - 15)
    for r in labelled.iter_rows(named=True):
        lab = streamed[(r["symbol"], r["start"])]
        assert (lab.label, lab.end, lab.matured_at) == (r["label"], r["end"], r["matured_at"])
        assert lab.fwd_ret == pytest.approx(r["fwd_ret"], rel=1e-12, abs=1e-15)
        assert lab.band == pytest.approx(r["band"], rel=1e-12)
    classes = set(labelled["label"].to_list())
    assert classes == ({DOWN, FLAT, UP} if k > 0 else {DOWN, UP})  # k = 0: only exact zeros are flat


def test_label_frame_nulls_where_not_matured():
    df = pl.DataFrame({
        "start": [T0 + i * M5 for i in range(6)], "end": [T0 + (i + 1) * M5 for i in range(6)],
        "close": [100.0, 100.0, 100.0, 103.0, 98.5, 100.0], "atr": [None, 2.0, 2.0, 2.0, 2.0, 2.0],
    })
    out = label_frame(df, horizon=3, k=0.5)
    # row 0: no ATR; row 1: 100 -> 98.5 = -1.5% < -1% band; row 2: 100 -> 100; rows 3-5: not matured
    assert out["label"].to_list() == [None, DOWN, FLAT, None, None, None]
    assert out["fwd_ret"].to_list()[3:] == [None] * 3
    assert out["band"].to_list()[1] == pytest.approx(0.01)
    assert out["matured_at"].to_list() == [None, T0 + 5 * M5, T0 + 6 * M5, None, None, None]
    assert out.schema["label"] == pl.Int8
