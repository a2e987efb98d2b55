"""Replay files people actually have (tapeflow issue 10): files in any order, time columns in any
unit, Kraken-style exports without id and side, --symbol/--exchange that must not rename a file's
own instruments, and one-line errors for files that cannot be replayed.

Partitions are driven by hand (build_part, next_batch until StopIteration) and decoded with the
pipeline's own decode_batch; expected values come from the rows as written here, never from the
code under test."""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dataflows.replay_source import ReplaySource
from operators.tape_files import ReplayFormatError
from operators.tape_order import load_tape
from operators.decode import decode_batch

T0 = 1_704_067_200_000  # 2024-01-01T00:00Z
NOW_MS = T0 + 400 * 86_400_000
STEP = "inp"


def drain(src: ReplaySource, resume=None) -> list:
    part = src.build_part(STEP, src.list_parts()[0], resume)
    out = []
    for _ in range(100_000):
        try:
            out.extend(part.next_batch())
        except StopIteration:
            return out
    raise AssertionError("the partition never stopped")


def decoded(batches) -> tuple[pl.DataFrame, list]:
    outs = [decode_batch(b, NOW_MS) for b in batches]
    return pl.concat([o.frame for o in outs]), [d for o in outs for d in o.dead]


def trades(n: int = 40, seed: int = 1, symbol: str = "ETH/USDT") -> pl.DataFrame:
    """ccxt-style trades in time order with integer ids; several share a timestamp (ties), and
    ids are not in text order ("9" after "10" as text)."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.cumsum(rng.choice([0, 0, 1, 250, 7_000], n))
    return pl.DataFrame({
        "timestamp": ts, "id": [str(5 + i) for i in range(n)], "symbol": [symbol] * n,
        "side": rng.choice(["buy", "sell"], n), "price": np.round(100 + rng.normal(0, 0.5, n), 2),
        "amount": np.round(rng.uniform(0.1, 2.0, n), 3),
    })


# ---------------------------------------------------------------------------------------------
# order


def test_reversed_shuffled_and_split_files_release_the_same_trades_as_the_sorted_file(tmp_path):
    tape = trades()
    assert tape["timestamp"].is_duplicated().any()  # equal timestamps: the tie order is exercised
    sorted_csv = tmp_path / "sorted.csv"
    tape.write_csv(sorted_csv)
    want, _ = decoded(drain(ReplaySource([sorted_csv], exchange="x")))
    # the expected replay order, computed here: ts, then the id as a number
    assert want["id"].to_list() == tape.sort("timestamp", pl.col("id").cast(pl.Int64))["id"].to_list()
    assert want["seq"].to_list() == list(range(tape.height))

    rev, shuf = tmp_path / "rev.csv", tmp_path / "shuf.parquet"
    tape.reverse().write_csv(rev)
    tape.sample(fraction=1.0, shuffle=True, seed=3).write_parquet(shuf)
    pick = np.random.default_rng(5).random(tape.height) < 0.5
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    tape.filter(pl.Series(pick)).write_csv(a)
    tape.filter(~pl.Series(pick)).reverse().write_csv(b)
    for files in ([rev], [shuf], [a, b], [b, a]):
        got, dead = decoded(drain(ReplaySource(files, exchange="x")))
        assert dead == []
        assert got.drop("recv_ts").equals(want.drop("recv_ts")), [f.name for f in files]


def test_a_lone_bad_timestamp_keeps_its_place_in_the_exchange_sequence(tmp_path):
    # integer ids that follow time are the exchange's sequence: the trade stamped an hour off is
    # released among its id-neighbours (where the jump rule downstream refutes it), not an hour later
    t = trades(60)
    bad = t.with_columns(pl.when(pl.col("id") == "35").then(pl.col("timestamp") + 3_600_000)
                         .otherwise(pl.col("timestamp")).alias("timestamp"))
    p = tmp_path / "t.csv"
    bad.reverse().write_csv(p)
    got, dead = decoded(drain(ReplaySource([p], exchange="x")))
    assert dead == [] and got["id"].to_list() == t["id"].to_list()


def test_ids_that_do_not_follow_time_are_not_taken_for_a_sequence(tmp_path):
    t = trades(60)
    rng = np.random.default_rng(3)
    scrambled = t.with_columns(pl.Series("id", [str(i) for i in rng.permutation(1000)[:60] + 1]))
    p = tmp_path / "t.csv"
    scrambled.reverse().write_csv(p)
    got, _ = decoded(drain(ReplaySource([p], exchange="x")))
    assert got["ts"].to_list() == sorted(t["timestamp"].to_list())  # time order, ids only break ties


def test_a_gzipped_csv_reads_like_the_plain_one(tmp_path):
    import gzip

    tape = trades(12)
    plain, packed = tmp_path / "t.csv", tmp_path / "t.csv.gz"
    tape.reverse().write_csv(plain)
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    want, _ = decoded(drain(ReplaySource([plain], exchange="x")))
    got, _ = decoded(drain(ReplaySource([packed], exchange="x")))
    assert got.height == 12 and got.drop("recv_ts").equals(want.drop("recv_ts"))


def test_ids_compare_as_text_when_not_all_are_integers(tmp_path):
    p = tmp_path / "t.csv"
    pl.DataFrame({"timestamp": [T0] * 3, "id": ["b-2", "a-10", "a-9"], "side": ["buy"] * 3,
                  "price": [1.0, 2.0, 3.0], "amount": [1.0] * 3}).write_csv(p)
    got, _ = decoded(drain(ReplaySource([p], exchange="x", symbol="A/B")))
    assert got["id"].to_list() == ["a-10", "a-9", "b-2"]


def test_an_out_of_order_file_is_reported_with_the_first_batch(tmp_path):
    tape = trades(30)
    p = tmp_path / "backwards.csv"
    tape.reverse().write_csv(p)
    src = ReplaySource([p], exchange="x", batch_size=7)
    info = src.check()
    in_file = tape.reverse()["timestamp"].to_list()
    behind = sum(1 for i, t in enumerate(in_file) if i and t < max(in_file[:i]))  # below an earlier row
    assert 0 < behind < 30
    assert info["rows"] == 30 and info["out_of_order"] == behind
    assert info["files"][0]["out_of_order"] == behind and "backwards.csv" in info["summary"]
    batches = drain(src)
    assert [len(b.events) for b in batches] == [1] + [0] * (len(batches) - 1)
    ev = batches[0].events[0]
    assert ev.kind == "replay_sorted" and "backwards.csv" in ev.reason
    assert json.loads(ev.detail)["out_of_order"] == behind
    assert (ev.exchange, ev.symbol) == ("x", "ETH/USDT")
    # a sorted file says nothing
    ok = tmp_path / "ok.csv"
    tape.write_csv(ok)
    assert all(b.events == [] for b in drain(ReplaySource([ok], exchange="x")))
    assert ReplaySource([ok], exchange="x").check()["out_of_order"] == 0


@pytest.mark.parametrize("k", [0, 5, 17, 40])
def test_a_split_tape_resumes_at_any_position_of_the_sorted_order(tmp_path, k):
    tape = trades(40)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    tape.slice(20).write_csv(a)  # the later half first
    tape.slice(0, 20).write_csv(b)
    src = ReplaySource([a, b], exchange="x", batch_size=6)
    full, _ = decoded(drain(src))
    part = src.build_part(STEP, src.list_parts()[0], None)
    first = []
    while sum(x.frame.height for x in first) < k:
        first.extend(part.next_batch())
    snap = pickle.loads(pickle.dumps(part.snapshot()))
    rest = drain(ReplaySource([a, b], exchange="x", batch_size=6), snap)
    assert snap == sum(x.frame.height for x in first)
    if snap == 40:
        assert rest == []
    else:
        got, _ = decoded(rest)
        assert got.drop("recv_ts").equals(full.slice(snap).drop("recv_ts"))
        assert all(b.events == [] for b in rest)  # events went out with the first batch already


def test_unreadable_times_sort_last_and_become_dead_letters(tmp_path):
    p = tmp_path / "t.csv"
    lines = ["timestamp,id,side,price,amount", f"{T0 + 5000},3,buy,10,1", "yesterday,4,buy,10,1",
             f"{T0},1,sell,10,1", f"{T0 + 1000},2,buy,11,1"]
    p.write_text("\n".join(lines) + "\n")
    good, dead = decoded(drain(ReplaySource([p], exchange="x", symbol="A/B")))
    assert good["id"].to_list() == ["1", "2", "3"] and good["seq"].to_list() == [0, 1, 2]
    assert [(d.offset, d.reason) for d in dead] == [(3, "wrong_type")]
    assert "yesterday" in dead[0].payload


# ---------------------------------------------------------------------------------------------
# time units

MS = [T0 + 123, T0 + 1_000, T0 + 61_500, T0 + 3_600_000]


def _file(tmp_path, ts, name="t.csv") -> Path:
    p = tmp_path / name
    df = pl.DataFrame({"timestamp": ts, "id": [str(i) for i in range(len(MS))], "side": ["buy"] * len(MS),
                       "price": [1.0] * len(MS), "amount": [1.0] * len(MS)})
    df.write_parquet(p) if name.endswith(".parquet") else df.write_csv(p)
    return p


@pytest.mark.parametrize("unit,values,want", [
    ("s", [t // 1000 for t in MS], [t // 1000 * 1000 for t in MS]),  # integer seconds: whole seconds
    ("s", [f"{t / 1000:.3f}" for t in MS], MS),  # decimal seconds
    ("ms", MS, MS),
    ("us", [t * 1000 + 999 for t in MS], MS),  # truncated to the ms
    ("ns", [t * 1_000_000 + 456_789 for t in MS], MS),
    ("iso8601", [datetime.fromtimestamp(t / 1000, tz=timezone.utc).isoformat() for t in MS], MS),
])
def test_a_csv_time_column_in_any_unit_becomes_epoch_ms(tmp_path, unit, values, want):
    p = _file(tmp_path, [str(v) for v in values])
    src = ReplaySource([p], exchange="x", symbol="A/B")
    assert src.check()["files"][0]["ts_unit"] == unit
    got, dead = decoded(drain(src))
    assert dead == [] and got["ts"].to_list() == want


@pytest.mark.parametrize("time_unit,tz", [("us", None), ("ns", "Asia/Tokyo"), ("ms", "UTC")])
def test_a_parquet_datetime_column_of_any_unit_and_zone_becomes_epoch_ms(tmp_path, time_unit, tz):
    # the instants as Python datetimes (UTC), then stored with the given unit and zone
    utc = pl.Series([datetime.fromtimestamp(t / 1000, tz=timezone.utc) for t in MS]).cast(pl.Datetime(time_unit, "UTC"))
    col = utc.dt.convert_time_zone(tz) if tz else utc.dt.replace_time_zone(None)
    p = _file(tmp_path, col, "t.parquet")
    assert pl.read_parquet(p).schema["timestamp"] == pl.Datetime(time_unit, tz)
    got, dead = decoded(drain(ReplaySource([p], exchange="x", symbol="A/B")))
    assert dead == [] and got["ts"].to_list() == MS


def test_one_stray_row_is_not_rescaled_but_becomes_a_dead_letter(tmp_path):
    secs = [t // 1000 for t in MS] * 5
    secs[7] = MS[0]  # one row in ms inside a file in seconds
    p = tmp_path / "t.csv"
    pl.DataFrame({"timestamp": secs, "id": [str(i) for i in range(20)], "side": ["buy"] * 20,
                  "price": [1.0] * 20, "amount": [1.0] * 20}).write_csv(p)
    good, dead = decoded(drain(ReplaySource([p], exchange="x", symbol="A/B")))
    assert good.height == 19 and [d.reason for d in dead] == ["ts_out_of_range"]
    assert json.loads(dead[0].payload)["id"] == "7"


@pytest.mark.parametrize("values,says", [
    ([t // 1000 for t in MS[:2]] + MS[2:], "cannot tell the time unit"),  # half seconds, half ms
    (["soon", "later", "then", str(MS[0])], "not numbers or ISO-8601"),  # junk in most rows
    ([1, 2, 3, 4], "cannot tell the time unit"),  # a row number, not a time
])
def test_an_undecidable_time_column_is_a_one_line_error(tmp_path, values, says):
    p = _file(tmp_path, [str(v) for v in values], "odd-times.csv")
    with pytest.raises(ReplayFormatError) as err:
        ReplaySource([p], exchange="x", symbol="A/B").check()
    msg = str(err.value)
    assert says in msg and "odd-times.csv" in msg and "'timestamp'" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# Kraken-style exports: headerless timestamp(s),price,volume; no id, no side

KRAKEN = """\
1672531436,90.540000,1.10448420
1672531471,90.450000,1.00000000
1672531647,90.450000,0.28600000
1672533909,90.600000,0.05000000
1672533909,90.600000,0.55555555
1672533909,90.100000,0.25000000
1672539535,90.100000,0.50000000
"""


def tick_rule(prices: list[float]) -> list[str]:
    """The tick test written out: up = buy, down = sell, unchanged = as before; first = buy."""
    out, last = [], "buy"
    for i, p in enumerate(prices):
        if i and p > prices[i - 1]:
            last = "buy"
        elif i and p < prices[i - 1]:
            last = "sell"
        out.append(last)
    return out


def test_kraken_export_is_read_with_seconds_derived_ids_and_tick_rule_sides(tmp_path):
    p = tmp_path / "BCHEUR.csv"
    p.write_text(KRAKEN)
    src = ReplaySource([p], exchange="kraken", symbol="BCH/EUR")
    info = src.check()["files"][0]
    assert (info["format"], info["ts_unit"], info["ids_derived"], info["side_inferred"]) == \
        ("kraken-csv", "s", True, True)
    batches = drain(src)
    got, dead = decoded(batches)
    rows = [line.split(",") for line in KRAKEN.split()]
    ts = [int(r[0]) * 1000 for r in rows]
    prices = [float(r[1]) for r in rows]
    assert dead == [] and got["ts"].to_list() == ts and got["price"].to_list() == prices
    assert got["amount"].to_list() == [float(r[2]) for r in rows]
    assert got["id"].to_list() == [f"{t}-{sum(1 for u in ts[:i] if u == t)}" for i, t in enumerate(ts)]
    assert ["buy" if b else "sell" for b in got["is_buy"]] == tick_rule(prices)
    assert set(got["exchange"]) == {"kraken"} and set(got["symbol"]) == {"BCH/EUR"}
    kinds = [e.kind for e in batches[0].events]
    assert kinds == ["replay_side_inferred"]
    before_first_tick = next(i for i in range(1, len(prices)) if prices[i] != prices[i - 1])
    assert json.loads(batches[0].events[0].detail)["before_first_tick_called_buy"] == before_first_tick
    # a reversed export is read backwards: the same trades, ids and sides
    rev = tmp_path / "rev.csv"
    rev.write_text("\n".join(reversed(KRAKEN.split())) + "\n")
    again, _ = decoded(drain(ReplaySource([rev], exchange="kraken", symbol="BCH/EUR")))
    assert again.drop("recv_ts").equals(got.drop("recv_ts"))


def test_kraken_export_needs_exchange_and_symbol(tmp_path):
    p = tmp_path / "BCHEUR.csv"
    p.write_text(KRAKEN)
    with pytest.raises(ReplayFormatError, match="--symbol"):
        ReplaySource([p], exchange="kraken").check()


def test_the_kraken_sample_is_read_completely():
    """tests/samples/kraken-BCHEUR.csv: a Kraken-layout export (see tests/samples/README.md)."""
    p = Path(__file__).parent.parent / "samples" / "kraken-BCHEUR.csv"
    raw = pl.read_csv(p, has_header=False, new_columns=["t", "price", "volume"])
    got, dead = decoded(drain(ReplaySource([p], exchange="kraken", symbol="BCH/EUR")))
    assert dead == [] and got.height == raw.height
    want = raw.with_row_index().sort("t", "index")  # the file's own order within a second
    assert got["ts"].to_list() == (want["t"] * 1000).to_list()
    assert got["price"].to_list() == want["price"].to_list()
    assert got["amount"].to_list() == want["volume"].to_list()
    assert ["buy" if b else "sell" for b in got["is_buy"]] == tick_rule(want["price"].to_list())
    assert got["id"].n_unique() == got.height


# ---------------------------------------------------------------------------------------------
# --symbol / --exchange fill, never override


def test_symbol_option_on_a_file_with_several_symbols_is_an_error(tmp_path):
    p = tmp_path / "three.csv"
    pl.concat([trades(5, symbol=s) for s in ("A/USDT", "B/USDT", "C/USDT")]).write_csv(p)
    with pytest.raises(ReplayFormatError) as err:
        ReplaySource([p], exchange="x", symbol="A/USDT").check()
    msg = str(err.value)
    assert "three.csv" in msg and "symbol" in msg and "\n" not in msg
    assert all(s in msg for s in ("A/USDT", "B/USDT", "C/USDT"))
    # without --symbol the three instruments stay three
    got, _ = decoded(drain(ReplaySource([p], exchange="x")))
    assert sorted(set(got["symbol"])) == ["A/USDT", "B/USDT", "C/USDT"] and got.height == 15


def test_exchange_option_conflicting_with_the_file_is_an_error(tmp_path):
    p = tmp_path / "t.csv"
    trades(4).with_columns(pl.lit("okx").alias("exchange")).write_csv(p)
    with pytest.raises(ReplayFormatError, match="'okx'"):
        ReplaySource([p], exchange="bybit").check()
    assert set(decoded(drain(ReplaySource([p], exchange="okx")))[0]["exchange"]) == {"okx"}


def test_symbol_option_fills_a_file_without_a_symbol_column(tmp_path):
    p = tmp_path / "t.csv"
    trades(6).drop("symbol").write_csv(p)
    got, _ = decoded(drain(ReplaySource([p], exchange="x", symbol="SOL/USDT")))
    assert got["symbol"].to_list() == ["SOL/USDT"] * 6


# ---------------------------------------------------------------------------------------------
# files that cannot be replayed: one line, before any dataflow


def _files(tmp_path) -> dict:
    ok = trades(3)
    made = {}

    def put(name, data):
        p = tmp_path / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        made[name] = p

    put("empty.csv", "")
    put("blank.csv", "\n\n")
    put("binary.csv", bytes(range(256)) * 4)
    pq = tmp_path / "real.parquet"
    ok.write_parquet(pq)
    put("parquet-named.csv", pq.read_bytes())
    put("tape.json", "[]")
    put("columns.csv", "when,what,how_much\n2024-01-01,buy,1\n")
    put("semicolons.csv", "timestamp;price;amount\n1704067200000;1;1\n")
    put("header-only.csv", "timestamp,id,side,price,amount\n")
    put("five.csv", "1,2,3,4,5\n")
    put("ragged.csv", "timestamp,id,side,price,amount\n1704067200000,1,buy,1,1\n1704067200001,2\n")
    put("broken.parquet", b"PAR1 this is not parquet")
    put("empty.parquet", b"")
    ok.head(0).write_parquet(tmp_path / "norows.parquet")
    made["norows.parquet"] = tmp_path / "norows.parquet"
    return made


@pytest.mark.parametrize("name,says", [
    ("empty.csv", "empty"), ("blank.csv", "empty"), ("binary.csv", "binary"),
    ("parquet-named.csv", "name it .parquet"), ("tape.json", "use .csv, .csv.gz or .parquet"),
    ("columns.csv", "missing"), ("semicolons.csv", "comma-separated"), ("header-only.csv", "no trade rows"),
    ("five.csv", "headerless CSV with 5 columns"), ("ragged.csv", "cannot be read as CSV"),
    ("broken.parquet", "not a readable Parquet"), ("empty.parquet", "empty"), ("norows.parquet", "no rows"),
])
def test_unusable_files_are_one_line_errors_naming_the_file(tmp_path, name, says):
    p = _files(tmp_path)[name]
    src = ReplaySource([p], exchange="x", symbol="A/B")  # constructing reads nothing
    with pytest.raises(ReplayFormatError) as err:
        src.check()
    msg = str(err.value)
    assert says in msg and name in msg and "\n" not in msg, msg


def test_load_tape_names_the_bad_file_among_good_ones(tmp_path):
    good = tmp_path / "good.csv"
    trades(3).write_csv(good)
    bad = tmp_path / "bad.csv"
    bad.write_text("")
    with pytest.raises(ReplayFormatError, match="bad.csv"):
        load_tape([good, bad], "x")
