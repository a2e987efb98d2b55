"""Perpetual-futures data through the whole pipeline (issue 13): funding, open interest and
liquidations as in-band Kafka messages -> their tables, bar-aligned features, funding payments in
the paper books' equity; and fills that walk the tape, so a large order pays more than a small one."""

import polars as pl
import pytest

from operators.perp import PerpUpdate, encode
from tests.conftest import scratch_store
from tests.helpers import T0, raw_batches, run_pipeline, settings, stored, synthetic_tape

MIN = 60_000
H8 = 8 * 3_600_000
SYM = "BTC/USDT:USDT"
RATE = 5e-4  # 5 bps per funding: large, so a wrong sign or a missed payment shows
LIQ_AT = (T0 + 4 * 60 * MIN + 2 * MIN + 7_000, T0 + 4 * 60 * MIN + 3 * MIN + 1_000)  # inside the 5m bar 04:00-04:05
HOLD = dict(stop_loss_pct=0.0, take_profit_pct=0.0, trailing_activation_pct=0.0, trailing_distance_pct=0.0,
            atr_sl_mult=0.0, atr_tp_mult=0.0, time_stop_bars=0, exit_on_opposite=False)
LOOSE = dict(conf_min=0.4, alpha_min=0.02, no_trade_conf=0.35, require_warm=False, consensus_enabled=False)


def perp_stream(tape: pl.DataFrame, bad: bool = False) -> list:
    """The tape's trades with in-band perp messages, each after the trades at or before its ts:
    funding every minute (5 bps, mark = the last price), open interest every 5 minutes, two long
    liquidations (``LIQ_AT``)."""
    trades = tape.drop("offset").to_dicts()
    ups: list[PerpUpdate] = []
    last = {}
    for t in trades:
        last[t["ts"] // MIN] = t["price"]
    price = None
    for m in range(tape["ts"].min() // MIN, tape["ts"].max() // MIN + 1):
        price = last.get(m, price)
        ts = m * MIN + 59_999
        ups.append(PerpUpdate(kind="funding", exchange="x", symbol=SYM, ts=ts, rate=RATE,
                              funding_time=(ts // H8 + 1) * H8, mark_price=price, index_price=price * 0.9999))
        if m % 5 == 0:
            ups.append(PerpUpdate(kind="open_interest", exchange="x", symbol=SYM, ts=m * MIN + 30_000,
                                  open_interest=1_000.0 + m % 97))
    for ts in LIQ_AT:
        ups.append(PerpUpdate(kind="liquidation", exchange="x", symbol=SYM, ts=ts, side="sell",
                              price=last[ts // MIN], amount=2.5))
    ups.sort(key=lambda u: u.ts)
    out, i = [], 0
    for t in trades:
        while i < len(ups) and ups[i].ts < t["ts"]:
            out.append(encode(ups[i]))
            i += 1
        out.append(t)
    out += [encode(u) for u in ups[i:]]
    if bad:  # a funding message without its rate: a dead letter, not a silent zero
        out.insert(len(out) // 2, (f"x:{SYM}", b'{"perp":"funding","exchange":"x","symbol":"%s","ts":%d}'
                                   % (SYM.encode(), T0 + 90 * MIN)))
    return out


@pytest.fixture(scope="module")
def held_run(tmp_path_factory, chdb_dsn):
    """One position opened early and held to the end (no exits), over the 08:00 funding time."""
    tmp = tmp_path_factory.mktemp("perp")
    tape = synthetic_tape([SYM], minutes=9 * 60, rate=0.5)
    with scratch_store(chdb_dsn) as store:
        cfg = settings(tmp / "d", online_warmup_labels=20, strategy={**LOOSE, **HOLD})
        stats = run_pipeline(raw_batches(perp_stream(tape, bad=True), size=700), store, cfg)
        yield store, stats, tape


def test_perp_updates_reach_their_tables_and_a_bad_one_is_a_dead_letter(held_run):
    store, stats, tape = held_run
    minutes = tape["ts"].max() // MIN - tape["ts"].min() // MIN + 1
    funding = stored(store, "funding_rates", "ts")
    assert funding.height == minutes and set(funding["rate"]) == {RATE}
    assert stored(store, "open_interest", "ts").height == len(range(tape["ts"].min() // MIN, tape["ts"].max() // MIN + 1, 5))
    liq = stored(store, "liquidations", "ts")
    assert liq.height == 2 and set(liq["side"]) == {"sell"}
    dead = stored(store, "dead_letters", "offset")
    assert dead["reason"].to_list() == ["missing_field"] and "needs rate" in dead["detail"][0]
    assert stats.counters.get("perp.funding") == minutes


def test_perp_features_use_only_data_up_to_the_bar_end(held_run):
    store, _, _ = held_run
    f = stored(store, "features", "start").with_columns(pl.col("start").dt.epoch("ms").alias("s"))
    vals = {r["s"]: r["values"] for r in f.iter_rows(named=True)}
    assert all(v.get("funding_bps") == pytest.approx(RATE * 1e4) for v in vals.values())
    assert all(v.get("basis_bps") == pytest.approx(1e4 / 0.9999 - 1e4) for v in vals.values())
    bar = T0 + 4 * 60 * MIN  # the liquidations' 5m bar sees them; the bars before and after do not
    assert vals[bar]["liq_long_share"] > 0 and vals[bar]["liq_imbalance"] == -1.0
    assert vals[bar - 5 * MIN]["liq_long_share"] == 0.0 and vals[bar + 5 * MIN]["liq_long_share"] == 0.0
    assert all(v.get("oi_chg") is not None for s, v in vals.items() if s > T0 + 10 * MIN)


def test_a_position_held_over_a_funding_time_pays_funding_and_equity_includes_it(held_run):
    store, _, _ = held_run
    fills = stored(store, "fills", "ts").with_columns(pl.col("ts").dt.epoch("ms").alias("t"))
    (entry,) = fills.filter(pl.col("reason") == "entry").iter_rows(named=True)  # held to the end
    assert entry["t"] < T0 + H8
    pay = stored(store, "funding_payments", "ts").with_columns(pl.col("ts").dt.epoch("ms").alias("t"))
    assert pay["t"].to_list() == [T0 + H8] and pay["position_id"].to_list() == [entry["position_id"]]
    p = pay.row(0, named=True)
    # longs pay a positive rate, shorts receive it; at the mark of the last update before 08:00
    assert p["position_side"] == entry["position_side"] and p["qty"] == pytest.approx(entry["qty"])
    assert p["amount"] == pytest.approx(-entry["position_side"] * entry["qty"] * p["mark_price"] * RATE)
    marks = stored(store, "funding_rates", "ts").with_columns(pl.col("ts").dt.epoch("ms").alias("t"))
    assert p["mark_price"] == marks.filter(pl.col("t") < T0 + H8)["mark_price"][-1]
    eq = stored(store, "equity", "ts").with_columns(pl.col("ts").dt.epoch("ms").alias("t"))
    before, after = eq.filter(pl.col("t") <= T0 + H8), eq.filter(pl.col("t") > T0 + H8)
    assert set(before["funding"]) == {0.0} and after["funding"].to_list() == pytest.approx([p["amount"]] * after.height)
    # cash = initial equity - entry fee + funding (nothing closed)
    assert after["cash"][-1] == pytest.approx(10_000.0 - entry["fee"] + p["amount"])


def test_a_large_order_walks_further_into_the_tape_than_a_small_one(store, tmp_path):
    """The same decisions sized 100 x apart: the large entries fill at worse prices (the VWAP of
    more of the trades after the open), the small ones near the open plus the fixed slippage."""
    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=6 * 60, rate=0.6)
    got = {}
    for name, notional in (("small", 200.0), ("large", 20_000.0)):
        store.command("TRUNCATE TABLE fills")
        # sizing alone differs (the vol guard off and no loss guards, so both runs take the same decisions)
        cfg = settings(tmp_path / name, online_warmup_labels=20,
                       strategy={**LOOSE, "base_notional": notional, "vol_guard_enabled": False, "initial_equity": 1e7,
                                 "max_consecutive_losses": 10_000, "daily_loss_limit": 1.0, "max_drawdown": 1.0})
        run_pipeline(raw_batches(tape.drop("offset").to_dicts(), size=2000), store, cfg)
        got[name] = stored(store, "fills", "ts").filter(pl.col("reason") == "entry").select(
            "symbol", "decision_ts", "slippage_bps", "qty")
    both = got["small"].join(got["large"], on=["symbol", "decision_ts"], suffix="_large")
    print(both)
    assert both.height >= 5  # decisions after a fill at another price may differ (stops are set from it)
    assert (both["qty_large"] > 50 * both["qty"]).all()
    assert (both["slippage_bps_large"] >= both["slippage_bps"] - 1e-9).all()
    assert (both["slippage_bps_large"] > both["slippage_bps"] + 0.5).mean() >= 0.6
    assert both["slippage_bps_large"].mean() > both["slippage_bps"].mean() + 1.0
    assert both["slippage_bps"].min() >= 2.0 - 1e-9  # never better than the open + the fixed floor


def test_a_replay_takes_funding_history_and_liquidation_files_beside_the_trades(store, tmp_path):
    """ccxt's fetch_funding_rate_history rows and a liquidation file with a ``perp`` column, replayed
    with the trade tape: stored, and in the features of the bars after them."""
    from bytewax.testing import run_main

    from dataflows.pipeline import build_flow
    from dataflows.replay_source import ReplaySource
    from sinks.clickhouse import ClickHouseSink, SinkStats

    tape = synthetic_tape([SYM], minutes=3 * 60, rate=0.5)
    tape.select("id", pl.col("ts").alias("timestamp"), "price", "amount", "side").write_csv(tmp_path / "trades.csv")
    hours = [T0 + h * 3_600_000 for h in range(4)]
    pl.DataFrame({"symbol": SYM, "timestamp": hours, "fundingRate": [1e-4, 2e-4, -3e-4, 4e-4],
                  "fundingTimestamp": [t + H8 for t in hours]}).write_csv(tmp_path / "funding.csv")
    pl.DataFrame({"perp": "liquidation", "timestamp": [T0 + 90 * MIN + 1], "side": ["buy"], "price": [61_000.0],
                  "amount": [0.5]}).write_csv(tmp_path / "liq.csv")
    src = ReplaySource([tmp_path / "funding.csv", tmp_path / "trades.csv", tmp_path / "liq.csv"],
                       exchange="x", symbol=SYM, batch_size=3_000)
    assert src.describe()["perp_updates"] == 5
    run_main(build_flow(settings(tmp_path / "d"), src, ClickHouseSink(store.dsn, store.database, SinkStats())))
    fr = stored(store, "funding_rates", "ts")
    assert fr["rate"].to_list() == [1e-4, 2e-4, -3e-4, 4e-4] and set(fr["source"]) == {"replay:funding.csv"}
    # (the 03:00 update comes after the last trade: reported, not dropped)
    ev = stored(store, "events", "ts").filter(pl.col("kind") == "perp_unplaced")
    assert ev.height == 1 and ev["reason"][0].startswith("1 perp update")
    assert stored(store, "liquidations", "ts")["notional"].to_list() == [30_500.0]
    f = stored(store, "features", "start").with_columns(pl.col("end").dt.epoch("ms").alias("e"))
    fund = {r["e"]: r["values"].get("funding_bps") for r in f.iter_rows(named=True)}
    # the rate of the newest update before each bar's end: 1 bps until 01:00, then 2, from 02:00 -3
    assert all(v == pytest.approx(1.0 if e <= T0 + 60 * MIN else 2.0 if e <= T0 + 120 * MIN else -3.0)
               for e, v in fund.items())
    liq = {r["e"]: r["values"].get("liq_short_share") for r in f.iter_rows(named=True)}
    assert liq[T0 + 95 * MIN] > 0 and liq[T0 + 90 * MIN] == 0.0 and liq[T0 + 100 * MIN] == 0.0
