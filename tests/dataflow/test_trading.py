"""The portfolio stage in the whole pipeline: the data-quality gate fed by an in-band data-gap
event, decisions tagged and one per scored row, fills only at a later 1m bar's open."""

import polars as pl

from operators.events import encode_in_band
from operators.records import Event
from tests.helpers import T0, raw_batches, run_pipeline, settings, stored, synthetic_tape

MIN = 60_000


def test_bars_overlapping_a_data_gap_open_nothing_and_say_data_gap(store, tmp_path):
    tape = synthetic_tape(["BTC/USDT:USDT"], minutes=3 * 60, rate=0.5)
    msgs = tape.drop("offset").to_dicts()
    gap_from, gap_to = T0 + 60 * MIN + 30_000, T0 + 75 * MIN  # 01:00:30 -> 01:15
    _, event = encode_in_band(Event(kind="data_gap", ts=gap_to, exchange="x", symbol="BTC/USDT:USDT",
                                    from_ts=gap_from, to_ts=gap_to, reason="history_not_reachable",
                                    detail="test", source="ccxt:x"))
    # in band, as ingest sends it after a reconnect: the event, then what the backfill recovered
    # (here: everything; a gap event still means "may be incomplete"), then the live trades
    msgs.insert(next(i for i, m in enumerate(msgs) if m["ts"] >= gap_from), event)
    run_pipeline(raw_batches(msgs, size=700), store, settings(tmp_path / "d", strategy={"require_warm": False}))

    events = stored(store, "events", "ts")
    assert events.filter(pl.col("kind") == "data_gap").height == 1
    dec = stored(store, "decisions", "ts").with_columns(
        pl.col("bar_start").dt.epoch("ms").alias("s"), pl.col("ts").dt.epoch("ms").alias("e"))
    feats = stored(store, "features", "start")
    assert dec.height == feats.height  # one decision per scored primary row
    overlapping = dec.filter((pl.col("s") < gap_to) & (pl.col("e") > gap_from))
    assert overlapping["s"].to_list() == [T0 + m * MIN for m in (60, 65, 70)]
    assert set(overlapping["quality"]) == {"data_gap"}, overlapping.select("s", "quality", "reason").rows()
    assert set(overlapping["reason"]) == {"data_gap"}
    assert not overlapping["action"].str.starts_with("open").any()
    assert set(dec.join(overlapping, on="s", how="anti")["quality"]) == {""}
    assert set(dec["origin"]) == {"production"} and dec["config_hash"].n_unique() == 1


def test_fills_come_from_a_later_bar_open_never_the_decision_bar(store, tmp_path):
    tape = synthetic_tape(["BTC/USDT:USDT", "ETH/USDT:USDT"], minutes=10 * 60, rate=0.6)
    cfg = settings(tmp_path / "d", online_warmup_labels=20,
                   strategy={"conf_min": 0.4, "alpha_min": 0.02, "no_trade_conf": 0.35, "require_warm": False,
                             "consensus_enabled": False})
    run_pipeline(raw_batches(tape.drop("offset").to_dicts(), size=2000), store, cfg)
    fills = stored(store, "fills", "ts")
    entries = fills.filter(pl.col("reason") == "entry")
    assert entries.height > 0, "the loosened strategy should trade"
    bars = stored(store, "bars", "symbol, start").filter(pl.col("tf") == "1m")
    joined = entries.join(bars.select("symbol", pl.col("start").alias("ts"), "open"), on=["symbol", "ts"])
    assert joined.height == entries.height  # every entry at the open of an existing 1m bar
    assert (joined["ts"] >= joined["decision_ts"]).all()  # at or after the decision (bar end)
    slip = (joined["ref_price"] - joined["open"]).abs().max()
    assert slip < 1e-9  # reference = that bar's open; price = open +- slippage, fee charged
    assert ((joined["price"] - joined["open"]).abs() > 0).all() and (joined["fee"] > 0).all()
    eq = stored(store, "equity", "ts")
    assert eq.height > 0 and set(eq["origin"]) == {"production"}
