"""A real Kafka-protocol broker on loopback (tansu, in-memory), one per test module."""

import pytest

from tests.broker import tansu


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory):
    with tansu(tmp_path_factory.mktemp("tansu") / "broker.log") as brokers:
        yield brokers
