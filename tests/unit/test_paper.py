"""operators.paper: next-open fills, fees and slippage against us, PnL and equity accounting."""

import copy
import pickle

import pytest

from operators.execution import Execution
from operators.paper import PaperBook

# ---------------------------------------------------------------- helpers
T = 1_700_000_100_000 - (1_700_000_100_000 % 300_000)   # a 5m boundary
TAGS = {"origin": "production", "strategy_id": "s", "variant_id": "v", "config_hash": "h"}
INST = "binanceusdm:BTC/USDT:USDT"


def book(fee_bps=5.0, slippage_bps=2.0, equity=10_000.0):
    return PaperBook(initial_equity=equity, fee_bps=fee_bps, slippage_bps=slippage_bps, tags=dict(TAGS))


def open_long(b, notional=1_000.0, decision_ts=T, side=1):
    return b.submit_open(INST, "binanceusdm", "BTC/USDT:USDT", side, notional, decision_ts, "model_online", 1.5,
                         300_000)


# ---------------------------------------------------------------- tests
def test_the_paper_book_is_an_execution():
    assert isinstance(book(), Execution)


def test_pending_order_waits_for_a_bar_starting_at_or_after_the_decision():
    b = book()
    pid = open_long(b)
    assert b.open_count() == 1 and not b.positions
    assert b.fill_pending(INST, T - 60_000, 99.0) == ([], None)       # the decision bar's last minute
    fills, closed = b.fill_pending(INST, T, 100.0)
    assert closed is None and len(fills) == 1
    f = fills[0]
    assert (f.ts, f.reason, f.position_id, f.side, f.decision_ts) == (T, "entry", pid, "buy", T)
    assert f.ref_price == 100.0 and f.price == pytest.approx(100.0 * 1.0002)
    assert f.qty == pytest.approx(1_000.0 / f.price) and f.notional == pytest.approx(1_000.0)
    assert f.fee == pytest.approx(1_000.0 * 0.0005)
    assert f.origin == "production" and f.config_hash == "h" and f.realised_pnl is None
    assert b.cash == pytest.approx(10_000.0 - f.fee)
    assert b.open_count() == 1 and not b.pending


def test_long_round_trip_pnl_fees_and_equity():
    b = book()
    open_long(b)
    (entry,), _ = b.fill_pending(INST, T, 100.0)
    b.mark(INST, 110.0)
    assert b.unrealised() == pytest.approx(entry.qty * (110.0 - entry.price))
    assert b.equity() == pytest.approx(10_000.0 - entry.fee + entry.qty * (110.0 - entry.price))
    assert b.submit_close(INST, T + 600_000, "opposite_signal") == entry.position_id
    assert b.submit_close(INST, T + 600_000, "opposite_signal") is None            # already closing
    (ex,), closed = b.fill_pending(INST, T + 600_000, 110.0)
    assert ex.side == "sell" and ex.reason == "opposite_signal" and ex.price == pytest.approx(110.0 * 0.9998)
    gross = entry.qty * (ex.price - entry.price)
    net = gross - entry.fee - ex.fee
    assert ex.realised_pnl == pytest.approx(net) and closed.net_pnl == pytest.approx(net)
    assert ex.pnl_bps == pytest.approx(net / (entry.qty * entry.price) * 1e4)
    assert b.equity() == pytest.approx(10_000.0 + net) and b.cash == pytest.approx(10_000.0 + net)
    assert b.fees == pytest.approx(entry.fee + ex.fee)
    assert (b.trades, b.wins) == (1, 1) and not b.positions


def test_short_pays_slippage_the_other_way_and_profits_when_price_falls():
    b = book()
    open_long(b, side=-1)
    (entry,), _ = b.fill_pending(INST, T, 100.0)
    assert entry.side == "sell" and entry.price == pytest.approx(99.98)
    ex, closed = b.close(INST, T + 60_000, 90.0, "take_profit", T)
    assert ex.side == "buy" and ex.price == pytest.approx(90.018)
    assert closed.net_pnl == pytest.approx(entry.qty * (99.98 - 90.018) - entry.fee - ex.fee)
    assert closed.net_pnl > 0


def test_losing_trade_counts_as_loss():
    b = book(fee_bps=0.0, slippage_bps=0.0)
    open_long(b)
    b.fill_pending(INST, T, 100.0)
    ex, closed = b.close(INST, T + 60_000, 95.0, "stop_loss", T)
    assert closed.net_pnl == pytest.approx(-50.0) and ex.pnl_bps == pytest.approx(-500.0)
    assert (b.trades, b.wins, b.gross_loss) == (1, 0, pytest.approx(50.0))


def test_mark_to_exit_bps_includes_both_fees_and_exit_slippage():
    b = book(fee_bps=5.0, slippage_bps=0.0)
    open_long(b)
    b.fill_pending(INST, T, 100.0)
    pos = b.positions[INST]
    assert b.mark_to_exit_bps(pos, 100.0) == pytest.approx(-10.0)
    assert b.mark_to_exit_bps(pos, 101.0) == pytest.approx(100.0 - 5.0 - 5.05)


def test_one_order_per_instrument_and_cancel():
    b = book()
    open_long(b)
    with pytest.raises(ValueError):
        open_long(b)
    assert b.cancel(INST).kind == "open" and b.open_count() == 0
    open_long(b)
    b.fill_pending(INST, T, 100.0)
    b.submit_close(INST, T + 60_000, "time_stop")
    assert b.positions[INST].closing
    b.cancel(INST)
    assert not b.positions[INST].closing


def test_book_pickles_mid_trade():
    b = book()
    open_long(b)
    b.fill_pending(INST, T, 100.0)
    b.mark(INST, 101.0)
    for c in (pickle.loads(pickle.dumps(b)), copy.deepcopy(b)):
        assert c.equity() == b.equity()
        f1, _ = c.close(INST, T + 60_000, 102.0, "take_profit", T)
        f2, _ = copy.deepcopy(b).close(INST, T + 60_000, 102.0, "take_profit", T)
        assert f1 == f2
