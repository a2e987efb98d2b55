#!/usr/bin/env python
"""Resident memory of `tapeflow run --source kafka` over a long backlog of instruments that trade at
different rates (BTC, ETH, SOL at their synthetic defaults: 8, 6, 4 parent orders/s), on a loopback
tansu broker: the tape is published in chunks of a million trades, then the run is sampled by
bench/rss_timeline.py (with the embedded store).

A partition of quieter instruments covers more event time per poll of --kafka-batch-size messages;
if it runs ahead, the portfolio holds its bars until the others catch up, and memory grows with the
length of the backlog. The source holds back a partition over an hour ahead of the slowest other
partition of its process (dataflows/kafka_source.py): compare with --partitions 1, where nothing can
run ahead.

    .venv/bin/python bench/kafka_backlog_memory.py --hours 240     # ~30M trades, ~5 minutes
    .venv/bin/python bench/kafka_backlog_memory.py --hours 240 --processes 2   # process 0 sampled
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataflows.kafka_topic import TradeProducer, ensure_topic, tape_messages  # noqa: E402
from operators import synthetic as syn  # noqa: E402
from tests.broker import tansu  # noqa: E402

SYMBOLS = ["BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=240)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--processes", type=int, default=1, help="of the run (process 0 is sampled)")
    args = ap.parse_args()
    tape = syn.tape(SYMBOLS, 7, 1_704_067_200_000, int(args.hours * 60))
    print(f"{tape.height:,} trades over {args.hours:g} h, {args.partitions} partitions", flush=True)
    with tansu() as brokers:
        ensure_topic(brokers, "backlog", args.partitions)
        producer = TradeProducer(brokers, "backlog")
        for start in range(0, tape.height, 1_000_000):
            producer.send_many(tape_messages(tape.slice(start, 1_000_000)))
            producer.flush()
        del tape
        universe = "synthetic:" + ",".join(SYMBOLS)
        return subprocess.run([sys.executable, str(ROOT / "bench" / "rss_timeline.py"), "--print-every", "20", "--",
                               "--source", "kafka", "--brokers", brokers, "--topic", "backlog", "--eof",
                               "--instruments", universe, "--from", "earliest", "--processes",
                               str(args.processes)]).returncode


if __name__ == "__main__":
    sys.exit(main())
