"""ccxt -> ingest dataflow -> Kafka -> pipeline, with scripted venues (no network) and a real broker."""

import json
import uuid
from collections import Counter

from confluent_kafka import Consumer, TopicPartition

from tests.integration.fake_venues import BTC_TAPE, ETH_TAPE
from tests.integration.test_kafka_pipeline import cli, sql


def read_topic(brokers, topic):
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=brokers)
    parts = len(admin.describe_topics([topic])[0]["partitions"])
    admin.close()
    c = Consumer({"bootstrap.servers": brokers, "group.id": "t", "enable.partition.eof": True})
    c.assign([TopicPartition(topic, p, 0) for p in range(parts)])
    out, done = [], set()
    while len(done) < parts:
        m = c.poll(5)
        assert m is not None
        if m.error():
            done.add(m.partition())
        else:
            out.append((m.key().decode(), json.loads(m.value())))
    c.close()
    return out


def test_ingest_backfills_a_dropped_stretch_and_reports_an_unfillable_gap(kafka_broker, tmp_path):
    topic = f"trades-{uuid.uuid4().hex[:8]}"
    record = tmp_path / "tape"
    cli("ingest", "--feeds", "binanceusdm:BTC/USDT:USDT;bybit:ETH/USDT:USDT", "--brokers", kafka_broker,
        "--topic", topic, "--partitions", "3", "--duration", "4", "--record", str(record),
        "--exchange-factory", "tests.integration.fake_venues:make")
    msgs = read_topic(kafka_broker, topic)
    trades = [m for _, m in msgs if "event" not in m]
    btc = [m["id"] for m in trades if m["symbol"] == "BTC/USDT:USDT"]
    assert Counter(btc) == Counter(str(r["id"]) for r in BTC_TAPE)  # the full tape, each trade once
    assert all(k == f"{m['exchange']}:{m['symbol']}" for k, m in msgs if "event" not in m)
    events = [m for _, m in msgs if "event" in m]
    kinds = Counter(m["event"] for m in events)
    # one outage per venue: announced once, and once more when it is over
    assert kinds["id_gap"] == 1 and kinds["data_gap"] == 1 and kinds["feed_down"] == 2 and kinds["reconnect"] == 2
    gap = next(m for m in events if m["event"] == "data_gap")
    assert gap["symbol"] == "ETH/USDT:USDT" and gap["exchange"] == "bybit"
    assert gap["from_ts"] == ETH_TAPE[49]["timestamp"] and gap["to_ts"] <= ETH_TAPE[200]["timestamp"]
    eth = [m for m in trades if m["symbol"] == "ETH/USDT:USDT"]
    assert len(eth) == len({m["id"] for m in eth})  # no duplicates even where it could not fill

    # the pipeline stores the gap as an event and counts every trade that reached Kafka into bars
    cli("run", "--source", "kafka", "--brokers", kafka_broker, "--topic", topic, "--eof",
        "--data-dir", str(tmp_path / "store"), "--quiet")
    ev = sql(tmp_path / "store", "SELECT kind, exchange, symbol, toUnixTimestamp64Milli(from_ts) AS f "
                                 "FROM events FINAL ORDER BY kind, symbol")
    assert {(e["kind"], e["symbol"]) for e in ev} >= {("data_gap", "ETH/USDT:USDT"), ("id_gap", "BTC/USDT:USDT")}
    n = sql(tmp_path / "store", "SELECT symbol, sum(trades) AS n FROM bars FINAL WHERE tf = '1m' GROUP BY symbol "
                                "ORDER BY symbol")
    assert n == [{"symbol": "BTC/USDT:USDT", "n": 300}, {"symbol": "ETH/USDT:USDT", "n": len(eth)}]

    # and the recorded Parquet tape replays to the same bars
    files = list(record.glob("*.parquet"))
    assert files
    args = ["run", "--source", "replay", "--data-dir", str(tmp_path / "replayed"), "--quiet"]
    for f in sorted(files):
        args += ["--file", str(f)]
    cli(*args)
    q = "SELECT symbol, tf, start, trades, volume, close FROM bars FINAL ORDER BY symbol, tf, start"
    assert sql(tmp_path / "replayed", q) == sql(tmp_path / "store", q)


# -- live feeds tell the truth: outages, silent runs, unknown venues and symbols -------------------

CCXT_RUN = ("run", "--source", "ccxt", "--quiet")


def test_run_against_an_unreachable_venue_stores_feed_down_and_fails_with_the_reason(tmp_path):
    res = cli(*CCXT_RUN, "--feeds", "binanceusdm:BTC/USDT:USDT", "--duration", "1.5",
              "--exchange-factory", "tests.integration.fake_venues:unreachable", "--data-dir", str(tmp_path),
              check=False)
    assert res.returncode != 0
    assert ("no trades received from binanceusdm in 1.5 s: last error: ExchangeNotAvailable: binanceusdm GET "
            "https://example.invalid/exchangeInfo (load_markets, attempt ") in res.stderr
    status = [ln for ln in res.stderr.splitlines() if "unreachable (ExchangeNotAvailable" in ln]
    # dozens of retries in 1.5 s at a 0.1 s cap, but a status line only while the backoff grows
    assert 1 <= len(status) <= 4, res.stderr
    ev = sql(tmp_path, "SELECT kind, exchange, symbol, reason, detail FROM events FINAL ORDER BY ts")
    assert [(e["kind"], e["exchange"], e["symbol"]) for e in ev] == [("feed_down", "binanceusdm", "BTC/USDT:USDT")]
    assert ev[0]["reason"] == "ExchangeNotAvailable: binanceusdm GET https://example.invalid/exchangeInfo"
    assert json.loads(ev[0]["detail"]) == {"stage": "load_markets", "attempt": 1}


def test_run_against_a_venue_that_fails_twice_then_recovers(tmp_path):
    cli(*CCXT_RUN, "--feeds", "binanceusdm:BTC/USDT:USDT", "--duration", "2",
        "--exchange-factory", "tests.integration.fake_venues:flaky", "--data-dir", str(tmp_path))
    ev = sql(tmp_path, "SELECT kind, reason, (SELECT sum(trades) FROM bars FINAL WHERE tf = '1m') AS bar_trades "
                       "FROM events FINAL ORDER BY ts, kind")
    assert [e["kind"] for e in ev] == ["feed_down", "reconnect"]  # one outage, and its end
    assert ev[1]["reason"] == "back after 2 failed attempt(s)"
    assert ev[0]["bar_trades"] == len(BTC_TAPE)  # and then every trade flowed


def test_unknown_symbol_ends_an_endless_run_with_one_line(tmp_path):
    # no --duration: only the error can end this run (a retry loop would run into cli()'s timeout)
    res = cli(*CCXT_RUN, "--feeds", "binanceusdm:BTC/USDT;bybit:ETH/USDT:USDT", "--data-dir", str(tmp_path),
              "--exchange-factory", "tests.integration.fake_venues:make", check=False)
    assert res.returncode != 0
    assert "binanceusdm does not list 'BTC/USDT'; close matches: BTC/USDT:USDT" in res.stderr


def test_unknown_exchange_id_is_an_error_before_the_dataflow_starts(tmp_path):
    res = cli(*CCXT_RUN, "--feeds", "binanceusdn:BTC/USDT:USDT", "--duration", "30", "--data-dir", str(tmp_path),
              "--exchange-factory", "tests.integration.fake_venues:make", check=False)
    assert res.returncode == 2
    assert "unknown exchange 'binanceusdn'" in res.stderr and "closest: binanceusdm" in res.stderr
    assert "Traceback" not in res.stderr


def test_ingest_from_an_unreachable_venue_sends_feed_down_and_fails(kafka_broker):
    topic = f"trades-{uuid.uuid4().hex[:8]}"
    res = cli("ingest", "--feeds", "bybit:BTC/USDT:USDT", "--brokers", kafka_broker, "--topic", topic,
              "--partitions", "1", "--duration", "1", "--exchange-factory", "tests.integration.fake_venues:unreachable",
              check=False)
    assert res.returncode != 0
    assert "no trades received from bybit in 1 s: last error: ExchangeNotAvailable: bybit GET" in res.stderr
    msgs = read_topic(kafka_broker, topic)
    assert [(k, m["event"], m["reason"]) for k, m in msgs] == [
        ("bybit:BTC/USDT:USDT", "feed_down", "ExchangeNotAvailable: bybit GET https://example.invalid/exchangeInfo")]
