"""The portfolio's Sequencer (operators/portfolio.py): every instrument's items in one event-time
order, whatever the interleaving the partitions and processes deliver them in (issue 11)."""

import pickle
import random
from types import SimpleNamespace

import msgspec

from operators.bars import Bar
from operators.strategy_config import StrategyConfig
from operators.records import Event
from operators.portfolio import Portfolio, Sequencer, upgrade_sequencer
from tests.unit.test_strategy import EX, M, SYM, T0, bar, row, scenario

ETH = "ETH/USDT:USDT"
UNIVERSE = (f"{EX}:{SYM}", f"{EX}:{ETH}")


def streams(items) -> dict:
    """Per instrument, in the order the pipeline delivers it: by end, a minute's scored row before
    the 1m bar that ends with it (the bar is the instrument's progress marker)."""
    out: dict = {}
    for _, x in items:
        out.setdefault(x.instrument, []).append(x)
    for inst in out:
        out[inst].sort(key=lambda x: (x.end, isinstance(x, Bar)))
    return out


def interleave(per_inst: dict, rng: random.Random) -> list[list]:
    """One arrival order (each instrument's own order kept), cut into batches of random size."""
    pos = {k: 0 for k in per_inst}
    flat: list = []
    while any(pos[k] < len(v) for k, v in per_inst.items()):
        k = rng.choice([k for k in sorted(pos) if pos[k] < len(per_inst[k])])
        n = rng.randint(1, 40)
        flat.extend(per_inst[k][pos[k]:pos[k] + n])
        pos[k] += n
    batches, i = [], 0
    while i < len(flat):
        n = rng.randint(1, 60)
        batches.append(flat[i:i + n])
        i += n
    return batches


def run_book(batches, universe=UNIVERSE, sequenced=True) -> list[bytes]:
    p = Portfolio.create(StrategyConfig(seed=5, require_warm=False, s_min=0.05, cooldown_bars=0))
    seq = Sequencer(universe)
    out = []
    for batch in batches:
        released = []
        if sequenced:
            for x in batch:
                assert seq.push(x) == []
            released = seq.release()
        else:
            released = batch
        for x in released:
            out += p.on_bar(x) if isinstance(x, Bar) else p.on_scored(x, x.end)
    if sequenced:
        for x in seq.flush():
            out += p.on_bar(x) if isinstance(x, Bar) else p.on_scored(x, x.end)
    return [type(r).__name__.encode() + msgspec.json.encode(r) for r in out]


def test_any_interleaving_and_batch_cut_gives_the_book_the_same_records():
    per_inst = streams(scenario(3, minutes=300))
    assert set(per_inst) == set(UNIVERSE)
    runs = [run_book(interleave(per_inst, random.Random(k))) for k in range(6)]
    assert len(runs[0]) > 100 and any(b"Fill" in r for r in runs[0]), "the book should trade"
    assert all(r == runs[0] for r in runs[1:])
    # the same arrival orders fed straight to the book (what live runs did before) disagree
    unsequenced = [run_book(interleave(per_inst, random.Random(k)), sequenced=False) for k in range(6)]
    assert any(r != unsequenced[0] for r in unsequenced[1:])


def test_an_instrument_of_the_universe_is_waited_for_before_its_first_item():
    seq = Sequencer(UNIVERSE)
    for m in range(5):
        seq.push(bar(T0 + m * M, 100, symbol=SYM))
    assert seq.release() == []  # ETH has shown nothing yet: its partition may simply be read later
    seq.push(bar(T0, 50, symbol=ETH))
    got = seq.release()
    assert [(x.symbol, x.end) for x in got] == [(SYM, T0 + M), (ETH, T0 + M)]  # time first, then instrument
    assert [x.end for x in seq.flush()] == [T0 + m * M for m in range(2, 6)]


def test_items_at_one_time_go_bars_first_then_by_instrument():
    seq = Sequencer(UNIVERSE)
    r_eth, r_btc = row(T0 + M, symbol=ETH), row(T0 + M, symbol=SYM)
    b_eth, b_btc = bar(T0, 10, symbol=ETH), bar(T0, 10, symbol=SYM)
    for x in (r_eth, b_eth, r_btc, b_btc):
        seq.push(x)
    assert seq.release() == [b_btc, b_eth, r_btc, r_eth]


def test_an_undeclared_instrument_behind_the_book_is_applied_and_recorded():
    seq = Sequencer((f"{EX}:{SYM}",))
    seq.push(bar(T0 + 10 * M, 100, symbol=SYM))
    assert len(seq.release()) == 1
    late = bar(T0, 10, symbol=ETH)  # first seen after the book passed its time
    (ev,) = seq.push(late)
    assert isinstance(ev, Event) and ev.kind == "instrument_joined" and ev.symbol == ETH
    assert seq.release() == [late]  # applied at once, out of order, and said so


def test_live_a_silent_instrument_is_waited_for_a_bounded_time_then_recorded_and_skipped():
    seq = Sequencer(UNIVERSE, wait_ms=1_000)
    for m in range(3):
        seq.push(bar(T0 + m * M, 100, symbol=SYM))
    assert seq.release(now_ms=0) == [] and seq.next_check() == 1_000
    assert seq.release(now_ms=999) == []
    out = seq.release(now_ms=1_000)
    (silent,) = [x for x in out if isinstance(x, Event)]
    assert silent.kind == "instrument_silent" and silent.symbol == ETH
    assert [x.end for x in out if isinstance(x, Bar)] == [T0 + M, T0 + 2 * M, T0 + 3 * M]
    seq.push(bar(T0 + 3 * M, 100, symbol=SYM))
    assert len(seq.release(now_ms=1_001)) == 1  # the book goes on without ETH
    (back,) = seq.push(bar(T0 + 4 * M, 50, symbol=ETH))
    assert back.kind == "instrument_back"
    seq.push(bar(T0 + 5 * M, 100, symbol=SYM))
    assert [(x.symbol, x.end) for x in seq.release(now_ms=1_002)] == [(ETH, T0 + 5 * M)]  # waited for again


def test_the_sequencer_survives_a_snapshot_and_a_previous_release_snapshot_is_upgraded():
    seq = Sequencer(UNIVERSE)
    seq.push(bar(T0, 100, symbol=SYM))
    again = pickle.loads(pickle.dumps(seq))
    assert again == seq
    old = SimpleNamespace(last_end={f"{EX}:{SYM}": T0 + M}, buffer=[(T0 + M, 0, f"{EX}:{SYM}", 1, "x")], n=1)
    new = upgrade_sequencer(old, Sequencer(UNIVERSE))
    assert new.progress == {f"{EX}:{SYM}": T0 + M} and new.buffer == [(T0 + M, 0, f"{EX}:{SYM}", 1, "x")]
    new.universe = (f"{EX}:{SYM}",)
    assert new.release() == ["x"]


def test_the_portfolio_logic_wakes_itself_to_declare_a_silent_instrument_when_nothing_else_comes():
    """Live: when every instrument's feed stops, no batch comes to release what is held; the logic
    asks bytewax to wake it (``notify_at``) and declares the laggard silent then."""
    import time

    from dataflows.pipeline import PortfolioLogic

    logic = PortfolioLogic(None, lambda: Portfolio.create(StrategyConfig()), None,
                           lambda: Sequencer(UNIVERSE, wait_ms=50))
    out, _ = logic.on_batch([bar(T0 + m * M, 100, symbol=SYM) for m in range(3)])
    assert out == [] and logic.notify_at() is not None  # held: ETH has shown nothing
    wake = logic.notify_at().timestamp()
    assert 0 < wake - time.time() <= 0.06
    time.sleep(max(0.0, wake - time.time()) + 0.01)
    out, _ = logic.on_notify()
    assert [e.kind for e in out if isinstance(e, Event)] == ["instrument_silent"]
    assert logic.seq.released == T0 + 3 * M and logic.notify_at() is None  # all three bars went to the book
