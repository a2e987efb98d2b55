"""The cluster of ``tapeflow run``: the processes' addresses, the local peers process 0 starts for
each phase, and the options that join a multi-machine cluster.

Process 0 starts a phase's peers early, so that their start-up (imports, a second or so) overlaps
its own (claiming the store, building its flow) instead of process 0 waiting for them inside the
dataflow. A peer then waits, before anything process 0 has not checked already (the store, the
source, the flow), until process 0 releases the phase (``dataflows.runner.release_peers``), which
it does only once it is about to run the dataflow itself: a user mistake that stops process 0 is
reported once, by process 0, and the peers go with it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from dataflows import runner


def addresses(text: Optional[str]) -> Optional[list[str]]:
    """The processes of a multi-machine cluster, from ``--addresses`` ('host:port;host:port', blanks
    ignored: a trailing ';' is not a process to wait for); None without it."""
    return [a.strip() for a in text.split(";") if a.strip()] if text else None


def balance_workers(addresses_text: Optional[str], processes: int, workers: int) -> int:
    """Over how many workers the pipeline spreads its instruments evenly (``operators.routing``): the
    cluster's, the same in every process. A run that resumes a recovery directory keeps the keys its
    first run chose instead (``dataflows.routes``)."""
    addr = addresses(addresses_text)
    return (len(addr) if addr else processes) * workers


def phase_dir(run_dir: Path, k: int, proc_id: Optional[int]) -> Path:
    """Where phase ``k`` keeps its peers' counts and release: a directory per phase on process 0; a
    local peer is given its phase's directory as its ``--run-dir``."""
    path = run_dir / f"phase-{k}" if proc_id is None else run_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_peers(*, processes: int, proc_id: Optional[int], addresses_text: Optional[str], source: str,
                phase_end: int, start_from: str, phase_path: Path,
                recovery_dir: Optional[Path]) -> tuple[Optional[list[str]], list]:
    """The cluster's addresses (None: one process) and the local peers started for a phase
    (``--processes`` > 1 on process 0; they run this command line with their ``--proc-id`` and wait
    for the phase's release). Every process of a cluster snapshots into process 0's recovery
    directory, named on the peers' command line: one the run chose itself (the main job's, under
    its run directory) would be another directory in each peer, whose ``--run-dir`` differs."""
    if processes > 1 and proc_id is None:
        argv = [a for a in sys.argv[1:]] + (["--phase-end-ms", str(phase_end)] if source == "synthetic" else [])
        argv += ["--from", start_from] if source == "kafka" else []  # decided by process 0, before the claim
        argv += ["--recovery-dir", str(recovery_dir)] if recovery_dir is not None else []
        return runner.spawn_peers(argv, processes, phase_path)
    return addresses(addresses_text), []


def check_cluster_options(proc_id: Optional[int], addresses_text: Optional[str]) -> None:
    """--proc-id and --addresses join a multi-machine cluster: both or neither (--processes starts a
    local cluster whose peers get both)."""
    if proc_id is None and addresses_text:
        raise click.UsageError("--addresses needs --proc-id (this process's index in the list)")
    if proc_id is not None:
        if not addresses_text:
            raise click.UsageError("--proc-id needs --addresses 'host:port;host:port;...' (every process, same order)")
        n = len(addresses(addresses_text) or [])
        if proc_id >= n:
            raise click.BadParameter(f"{proc_id} is not an index into the {n} --addresses", param_hint="--proc-id")
