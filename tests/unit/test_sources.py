"""Unit tests for the synthetic and replay sources (dataflows/synthetic_source.py,
dataflows/replay_source.py): partitions driven by hand (build_part, next_batch until
StopIteration, snapshot, rebuild), file formats of the replay source, and clear format errors.

Expected rows come from the generator called directly or from the files as written here."""

from __future__ import annotations

import pickle
import time as real_time
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

import dataflows.frame_partition as frame_mod
from dataflows.replay_source import ReplaySource
from dataflows.synthetic_source import SyntheticSource
from operators import synthetic as syn
from operators.tape_files import ReplayFormatError
from operators.decode import decode_batch

T0 = 1_704_067_200_000
MIN = 60_000
NOW_MS = T0 + 400 * 86_400_000  # "now" for decoding: the files hold 2024 and 2025 trades
STEP = "inp"


def drain(part, limit: int = 100_000) -> list:
    out = []
    for _ in range(limit):
        try:
            out.extend(part.next_batch())
        except StopIteration:
            return out
    raise AssertionError("the partition never stopped")


def take(part, n_batches: int) -> list:
    out = []
    for _ in range(n_batches):
        out.extend(part.next_batch())
    return out


def frames(batches) -> pl.DataFrame:
    return pl.concat([b.frame for b in batches]) if batches else None


# ---------------------------------------------------------------------------------------------
# synthetic

SYMS = ["BTC/USDT:USDT", "SOL/USDT:USDT"]


def synthetic(**kw) -> SyntheticSource:
    args = dict(symbols=SYMS, start_ms=T0, end_ms=T0 + 12 * MIN, seed=4, rate=0.5, batch_size=40)
    args.update(kw)
    return SyntheticSource(**args)


def expected_synthetic(symbol: str, minutes: int = 12, seed: int = 4, rate: float = 0.5) -> pl.DataFrame:
    cols, _ = syn.generate(syn.spec_for(symbol, rate), seed, T0, minutes)
    return pl.DataFrame({
        "exchange": ["synthetic"] * len(cols["ts"]), "symbol": [symbol] * len(cols["ts"]),
        "id": [str(i) for i in cols["id"]], "ts": cols["ts"], "price": cols["price"], "amount": cols["amount"],
        "side": ["buy" if b else "sell" for b in cols["is_buy"]], "offset": cols["offset"],
    })


def merged(symbols, **kw) -> pl.DataFrame:
    """The generator's tapes of ``symbols`` merged in time order (ties: symbol order), as one
    partition carrying several symbols releases them."""
    return pl.concat([expected_synthetic(s, **kw) for s in symbols]).sort("ts", maintain_order=True)


def test_synthetic_partitions_spread_symbols_and_emit_the_generator_tape():
    s = synthetic(partitions=2)
    assert s.list_parts() == ["synthetic-0", "synthetic-1"]
    for part, sym in zip(s.list_parts(), SYMS):  # symbol i -> partition i mod 2
        batches = drain(s.build_part(STEP, part, None))
        assert len(batches) > 2  # 40-row batches over ~360+ rows
        assert all(b.source == "synthetic" and b.partition == part for b in batches)
        got = frames(batches)
        want = expected_synthetic(sym)
        assert got.select(want.columns).equals(want.with_columns(pl.col("offset").cast(got["offset"].dtype)))
        minutes = [(b.frame["ts"] // MIN).unique().len() for b in batches]
        assert minutes[:-1] == [s.batch_minutes()] * (len(batches) - 1)  # whole minutes, as many in every batch
        d = [decode_batch(b, NOW_MS) for b in batches]
        assert sum(x.frame.height for x in d) == want.height and not any(x.dead for x in d)


def test_every_partition_releases_the_same_minutes_a_batch_whatever_its_symbols_trade_rates():
    """bytewax polls each partition once a round: with batches of equal event-time spans, partitions
    of different trade rates stay level in event time. Batches of ``batch_size`` trades let SOL's
    partition run ahead of BTC's (twice as many minutes a batch), and the portfolio, which waits for
    every instrument's bar of a minute, held the faster ones' bars: memory growing with the run."""
    s = SyntheticSource(SYMS, T0, T0 + 48 * 60 * MIN, seed=4, batch_size=20_000, partitions=2)  # default rates
    k = s.batch_minutes()
    per_minute = 60 * syn.TRADES_PER_ORDER * syn.spec_for(SYMS[0]).rate  # BTC's partition is the busier
    assert k == int(20_000 // per_minute) and k > 1
    parts = [s.build_part(STEP, p, None) for p in s.list_parts()]
    ends, sizes = [], []
    for _ in range(20):  # rounds of one poll per partition, as bytewax polls
        batches = [p.next_batch() for p in parts]
        ends.append([(b[0].frame["ts"].max() - T0) // MIN for b in batches])
        sizes.append([b[0].frame.height for b in batches])
    for rnd, (btc, sol) in enumerate(ends, 1):
        assert btc == sol == rnd * k - 1  # both at the same minute after every round
    btc_rows = sum(r[0] for r in sizes) / len(sizes)
    assert 0.8 * 20_000 < btc_rows < 2 * 20_000  # the busiest partition's batches: batch_size, more when busy
    assert sum(r[1] for r in sizes) < 0.6 * sum(r[0] for r in sizes)  # SOL's are smaller, not longer


def test_batch_minutes_for_a_nearly_silent_tape_is_finite():
    assert synthetic(rate=1e-12, batch_size=40).batch_minutes() == 40  # at most batch_size minutes


def test_batches_hold_batch_size_trades_or_up_to_twice_as_many_in_busy_regimes():
    """The busiest partition's batches are sized for calm minutes (``TRADES_PER_ORDER``): smaller
    batches cost speed (bench/pair_run.sh, 32 symbols: 7% slower sized for the 48 h average)."""
    for sym in ("BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT", "S07/USDT:USDT"):
        spec = syn.spec_for(sym)
        cols, _ = syn.generate(spec, 7, T0, 48 * 60)  # regimes change the activity 1-2.5x: a long run
        per_order = len(cols["ts"]) / (48 * 3600 * spec.rate)
        assert 1.0 <= per_order / syn.TRADES_PER_ORDER <= 2.0, (sym, per_order)


def test_one_partition_carries_several_symbols_in_time_order():
    s = synthetic(partitions=1)
    assert s.list_parts() == ["synthetic-0"]
    got = frames(drain(s.build_part(STEP, "synthetic-0", None)))
    want = merged(SYMS)
    assert got.select(want.columns).equals(want.with_columns(pl.col("offset").cast(got["offset"].dtype)))
    assert got["ts"].is_sorted()


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_synthetic_resume_from_a_snapshot_yields_exactly_the_rest(k):
    s = synthetic(partitions=1)
    full = frames(drain(s.build_part(STEP, "synthetic-0", None)))
    part = s.build_part(STEP, "synthetic-0", None)
    first = take(part, k)
    snap = pickle.loads(pickle.dumps(part.snapshot()))  # snapshots must survive pickling
    rest = frames(drain(s.build_part(STEP, "synthetic-0", snap)))
    head = frames(first) if first else full.head(0)
    assert pl.concat([head, rest]).equals(full)


def test_synthetic_snapshot_at_the_end_resumes_to_nothing():
    s = synthetic()
    part = s.build_part(STEP, "synthetic-1", None)
    drain(part)
    assert drain(s.build_part(STEP, "synthetic-1", part.snapshot())) == []


class FakeWall:
    """Stands in for the ``time`` module inside dataflows.frame_partition (wall clock under test control)."""

    def __init__(self, t: float):
        self.t = t

    def time(self) -> float:
        return self.t

    def time_ns(self) -> int:
        return real_time.time_ns()


def test_paced_synthetic_releases_by_event_time_and_resumes_mid_minute(monkeypatch):
    wall = FakeWall(1_000_000.0)
    monkeypatch.setattr(frame_mod, "time", SimpleNamespace(time=wall.time, time_ns=wall.time_ns))
    s = synthetic(speed=60.0, symbols=[SYMS[0]], end_ms=T0 + 3 * MIN)  # one event minute per wall second
    full = expected_synthetic(SYMS[0], minutes=3)
    ts = full["ts"].to_numpy()

    part = s.build_part(STEP, "synthetic-0", None)
    # the pacer is anchored at the source's start (T0, shared by every partition), at the first poll
    assert take(part, 1) == [] and ts[0] > T0  # the wall clock has not moved: nothing is due yet
    assert part.next_awake() == datetime.fromtimestamp(wall.t + (ts[0] - T0) / 1000 / 60, tz=timezone.utc)
    wall.t += 0.3  # 18 event seconds
    got = part.next_batch()
    released = frames(got)
    assert released["ts"].to_list() == [int(t) for t in ts if t <= T0 + 18_000]
    assert released.height < (ts < T0 + MIN).sum()  # mid-minute
    snap = part.snapshot()

    resumed = s.build_part(STEP, "synthetic-0", snap)
    rest = []
    for _ in range(1_000):
        wall.t += 1_000.0
        try:
            rest.extend(resumed.next_batch())
        except StopIteration:
            break
    assert pl.concat([released, frames(rest)]).equals(full.with_columns(pl.col("offset").cast(released["offset"].dtype)))


# ---------------------------------------------------------------------------------------------
# replay: ccxt CSV, Parquet, Binance public data

CCXT_CSV = """\
,timestamp,date,symbol,id,type,side,price,amount,cost
0,1704067200123,2024-01-01 00:00:00.123000+00:00,ETH/USDT:USDT,9001,,buy,2250.5,0.4,900.2
1,1704067201000,2024-01-01 00:00:01+00:00,ETH/USDT:USDT,9002,,sell,2250.25,1.25,2812.8125
2,1704067201000,2024-01-01 00:00:01+00:00,ETH/USDT:USDT,9003,,sell,2250,0.75,1687.5
3,1704067262500,2024-01-01 00:01:02.500000+00:00,ETH/USDT:USDT,9004,,buy,2251.75,2,4503.5
"""

CCXT_EXPECTED = {
    "exchange": ["binanceusdm"] * 4,
    "symbol": ["ETH/USDT:USDT"] * 4,
    "id": ["9001", "9002", "9003", "9004"],
    "ts": [1704067200123, 1704067201000, 1704067201000, 1704067262500],
    "price": [2250.5, 2250.25, 2250.0, 2251.75],
    "amount": [0.4, 1.25, 0.75, 2.0],
    "is_buy": [True, False, False, True],
    "seq": [0, 1, 2, 3],
}


def decoded(batches) -> pl.DataFrame:
    outs = [decode_batch(b, NOW_MS) for b in batches]
    assert all(o.dead == [] for o in outs), [o.dead for o in outs]
    return pl.concat([o.frame for o in outs])


def check(frame: pl.DataFrame, expected: dict):
    assert frame.select(list(expected)).to_dict(as_series=False) == expected


def test_replay_ccxt_csv_with_index_and_date_columns(tmp_path):
    p = tmp_path / "eth.csv"
    p.write_text(CCXT_CSV)
    s = ReplaySource([p], exchange="binanceusdm")
    assert s.list_parts() == ["0:eth.csv"]
    batches = drain(s.build_part(STEP, "0:eth.csv", None))
    assert all(b.source == "replay" and b.partition == "0:eth.csv" for b in batches)
    check(decoded(batches), CCXT_EXPECTED)


def test_replay_symbol_and_exchange_options_fill_but_never_override_the_file(tmp_path):
    p = tmp_path / "eth.csv"
    p.write_text(CCXT_CSV)
    s = ReplaySource([p], exchange="bybit", symbol="ETH/USDT:USDT")  # equal to the file's symbol: fine
    d = decoded(drain(s.build_part(STEP, "0:eth.csv", None)))
    assert set(d["symbol"]) == {"ETH/USDT:USDT"} and set(d["exchange"]) == {"bybit"}
    with pytest.raises(ReplayFormatError, match="ETH/USDT:USDT"):  # conflicting: an error, not a rename
        ReplaySource([p], exchange="bybit", symbol="ETH/USDC:USDC").check()


@pytest.mark.parametrize("k", range(5))
def test_replay_csv_resumes_at_any_row(tmp_path, k):
    p = tmp_path / "eth.csv"
    p.write_text(CCXT_CSV)
    s = ReplaySource([p], exchange="binanceusdm")
    batches = drain(s.build_part(STEP, "0:eth.csv", k))
    if k == 4:  # the snapshot of a finished file
        assert batches == []
    else:
        check(decoded(batches), {c: v[k:] for c, v in CCXT_EXPECTED.items()})


def _parquet(tmp_path, n=8):
    df = pl.DataFrame({
        "exchange": ["okx"] * n,
        "symbol": ["BTC/USDT:USDT"] * n,
        "timestamp": [T0 + 1_000 * i for i in range(n)],
        "id": [500 + i for i in range(n)],  # integer ids in the file
        "side": ["buy" if i % 3 else "sell" for i in range(n)],
        "price": [42_000.0 + 0.5 * i for i in range(n)],
        "amount": [0.25 * (i + 1) for i in range(n)],
    })
    p = tmp_path / "btc.parquet"
    df.write_parquet(p)
    expected = {
        "exchange": ["okx"] * n, "symbol": ["BTC/USDT:USDT"] * n,
        "id": [str(500 + i) for i in range(n)], "ts": [T0 + 1_000 * i for i in range(n)],
        "price": [42_000.0 + 0.5 * i for i in range(n)], "amount": [0.25 * (i + 1) for i in range(n)],
        "is_buy": [i % 3 != 0 for i in range(n)], "seq": list(range(n)),
    }
    return p, expected


def test_replay_parquet_in_batches(tmp_path):
    p, expected = _parquet(tmp_path)
    s = ReplaySource([p], batch_size=3)
    batches = drain(s.build_part(STEP, "0:btc.parquet", None))
    assert [b.frame.height for b in batches] == [3, 3, 2]
    check(decoded(batches), expected)


def test_replay_parquet_snapshot_mid_file_resumes_with_exactly_the_rest(tmp_path):
    p, expected = _parquet(tmp_path)
    s = ReplaySource([p], batch_size=3)
    part = s.build_part(STEP, "0:btc.parquet", None)
    first = take(part, 1)
    snap = part.snapshot()
    assert snap == 3
    rest = drain(s.build_part(STEP, "0:btc.parquet", pickle.loads(pickle.dumps(snap))))
    check(decoded(first + rest), expected)
    check(decoded(rest), {c: v[3:] for c, v in expected.items()})
    # a position inside a stored batch (as a paced replay can leave it) works too
    check(decoded(drain(s.build_part(STEP, "0:btc.parquet", 4))), {c: v[4:] for c, v in expected.items()})


BINANCE_MS = """\
1001,42000.10,0.005,210.0005,1704067200123,true,true
1002,42000.20,0.010,420.002,1704067200456,false,true
1003,41999.90,0.250,10499.975,1704067260001,True,true
"""

BINANCE_US = """\
7001,93000.5,0.002,186.001,1735689600123456,false,true
7002,93000.0,0.100,9300.0,1735689600999999,true,true
"""


def test_replay_binance_public_data_headerless_ms(tmp_path):
    p = tmp_path / "BTCUSDT-trades-2024-01-01.csv"
    p.write_text(BINANCE_MS)
    s = ReplaySource([p], exchange="binance", symbol="BTC/USDT")
    d = decoded(drain(s.build_part(STEP, s.list_parts()[0], None)))
    # is_buyer_maker true -> the buyer was the maker -> the taker sold
    check(d, {"exchange": ["binance"] * 3, "symbol": ["BTC/USDT"] * 3, "id": ["1001", "1002", "1003"],
              "ts": [1704067200123, 1704067200456, 1704067260001], "price": [42000.10, 42000.20, 41999.90],
              "amount": [0.005, 0.010, 0.250], "is_buy": [False, True, False], "seq": [0, 1, 2]})


def test_replay_binance_public_data_microseconds_become_ms(tmp_path):
    p = tmp_path / "BTCUSDT-trades-2025-01-01.csv"
    p.write_text(BINANCE_US)
    s = ReplaySource([p], exchange="binance", symbol="BTC/USDT")
    d = decoded(drain(s.build_part(STEP, s.list_parts()[0], None)))
    check(d, {"id": ["7001", "7002"], "ts": [1735689600123, 1735689600999], "is_buy": [True, False],
              "price": [93000.5, 93000.0], "amount": [0.002, 0.1]})


def test_replay_binance_futures_dump_with_header(tmp_path):
    p = tmp_path / "BTCUSDT-trades-2024-01.csv"
    p.write_text("id,price,qty,quote_qty,time,is_buyer_maker\n" + "\n".join(
        ",".join(line.split(",")[:6]) for line in BINANCE_MS.strip().splitlines()) + "\n")
    s = ReplaySource([p], exchange="binanceusdm", symbol="BTC/USDT:USDT")
    d = decoded(drain(s.build_part(STEP, s.list_parts()[0], None)))
    check(d, {"id": ["1001", "1002", "1003"], "is_buy": [False, True, False],
              "ts": [1704067200123, 1704067200456, 1704067260001]})


# ---------------------------------------------------------------------------------------------
# format errors


def test_csv_without_the_needed_columns_is_a_clear_error(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("when,what,how_much\n2024-01-01,buy,1\n")
    s = ReplaySource([p], exchange="x", symbol="A/B")
    with pytest.raises(ReplayFormatError) as err:
        drain(s.build_part(STEP, "0:odd.csv", None))
    msg = str(err.value)
    assert "odd.csv" in msg
    for c in ("price", "amount", "side", "id"):
        assert c in msg
    assert "when" in msg  # says what it found


def test_parquet_without_the_needed_columns_is_a_clear_error(tmp_path):
    p = tmp_path / "odd.parquet"
    pl.DataFrame({"timestamp": [T0], "price": [1.0]}).write_parquet(p)
    s = ReplaySource([p], exchange="x", symbol="A/B")
    with pytest.raises(ReplayFormatError, match="amount"):
        drain(s.build_part(STEP, "0:odd.parquet", None))


def test_missing_exchange_or_symbol_asks_for_the_option(tmp_path):
    p, _ = _parquet(tmp_path)
    pl.read_parquet(p).drop("exchange").write_parquet(p)
    s = ReplaySource([p])
    with pytest.raises(ReplayFormatError, match="--exchange"):
        drain(s.build_part(STEP, "0:btc.parquet", None))


def test_unknown_extension_and_missing_file(tmp_path):
    p = tmp_path / "tape.json"
    p.write_text("[]")
    with pytest.raises(ReplayFormatError, match="tape.json"):
        ReplaySource([p], exchange="x", symbol="A/B").build_part(STEP, "0:tape.json", None)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ReplaySource([tmp_path / "nope.csv"])


def test_bad_values_in_a_replay_file_become_dead_letters_not_exceptions(tmp_path):
    p = tmp_path / "eth.csv"
    lines = CCXT_CSV.splitlines()
    lines[2] = lines[2].replace("2250.25", "2250_25")  # not a number
    lines[3] = lines[3].replace(",sell,", ",hold,")
    p.write_text("\n".join(lines) + "\n")
    s = ReplaySource([p], exchange="binanceusdm")
    outs = [decode_batch(b, NOW_MS) for b in drain(s.build_part(STEP, "0:eth.csv", None))]
    dead = {d.offset: d.reason for o in outs for d in o.dead}
    assert dead == {1: "wrong_type", 2: "unknown_side"}
    assert np.concatenate([o.frame["seq"].to_numpy() for o in outs]).tolist() == [0, 3]
