#!/usr/bin/env python
"""Peer for bench/kafka_throughput.py: Quix Streams (3.x) computing per-instrument 1m OHLCV over
the bench topic. Runs in its own venv (bench/.peers-venv, made by the bench), never the project's.

    python bench/peers/quix_ohlcv.py --brokers 127.0.0.1:9092 --topic trades-bench --partitions 4 --expect 1000000

Prints ONE JSON line on stdout: {"trades", "bars", "bars_closed", "late", "seconds", "first_message_s",
"trades_per_s"} (``first_message_s``: start-up, from the script's start to the first trade processed).

What it does, in Quix Streams' own terms:
  - ``Application(broker_address=..., consumer_group=<unique per run>, auto_offset_reset="earliest",
    state_dir=<temp dir>, use_changelog_topics=False, on_message_processed=<count>,
    consumer_extra_config={"fetch.queue.backoff.ms": 10, "session.timeout.ms": 6000})``
    (no changelog topics by default: ``tapeflow run`` is benched without a recovery dir, and the floor
    has no durable state either; ``--changelog`` turns Quix's default fault-tolerant state back on);
  - ``app.topic(T, value_deserializer="json", timestamp_extractor=<the trade's "ts">)``: event time;
  - ``app.dataframe(topic).tumbling_window(60_000, grace_ms=G, on_late=<count>)
    .reduce(reducer, initializer).final()``: windows are per message key, which is
    "exchange:symbol", so they already are per instrument (no group_by, no repartition topic);
  - stop: ``on_message_processed`` counts consumed messages and calls ``app.stop()`` at --expect.

Emission is ``.final()`` (closing strategy "key"): a bar is emitted when a later trade of the same
instrument passes its end + grace, which is what a bar consumer needs. ``.final()`` cannot close the
last minute of each instrument at end of input (Quix has no end-of-stream flush for a Kafka topic),
so those bars stay in state: ``bars_closed`` counts the emitted ones, and ``bars`` counts every
distinct (instrument, minute) window opened (the initializer runs once per window), i.e. what the
floor counts. ``.current()`` would emit one update downstream per trade, more work than the floor
or tapeflow do, so it is not used. Per instrument the tape is in ts order (it is sorted by ts and an
instrument stays on one partition), so grace 0 drops nothing; ``late`` counts dropped trades anyway.

``seconds`` is wall time from the start of this script (before importing quixstreams) to the end
of ``app.run()`` after the stop, so it includes imports, the consumer group join, the state store
set-up and the final commit and close, like the floor's time includes its consumer start and close.
It does not include starting the Python interpreter itself. The consumer group join is ~3 s of it
(see session.timeout.ms below); the floor and tapeflow assign partitions and join no group.
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402


def _broker_reports_defaults() -> None:
    """tansu's DescribeConfigs answers only the configs set when a topic was created (the bench's topic:
    none), where Apache Kafka also reports the defaults. Quix Streams 3.28.1 reads the input topic's
    "retention.ms" to derive its window store's changelog config, even with use_changelog_topics=False
    (``TopicManager.derive_topic_config``: ``extra_config["retention.ms"]``, a KeyError here), so
    fill in Kafka's defaults where the broker said nothing. Client side only; the topic is unchanged."""
    from quixstreams.models.topics import TopicAdmin

    inspect = TopicAdmin.inspect_topics
    kafka_defaults = {"retention.ms": "604800000", "retention.bytes": "-1", "cleanup.policy": "delete"}

    def inspect_topics(self, topic_names, timeout=30):
        out = inspect(self, topic_names, timeout=timeout)
        for cfg in out.values():
            if cfg is not None:
                for k, v in kafka_defaults.items():
                    cfg.extra_config.setdefault(k, v)
        return out

    TopicAdmin.inspect_topics = inspect_topics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, required=True, help="partitions of the topic (informational)")
    ap.add_argument("--expect", type=int, required=True, help="stop after consuming this many messages")
    ap.add_argument("--grace-ms", type=int, default=0)
    ap.add_argument("--session-timeout-ms", type=int, default=6000, help="consumer group session timeout")
    ap.add_argument("--changelog", action="store_true", help="use Quix's changelog topics (its default)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="give up (exit 1) after this long")
    args = ap.parse_args()

    from quixstreams import Application

    _broker_reports_defaults()

    state_dir = tempfile.mkdtemp(prefix="quix-peer-state-")
    counts = {"in": 0, "closed": 0, "late": 0}
    windows: set = set()
    stopped_at: list[float] = []
    first_at: list[float] = []

    def processed(_topic: str, _partition: int, _offset: int) -> None:
        counts["in"] += 1
        if counts["in"] == 1:
            first_at.append(time.time())
        if counts["in"] >= args.expect and not stopped_at:
            stopped_at.append(time.time())
            app.stop()  # leaves the poll loop; run() then commits and closes, which `seconds` includes

    try:
        app = Application(
            broker_address=args.brokers,
            consumer_group=f"quix-peer-{uuid.uuid4().hex[:12]}",
            auto_offset_reset="earliest",
            state_dir=state_dir,
            use_changelog_topics=args.changelog,
            consumer_extra_config={
                "fetch.queue.backoff.ms": 10,  # as the floor and tapeflow's Kafka source
                # tansu answers a new member's JoinGroup after half its session timeout: 23 s with
                # librdkafka's 45 s default; 6 s (the least a stock Kafka broker accepts) gives a 3 s
                # join, as Kafka's own group.initial.rebalance.delay.ms default would
                "session.timeout.ms": args.session_timeout_ms,
            },
            loglevel=os.environ.get("QUIX_PEER_LOGLEVEL", "WARNING"),
            on_message_processed=processed,
        )

        topic = app.topic(args.topic, value_deserializer="json", key_deserializer="bytes",
                          timestamp_extractor=lambda value, headers, timestamp, timestamp_type: value["ts"])

        def initializer(t: dict) -> list:
            windows.add((t["exchange"], t["symbol"], t["ts"] // 60_000))
            p, a = t["price"], t["amount"]
            # open, high, low, close, volume, buy volume
            return [p, p, p, p, a, a if t["side"] == "buy" else 0.0]

        def reducer(b: list, t: dict) -> list:
            p, a = t["price"], t["amount"]
            if p > b[1]:
                b[1] = p
            if p < b[2]:
                b[2] = p
            b[3] = p
            b[4] += a
            if t["side"] == "buy":
                b[5] += a
            return b

        def late(*_args) -> bool:
            counts["late"] += 1
            return False  # counted here; no warning line per trade

        def closed(_window: dict) -> None:
            counts["closed"] += 1

        sdf = app.dataframe(topic)
        sdf = (sdf.tumbling_window(duration_ms=60_000, grace_ms=args.grace_ms, on_late=late)
               .reduce(reducer=reducer, initializer=initializer)
               .final())
        sdf = sdf.update(closed)

        # safety net: a run that never reaches --expect (messages missing) must not hang the bench
        guard = threading.Timer(args.timeout_s, lambda: (stopped_at or app.stop()))
        guard.daemon = True
        guard.start()
        app.run()
        end = time.time()
        guard.cancel()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    seconds = end - T0
    out = {"trades": counts["in"], "bars": len(windows), "bars_closed": counts["closed"], "late": counts["late"],
           "seconds": round(seconds, 3), "first_message_s": round(first_at[0] - T0, 3) if first_at else None,
           "trades_per_s": round(counts["in"] / seconds, 1) if seconds > 0 else 0.0}
    print(json.dumps(out), flush=True)
    if counts["in"] < args.expect:
        print(f"quix peer: consumed {counts['in']} of {args.expect} messages before the {args.timeout_s:.0f} s "
              "time-out", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
