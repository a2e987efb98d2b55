#!/usr/bin/env python
"""Kafka -> bars throughput with a Kafka-protocol broker (tansu) on loopback.

Publishes a synthetic tape (JSON trades keyed exchange:symbol) to a topic, then measures:
  - `tapeflow run --source kafka --eof` with 1 and 2 bytewax processes (the real pipeline:
    decode, dedup, lateness, windows, bars with cohorts and profile, roll-ups, sink);
  - the floor: a plain confluent-kafka loop that decodes the same messages (msgspec) and keeps
    1m OHLCV / buy-sell volume / delta path per instrument in Python dicts.
The broker shares the 2 cores with the consumer. Rates include start-up; medians over --repeat.

    .venv/bin/python bench/kafka_throughput.py                      # 1M trades, 16 symbols, 4 partitions
    .venv/bin/python bench/kafka_throughput.py --store              # with the embedded ClickHouse sink
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trades", type=int, default=1_000_000)
    ap.add_argument("--symbols", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", action="store_true", help="write to embedded ClickHouse (default: count only)")
    args = ap.parse_args()
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
        for p in (1, 2):
            runs = [pipeline(brokers, topic, p, args.store, args.symbols) for _ in range(args.repeat)]
            r = statistics.median(x["trades_in"] / x["wall_s"] for x in runs)
            inside = statistics.median(x["trades_per_s"] for x in runs)
            bars = runs[0]["sink"]["bars"]
            print(f"tapeflow run --source kafka, {p} process(es){' + store' if args.store else ''}: "
                  f"{runs[0]['trades_in']:,} trades -> {bars.get('1m', 0):,} 1m bars (+{sum(bars.values()) - bars.get('1m', 0):,} "
                  f"higher), median {r:,.0f} trades/s incl. start-up, {inside:,.0f} trades/s in the dataflow")


if __name__ == "__main__":
    main()
