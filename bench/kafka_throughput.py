#!/usr/bin/env python
"""Kafka -> bars throughput with a Kafka-protocol broker (tansu) on loopback.

Publishes a synthetic tape (JSON trades keyed exchange:symbol) to a topic, then measures:
  - `tapeflow run --source kafka --eof` with 1 and 2 bytewax processes (the real pipeline:
    decode, dedup, lateness, windows, bars with cohorts and profile, roll-ups, sink);
  - the floor: a plain confluent-kafka loop that decodes the same messages (msgspec) and keeps
    1m OHLCV / buy-sell volume / delta path per instrument in Python dicts;
  - a peer: Quix Streams (bench/peers/quix_ohlcv.py: Application, event-time 1m tumbling window per
    instrument, reduce to OHLCV + buy volume, emitted on close), run with its own venv
    (bench/.peers-venv, made on first use with pip; never the project's venv). Skipped, with the
    reason, when that venv cannot be made (no network), or with --no-peers.
The broker shares the 2 cores with the consumer. Rates include start-up; medians over --repeat.
The last table gives each rate as a ratio to the floor measured in the same run.

    .venv/bin/python bench/kafka_throughput.py                      # 1M trades, 16 symbols, 4 partitions
    .venv/bin/python bench/kafka_throughput.py --store              # with the embedded ClickHouse sink
    .venv/bin/python bench/kafka_throughput.py --no-peers           # without the Quix Streams peer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec  # noqa: E402
import polars as pl  # noqa: E402
from confluent_kafka import Consumer, KafkaError, TopicPartition  # noqa: E402

from dataflows.kafka_topic import TradeProducer, ensure_topic, tape_messages  # noqa: E402
from operators import synthetic as syn  # noqa: E402
from common import run_summary  # noqa: E402
from tests.broker import tansu  # noqa: E402


def make_tape(symbols: int, trades: int, seed: int = 7) -> pl.DataFrame:
    names = [f"S{i:02d}/USDT:USDT" for i in range(symbols)]
    minutes = 1 + trades // (symbols * 60 * 4 * 1.1)
    frames = []
    for s in names:
        cols, _ = syn.generate(syn.spec_for(s, 4.0), seed, 1_704_067_200_000, int(minutes))
        frames.append(pl.DataFrame(cols).with_columns(pl.lit("synthetic").alias("exchange"), pl.lit(s).alias("symbol")))
    df = pl.concat(frames).sort("ts", maintain_order=True).head(trades)
    return df.select("exchange", "symbol", pl.col("id").cast(pl.String), "ts", "price", "amount",
                     pl.when(pl.col("is_buy")).then(pl.lit("buy")).otherwise(pl.lit("sell")).alias("side"))


class T(msgspec.Struct):
    exchange: str
    symbol: str
    id: str
    ts: int
    price: float
    amount: float
    side: str


def plain_loop(brokers: str, topic: str, partitions: int) -> tuple[int, int, float]:
    """confluent-kafka + msgspec + dict aggregation: the floor. Returns (trades, bars, seconds)."""
    t0 = time.time()
    c = Consumer({"bootstrap.servers": brokers, "group.id": "floor", "enable.partition.eof": True,
                  "enable.auto.commit": False, "fetch.queue.backoff.ms": 10})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    dec = msgspec.json.Decoder(T)
    bars: dict = {}
    n, done = 0, set()
    while len(done) < partitions:
        for m in c.consume(10_000, 0.5):
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    done.add(m.partition())
                continue
            t = dec.decode(m.value())
            key = (t.exchange, t.symbol, t.ts // 60_000)
            b = bars.get(key)
            signed = t.amount if t.side == "buy" else -t.amount
            if b is None:
                bars[key] = [t.price, t.price, t.price, t.price, t.amount, t.amount if signed > 0 else 0.0,
                             signed, signed, signed]
            else:
                if t.price > b[1]:
                    b[1] = t.price
                if t.price < b[2]:
                    b[2] = t.price
                b[3] = t.price
                b[4] += t.amount
                if signed > 0:
                    b[5] += signed
                b[6] += signed
                b[7] = min(b[7], b[6])
                b[8] = max(b[8], b[6])
            n += 1
    c.close()
    return n, len(bars), time.time() - t0


def pipeline(brokers: str, topic: str, processes: int, store: bool, symbols: int) -> dict:
    # the topic's instruments named, as a production run should (deterministic trading rows)
    universe = "synthetic:" + ",".join(f"S{i:02d}/USDT:USDT" for i in range(symbols))
    return run_summary(["--source", "kafka", "--brokers", brokers, "--topic", topic, "--eof", "--processes",
                        str(processes), "--instruments", universe] + ([] if store else ["--no-store"]))


BENCH = Path(__file__).resolve().parent
PEERS_VENV = BENCH / ".peers-venv"  # git-ignored
QUIX_VERSION = "3.28.1"
QUIX_SPEC = f"quixstreams=={QUIX_VERSION}"


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1][:300] if lines else "no output"


def peers_python() -> tuple[Optional[Path], str]:
    """The peers' venv python, making the venv (``python -m venv`` + ``pip install quixstreams``) the
    first time: (python, "") or (None, why it could not be made). Kept apart from the project's venv
    so the peer's dependencies can't move the project's pins."""
    py = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".installed"  # written last: a half-made venv is made again
    if py.exists() and stamp.exists() and stamp.read_text().strip() == QUIX_SPEC:
        return py, ""
    print(f"making {PEERS_VENV} ({QUIX_SPEC}) for the peer, once ...", flush=True)
    try:
        if not py.exists():
            r = subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], capture_output=True, text=True,
                               timeout=300)
            if r.returncode != 0:
                return None, f"python -m venv failed: {_tail(r.stderr or r.stdout)}"
        r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--retries", "2", "--timeout", "30", QUIX_SPEC],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return None, f"pip install {QUIX_SPEC} failed: {_tail(r.stderr or r.stdout)}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"making the venv failed: {err}"
    stamp.write_text(QUIX_SPEC + "\n")
    return py, ""


def quix_peer(python: Path, brokers: str, topic: str, partitions: int, expect: int) -> dict:
    """One run of bench/peers/quix_ohlcv.py in the peers' venv -> its JSON line (+ ``wall_s``: the
    whole process, interpreter start included). Raises RuntimeError with the reason if it failed."""
    limit = 120 + expect / 2_000  # the peer gives up by itself after this; a hung process is killed later
    cmd = [str(python), str(BENCH / "peers" / "quix_ohlcv.py"), "--brokers", brokers, "--topic", topic,
           "--partitions", str(partitions), "--expect", str(expect), "--timeout-s", f"{limit:.0f}"]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit + 120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer within {limit + 120:.0f} s") from None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"exit {r.returncode}: {_tail(r.stderr)}")
    res = json.loads(lines[-1])
    res["wall_s"] = time.time() - t0
    return res


def broker_cpu(brokers: str) -> Optional[float]:
    """CPU seconds used so far by the tansu process listening on ``brokers`` (found by its command
    line, which names the listener URL), or None where it cannot be read."""
    want = f"tcp://{brokers}".encode()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"tansu" in (cmd := (d / "cmdline").read_bytes()) and want in cmd:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except OSError:
            continue
    return None


def with_broker_cpu(brokers: str, run: Callable[[], dict]) -> dict:
    """``run()``'s summary plus ``broker_cpu_s``: the broker's CPU seconds during it (None: unknown)."""
    before = broker_cpu(brokers)
    res = run()
    after = broker_cpu(brokers)
    res["broker_cpu_s"] = after - before if before is not None and after is not None else None
    return res


def cpu_split(summary: dict) -> Optional[str]:
    """ "p0 X s, p1 Y s" from a run summary's ``cpu_s_by_process`` (process index -> CPU seconds, a
    dict or a list in process order), or None where the summary has none."""
    cpu = summary.get("cpu_s_by_process")
    if isinstance(cpu, list):
        cpu = dict(enumerate(cpu))
    if not isinstance(cpu, dict) or not cpu:
        return None
    return ", ".join(f"p{k} {float(v):.1f} s" for k, v in sorted(cpu.items(), key=lambda kv: int(kv[0])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trades", type=int, default=1_000_000)
    ap.add_argument("--symbols", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", action="store_true", help="write to embedded ClickHouse (default: count only)")
    ap.add_argument("--no-peers", action="store_true", help="skip the Quix Streams peer")
    args = ap.parse_args()
    peer_py, peer_skip = (None, "--no-peers") if args.no_peers else peers_python()
    if peer_py is None and not args.no_peers:
        print(f"Quix Streams peer skipped: {peer_skip}")
    tape = make_tape(args.symbols, args.trades)
    msgs = tape_messages(tape)
    with tansu() as brokers:
        topic = "trades-bench"
        ensure_topic(brokers, topic, args.partitions)
        prod = TradeProducer(brokers, topic)
        t0 = time.time()
        prod.send_many(msgs)
        prod.flush()
        el = time.time() - t0
        print(f"produced {len(msgs):,} trades ({args.symbols} symbols, {args.partitions} partitions) "
              f"in {el:.1f} s = {len(msgs) / el:,.0f} msg/s")
        floor = [plain_loop(brokers, topic, args.partitions) for _ in range(args.repeat)]
        n, nbars, _ = floor[0]
        rate = statistics.median(f[0] / f[2] for f in floor)
        print(f"floor (confluent-kafka + msgspec + dict 1m OHLCV loop): {n:,} trades -> {nbars:,} 1m bars, "
              f"median {rate:,.0f} trades/s (incl. start-up)")
        quix_rate = None
        if peer_py is not None:
            try:
                peer = [quix_peer(peer_py, brokers, topic, args.partitions, len(msgs)) for _ in range(args.repeat)]
            except RuntimeError as err:
                print(f"Quix Streams peer skipped: its run failed: {err}")
            else:
                q = peer[0]
                quix_rate = statistics.median(x["trades_per_s"] for x in peer)
                startup = statistics.median(x["first_message_s"] or 0.0 for x in peer)
                after = statistics.median(x["trades"] / max(x["seconds"] - (x["first_message_s"] or 0.0), 1e-9)
                                          for x in peer)
                print(f"Quix Streams {QUIX_VERSION} peer (1m tumbling reduce per instrument, .final()): "
                      f"{q['trades']:,} trades -> {q['bars']:,} 1m bars ({q['bars_closed']:,} closed, {q['late']:,} late "
                      f"dropped), median {quix_rate:,.0f} trades/s incl. start-up (script start to stop, "
                      f"first trade after {startup:.1f} s: imports + group join), {after:,.0f} trades/s after it")
                for i, x in enumerate(peer):
                    if x["bars"] != nbars or x["trades"] != n:
                        print(f"  Quix Streams peer run {i + 1} disagrees with the floor: {x['trades']:,} trades, "
                              f"{x['bars']:,} bars vs {n:,}, {nbars:,}")
        tf: dict[int, float] = {}
        tf_inside: dict[int, float] = {}
        for p in (1, 2):
            runs = [with_broker_cpu(brokers, lambda: pipeline(brokers, topic, p, args.store, args.symbols))
                    for _ in range(args.repeat)]
            r = statistics.median(x["trades_in"] / x["wall_s"] for x in runs)
            tf[p] = r
            inside = tf_inside[p] = statistics.median(x["trades_per_s"] for x in runs)
            bars = runs[0]["sink"]["bars"]
            print(f"tapeflow run --source kafka, {p} process(es){' + store' if args.store else ''}: "
                  f"{runs[0]['trades_in']:,} trades -> {bars.get('1m', 0):,} 1m bars (+{sum(bars.values()) - bars.get('1m', 0):,} "
                  f"higher), median {r:,.0f} trades/s incl. start-up, {inside:,.0f} trades/s in the dataflow")
            for i, x in enumerate(runs):  # the broker shares the 2 cores: its CPU is part of the split
                split = cpu_split(x)
                if split:
                    busy = (sum(x["cpu_s_by_process"]) + (x["broker_cpu_s"] or 0.0)) / x["wall_s"]
                    broker = "" if x["broker_cpu_s"] is None else f", broker {x['broker_cpu_s']:.1f} s"
                    print(f"  CPU split{f' (run {i + 1})' if len(runs) > 1 else ''}: {split}{broker} in "
                          f"{x['wall_s']:.1f} s: cores busy {busy:.2f}")
    store = " + store" if args.store else ""
    rows: list[tuple[str, Optional[float], str]] = [("floor: confluent-kafka + msgspec + dicts, incl. start-up", rate, "")]
    if quix_rate is not None:
        rows.append((f"Quix Streams {QUIX_VERSION}, incl. start-up (imports + group join)", quix_rate, ""))
    else:
        rows.append((f"Quix Streams {QUIX_VERSION}: skipped ({peer_skip or 'its run failed'})", None, ""))
    rows += [(f"tapeflow, 1 process{store}, incl. start-up", tf[1], ""),
             (f"tapeflow, 2 processes{store}, incl. start-up", tf[2], f"   ({tf[2] / tf[1]:.2f}x of 1 process)"),
             (f"tapeflow, 1 process{store}, in the dataflow (no imports, start-up)", tf_inside[1], ""),
             (f"tapeflow, 2 processes{store}, in the dataflow", tf_inside[2],
              f"   ({tf_inside[2] / tf_inside[1]:.2f}x of 1 process)")]
    print(f"\nratios to the floor of this run (medians of {args.repeat}; {len(msgs):,} trades, "
          f"{args.partitions} partitions):")
    width = max(len(label) for label, v, _ in rows if v is not None)
    for label, v, note in rows:
        print(f"  {label}" if v is None else f"  {label:<{width}}  {v:>10,.0f} trades/s  {v / rate:5.2f}x{note}")


if __name__ == "__main__":
    main()
