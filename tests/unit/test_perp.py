"""operators.perp and its placement among the trades (operators.chunk_news.place_perp), funding in the
paper book, and the tape walk (operators.slippage)."""

import msgspec
import numpy as np
import polars as pl
import pytest

from operators import perp as PD
from operators.paper import PaperBook
from operators.perp import PerpUpdate
from operators.slippage import build, walk_price
from operators.admission import admit, flush
from operators.admit_state import AdmitConfig, AdmitState
from operators.by_instrument import InstrumentSlice
from operators.decode import TRADE_SCHEMA, decode_batch
from operators.records import RawBatch

T0 = 1_704_067_200_000
MIN = 60_000
CFG = AdmitConfig()


def stream(seed: int, n: int = 3_000):
    """One instrument: trades (some late by up to 5 s, i.e. behind the 2 s watermark) and perp
    updates between them, each with ``seq`` = the offset of the next trade."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.cumsum(rng.integers(0, 400, n))
    ts = ts - np.where(rng.random(n) < 0.05, rng.integers(0, 5_000, n), 0)
    trades = pl.DataFrame({
        "exchange": "x", "symbol": "A", "id": [str(i) for i in range(n)], "ts": ts, "price": 100.0, "amount": 1.0,
        "is_buy": rng.random(n) < 0.5, "trader": None, "recv_ts": ts, "seq": np.arange(n)}, schema=TRADE_SCHEMA)
    ups = []
    for k in sorted(rng.choice(n, 120, replace=False)):
        kind = ("funding", "open_interest", "liquidation")[k % 3]
        t = int(ts[k] + rng.integers(-20_000, 20_000))  # behind, near or ahead of the trades around it
        ups.append(PerpUpdate(kind=kind, exchange="x", symbol="A", ts=t, seq=int(k), rate=1e-4 * (k % 7),
                              funding_time=T0 + 8 * 3_600_000, open_interest=float(k), side="sell", price=100.0,
                              amount=float(k + 1)))
    return trades, ups


def run(trades: pl.DataFrame, ups: list, cuts: list[int]):
    """Admit in slices cut at ``cuts`` (trade offsets); each update in the slice of its seq."""
    st = AdmitState()
    placed, events = [], []
    bounds = [0, *cuts, trades.height]
    for lo, hi in zip(bounds, bounds[1:]):
        mine = tuple(u for u in ups if lo <= u.seq < hi or (hi == trades.height and u.seq >= hi))
        got = admit(st, InstrumentSlice(trades.slice(lo, hi - lo), mine), CFG)
        for c in got.chunks:
            placed += [(c.window_start, u.dedup_key(), u.ts) for u in c.news if isinstance(u, PerpUpdate)]
    end = flush(st, CFG)
    for c in end.chunks:
        placed += [(c.window_start, u.dedup_key(), u.ts) for u in c.news if isinstance(u, PerpUpdate)]
    events += end.extra
    return sorted(placed), events


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_placement_does_not_depend_on_batch_cuts_and_never_looks_ahead(seed):
    trades, ups = stream(seed)
    rng = np.random.default_rng(seed + 100)
    want, ev = run(trades, ups, [])
    for _ in range(4):
        cuts = sorted(rng.choice(np.arange(1, trades.height), int(rng.integers(1, 40)), replace=False).tolist())
        assert run(trades, ups, cuts) == (want, ev)
    # no lookahead: an update rides a window that ends after its ts
    assert all(ts < w + MIN for w, _, ts in want)
    # accounted: every update placed once, or reported at the end
    unplaced = sum(int(e.reason.split()[0]) for e in ev if e.kind == "perp_unplaced")
    assert len(want) + unplaced == len(ups) and len({k for _, k, _ in want}) == len(want)
    # some rode their own window, some (behind the watermark) a later one
    assert any(w == ts - ts % MIN for w, _, ts in want) and any(w > ts - ts % MIN for w, _, ts in want)


def test_an_update_ahead_of_every_trade_waits_for_the_trades_then_rides_its_own_window():
    trades, _ = stream(4, 200)
    ahead = PerpUpdate(kind="funding", exchange="x", symbol="A", ts=int(trades["ts"][100]) + 1, rate=1e-4, seq=50)
    placed, _ = run(trades, [ahead], [50, 60, 120])
    assert placed == [(ahead.ts - ahead.ts % MIN, ahead.dedup_key(), ahead.ts)]


def test_a_redelivered_liquidation_counts_once_and_one_after_the_last_trade_is_reported():
    trades, _ = stream(5, 300)
    liq = PerpUpdate(kind="liquidation", exchange="x", symbol="A", ts=int(trades["ts"][100]), side="buy",
                     price=99.0, amount=3.0, seq=101)
    late = PerpUpdate(kind="open_interest", exchange="x", symbol="A", ts=int(trades["ts"].max()) + 60_000,
                      open_interest=5.0, seq=300)
    placed, ev = run(trades, [liq, msgspec.structs.replace(liq, seq=150), late], [120])
    assert [k for _, k, _ in placed] == [liq.dedup_key()]
    assert [(e.kind, e.from_ts) for e in ev] == [("perp_unplaced", late.ts)]


def test_absorb_keeps_the_latest_levels_by_time_and_sums_liquidations():
    u = dict(exchange="x", symbol="A")
    snap = PD.absorb(None, [PerpUpdate(kind="funding", ts=20, rate=2e-4, funding_time=100, mark_price=10.0, **u),
                            PerpUpdate(kind="funding", ts=10, rate=1e-4, funding_time=100, **u),  # older: ignored
                            PerpUpdate(kind="liquidation", ts=5, side="sell", price=10.0, amount=2.0, **u),
                            PerpUpdate(kind="liquidation", ts=6, side="buy", price=10.0, amount=1.0, **u),
                            PerpUpdate(kind="open_interest", ts=7, open_interest=50.0, **u)])
    assert (snap.funding_rate, snap.mark_price, snap.open_interest) == (2e-4, 10.0, 50.0)
    assert (snap.liq_sell, snap.liq_buy, snap.liq_count) == (20.0, 10.0, 2)
    nxt = PD.levels_only(snap)
    assert (nxt.funding_rate, nxt.liq_sell, nxt.liq_count) == (2e-4, 0.0, 0)
    later = PD.absorb(nxt, [PerpUpdate(kind="liquidation", ts=30, side="sell", price=10.0, amount=1.0, **u)])
    period = PD.merge(snap, later)  # a roll-up of the two minutes
    assert period.liq_sell == 30.0 and period.funding_rate == 2e-4


@pytest.mark.parametrize("raw, reason", [
    (b'{"perp":"funding","exchange":"x","symbol":"A","ts":1704067200000}', "missing_field"),
    (b'{"perp":"funding","exchange":"x","symbol":"A","ts":1704067200000,"rate":"high"}', "wrong_type"),
    (b'{"perp":"liquidation","exchange":"x","symbol":"A","ts":1704067200000,"side":"long","price":1,"amount":1}',
     "unknown_side"),
    (b'{"perp":"liquidation","exchange":"x","symbol":"A","ts":1704067200000,"side":"buy","price":-1,"amount":1}',
     "non_positive"),
    (b'{"perp":"basis","exchange":"x","symbol":"A","ts":1704067200000}', "wrong_type"),
    (b'{"perp":"funding","exchange":"x","symbol":"A","ts":17040672000,"rate":0.0001}', "ts_out_of_range"),
])
def test_an_unusable_perp_message_is_a_dead_letter_with_its_reason(raw, reason):
    good = PD.encode(PerpUpdate(kind="funding", exchange="x", symbol="A", ts=T0, rate=1e-4))[1]
    d = decode_batch(RawBatch("t", "0", [7, 8], [good, raw], T0), now_ms=T0)
    assert [(x.kind, x.seq) for x in d.events] == [("funding", 7)]
    assert [(x.offset, x.reason) for x in d.dead] == [(8, reason)]
    assert d.dead[0].payload == raw.decode()  # the message as it came, not a re-encoding


def book():
    return PaperBook(initial_equity=10_000.0, fee_bps=0.0, slippage_bps=0.0,
                     tags={"origin": "production", "strategy_id": "s", "variant_id": "base", "config_hash": "h"})


H8 = 8 * 3_600_000


def test_funding_is_paid_by_a_position_held_through_the_funding_time_only():
    b = book()
    snap = PD.absorb(None, [PerpUpdate(kind="funding", exchange="x", symbol="A", ts=T0 + H8 - 1_000, rate=1e-3,
                                       funding_time=T0 + H8, mark_price=200.0)])
    b.submit_open("x:A", "x", "A", +1, 1_000.0, T0, "a", None, 300_000)
    b.fill_pending("x:A", T0, 100.0)  # long 10 at 100
    b.note_funding("x:A", snap)
    assert b.settle_funding("x:A", T0 + H8 - MIN) == []  # not due yet
    (pay,) = b.settle_funding("x:A", T0 + H8)
    assert pay.amount == pytest.approx(-10 * 200.0 * 1e-3) and b.cash == pytest.approx(10_000.0 - 2.0)
    assert b.settle_funding("x:A", T0 + H8 + MIN) == []  # once per funding time
    fill, closed = b.close("x:A", T0 + H8 + MIN, 100.0, "test", T0)
    assert closed.net_pnl == pytest.approx(-2.0) and fill.realised_pnl == pytest.approx(-2.0)

    s = book()  # a short receives a positive rate; an entry at the funding time itself pays nothing
    s.note_funding("x:A", snap)
    s.submit_open("x:A", "x", "A", -1, 1_000.0, T0, "a", None, 300_000)
    s.fill_pending("x:A", T0, 100.0)
    (pay,) = s.settle_funding("x:A", T0 + H8)
    assert pay.amount == pytest.approx(+2.0)
    late = book()
    late.note_funding("x:A", snap)
    assert late.settle_funding("x:A", T0 + H8) == []  # settled before the bar's fills: nothing held
    late.submit_open("x:A", "x", "A", +1, 1_000.0, T0 + H8, "a", None, 300_000)
    late.fill_pending("x:A", T0 + H8, 100.0)
    assert late.settle_funding("x:A", T0 + H8 + MIN) == [] and late.cash == 10_000.0


def test_the_tape_walk_price_never_falls_with_size():
    rng = np.random.default_rng(3)
    n = 400
    price = 100 * np.exp(np.cumsum(rng.normal(0, 2e-4, n)))
    walk = build(price, rng.pareto(1.5, n) + 0.1, rng.random(n) < 0.5, price.max(), price.min())
    for buy in (True, False):
        got = [walk_price(walk, q, buy) for q in np.geomspace(0.01, 5_000, 60)]
        steps = np.diff(got) if buy else -np.diff(got)
        assert (steps >= -1e-9).all()
        assert got[-1] == pytest.approx(walk.high if buy else walk.low, rel=1e-3)  # beyond the kept trades: the extreme
    assert walk_price(None, 1.0, True) is None


def test_a_funding_time_after_a_quiet_minute_is_paid_with_the_announcement_from_before_it():
    """No trade in the minute before 08:00: the 07:59 announcement (rate for 08:00) reaches the book
    in the same bar as the first one for 16:00 (made after 08:00). 08:00 is paid at the 07:59 rate;
    16:00's announcement, made inside the bar, waits for a later bar."""
    u = dict(kind="funding", exchange="x", symbol="A")
    snap = PD.absorb(None, [PerpUpdate(ts=T0 + H8 - 30_000, rate=1e-3, funding_time=T0 + H8, mark_price=100.0, **u),
                            PerpUpdate(ts=T0 + H8 + 90_000, rate=-4e-3, funding_time=T0 + 2 * H8, mark_price=100.0,
                                       **u)])
    assert [a[0] for a in snap.fundings] == [T0 + H8, T0 + 2 * H8] and snap.funding_rate == -4e-3
    b = book()
    b.submit_open("x:A", "x", "A", +1, 1_000.0, T0, "a", None, 300_000)
    b.fill_pending("x:A", T0, 100.0)
    start = T0 + H8 + 60_000  # the bar after the quiet minute
    b.note_funding("x:A", snap, before=start)
    (pay,) = b.settle_funding("x:A", start)
    assert (pay.ts, pay.rate, pay.amount) == (T0 + H8, 1e-3, pytest.approx(-10 * 100.0 * 1e-3))
    b.note_funding("x:A", snap)  # the bar's end: now the 16:00 announcement too
    assert b.settle_funding("x:A", start + 60_000) == []
    (later,) = b.settle_funding("x:A", T0 + 2 * H8)
    assert later.rate == -4e-3 and later.amount == pytest.approx(+4.0)


def test_a_recorded_perp_file_reads_back_as_the_same_updates(tmp_path):
    # ingest --record writes the perp data that came with the trades as a perp file beside the
    # tape; replay must read back every kind and field as it was (the venue's source included)
    from dataflows.ingest import perp_frame
    from operators.tape_files import is_perp_file, perp_updates

    t0 = 1_704_067_200_000
    ups = [PerpUpdate(kind="funding", exchange="binanceusdm", symbol="BTC/USDT:USDT", ts=t0 + 5, rate=-2.5e-4,
                      funding_time=t0 + 28_800_000, mark_price=42_001.5, index_price=41_999.0,
                      source="ccxt:binanceusdm", seq=17),
           PerpUpdate(kind="open_interest", exchange="binanceusdm", symbol="BTC/USDT:USDT", ts=t0 + 60_000,
                      open_interest=1234.5, oi_value=5.2e7, source="ccxt:binanceusdm", seq=40),
           PerpUpdate(kind="liquidation", exchange="bybit", symbol="ETH/USDT:USDT", ts=t0 + 61_000, side="sell",
                      price=2_250.25, amount=3.0, source="ccxt:bybit")]
    frame = perp_frame(ups)
    assert set(frame.columns) == {"perp", *PerpUpdate.__struct_fields__} - {"kind", "seq"}  # every field kept
    path = tmp_path / "perp-1.parquet"
    frame.write_parquet(path)
    back = pl.read_parquet(path)
    assert is_perp_file(back)
    assert perp_updates(back, None, None, path) == [msgspec.structs.replace(u, seq=None) for u in ups]
