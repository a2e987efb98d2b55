"""The replay source: recorded tape files as a bytewax source, in the order of ``load_tape``.

A replay is not a live stream: a file can be read in any order, so the replay reads every file
whole (Polars, in memory), normalises it (column mapping, time unit, identity), and releases the
trades of all files in ONE partition sorted by a total order that does not depend on the file
order. Memory limit: the whole tape is held as one Polars frame. Measured on a shuffled 2M-trade
ccxt CSV (78 MB): 2.8 s to load and sort, ~650 MB peak while sorting (~330 bytes a trade), 74 MB
held during the replay. So ~10M trades need a few GB at load; for bigger tapes, split them by
time and publish the parts in order with `tapeflow replay PART --to kafka`, then run --source kafka.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import polars as pl
from bytewax.inputs import FixedPartitionedSource

from dataflows.frame_partition import FramePartition, Progress
from operators.tape_order import Tape, load_tape
from operators.records import FrameBatch


class _ReplayPartition(FramePartition):
    """Every replay file, sorted, in one partition (so the arrival order of an instrument never
    depends on worker scheduling). Snapshot: the offset of the next row to emit."""

    def __init__(self, src: "ReplaySource", tape: Tape, part: str, resume: int):
        super().__init__(src.source_name, part, src.speed)
        self.src, self.tape, self.pos, self.loaded = src, tape, resume, resume
        self.events = list(tape.events) if resume == 0 else []  # with the first batch, once
        # perp updates go out after the trades before them (resumed: from the resume point again; deduplicated)
        self.perp = [u for u in tape.perp if u.seq >= resume]

    def _load(self) -> Optional[pl.DataFrame]:
        if self.loaded >= self.tape.frame.height:
            return None
        frame = self.tape.frame.slice(self.loaded, self.src.batch_size)
        self.loaded += frame.height
        return frame

    def _take_events(self, final: bool = False) -> list:
        events, self.events = self.events, []
        k = len(self.perp) if final else next((i for i, u in enumerate(self.perp) if u.seq > self.pos), len(self.perp))
        if k:
            events += self.perp[:k]
            self.perp = self.perp[k:]
        return events

    def _released(self, frame: pl.DataFrame) -> None:
        self.pos = int(frame["offset"][-1]) + 1
        if self.src.progress:
            self.src.progress(self.part, self.pos, self.tape.frame.height, frame.height)

    def snapshot(self) -> int:
        return self.pos


@dataclass
class ReplaySource(FixedPartitionedSource[FrameBatch, int]):
    """Recorded tapes (ccxt CSV/Parquet, Binance public-data CSV, Kraken trade history), all
    files in ONE partition, released in the order of ``load_tape``: sorted by (ts, id), whatever
    the order of the rows in the files or of the files. The tape is loaded whole into memory.

    Call ``check()`` before building the dataflow: it reads and validates every file (format,
    columns, time unit, --exchange/--symbol) and raises ``ReplayFormatError`` with a one-line
    message, so the CLI can report it without a bytewax panic; the loaded tape is then handed to
    the partition (not read twice; see ``keep``). ``describe()`` gives plain numbers (rows, files,
    out_of_order) and a one-line ``summary``.
    """

    paths: list[Path]
    exchange: Optional[str] = None
    symbol: Optional[str] = None
    batch_size: int = 20_000
    speed: Optional[float] = None
    progress: Optional[Progress] = None
    source_name: str = "replay"
    _tape: Optional[Tape] = field(default=None, init=False, repr=False)
    _info: Optional[dict] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for p in self.paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"replay file not found: {p}")

    def _load(self) -> Tape:
        tape = load_tape(self.paths, self.exchange, self.symbol)
        self._info = {**tape.describe(), "summary": tape.summary(),
                      "instruments": sorted(f"{e}:{s}" for e, s in tape.frame.select("exchange", "symbol").unique()
                                            .iter_rows())}
        return tape

    def check(self, keep: bool = True) -> dict:
        """Read and validate every file now (``ReplayFormatError`` on a problem); returns
        ``describe()``. ``keep``: hold the loaded tape for ``build_part`` (no second read). Pass
        False in a process that may not own the partition (``--processes N``: only one worker of
        one process builds it; the others would hold a copy of the tape for nothing)."""
        if self._tape is None:
            tape = self._load()
            self._tape = tape if keep else None
        return self.describe()

    def describe(self) -> dict:
        """``{"rows", "files": [per-file dicts], "out_of_order", "unreadable_ts", "summary"}``
        (reads the files if nothing has yet, without keeping the tape)."""
        if self._info is None:
            self.check(keep=False)
        assert self._info is not None
        return self._info

    def instruments(self) -> list[str]:
        """Every instrument of the tape (reads the files if nothing has yet)."""
        return self.describe()["instruments"]

    def list_parts(self) -> list[str]:
        names = "+".join(Path(p).name for p in self.paths)
        if len(names) > 200:
            digest = hashlib.blake2b("\n".join(str(p) for p in self.paths).encode(), digest_size=4).hexdigest()
            names = f"{Path(self.paths[0]).name}+{len(self.paths) - 1}-more-{digest}"
        return [f"0:{names}"]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]):
        tape, self._tape = self._tape or self._load(), None  # the partition owns the frame now
        return _ReplayPartition(self, tape, for_part, resume_state or 0)
