"""The data-quality gate is a function of the input alone (issue 11): late trades and in-band
data-gap events reach the portfolio inside their instrument's bars (operators.chunk_news.carry_news),
so which decisions a gate stops does not depend on how the instruments' streams interleave (what
several partitions or processes change) or where the batches are cut."""

import polars as pl

from tests.conftest import scratch_store

from tests.helpers import T0, WALL, raw_batches, run_pipeline, settings, stored, synthetic_tape

SYMS = ["BTC/USDT:USDT", "ETH/USDT:USDT"]


def _messages(tape: pl.DataFrame) -> dict[str, list]:
    """Per instrument, its messages in arrival order: ETH's trades of every 7th minute arrive three
    minutes late (after its later trades: behind the watermark), and BTC has an in-band data gap."""
    out = {}
    for sym in SYMS:
        rows = tape.filter(pl.col("symbol") == sym).drop("offset").to_dicts()
        if sym == "ETH/USDT:USDT":
            minute = lambda r: (r["ts"] - T0) // 60_000  # noqa: E731
            held = [r for r in rows if minute(r) % 7 == 3]
            rows = [r for r in rows if minute(r) % 7 != 3]
            for r in held:  # each held trade goes in right after the first trade three minutes on
                at = next((i for i, x in enumerate(rows) if x["ts"] >= r["ts"] + 180_000), len(rows))
                rows.insert(at + 1, r)
        else:
            gap_at = next(i for i, r in enumerate(rows) if r["ts"] >= T0 + 95 * 60_000)
            rows.insert(gap_at, {"event": "data_gap", "ts": rows[gap_at]["ts"], "exchange": "x", "symbol": sym,
                                 "from_ts": T0 + 93 * 60_000, "to_ts": T0 + 95 * 60_000, "reason": "test",
                                 "source": "ingest:x"})
        out[sym] = rows
    return out


def _interleave(per_sym: dict[str, list], block: int) -> list:
    """The instruments' streams merged in blocks of ``block`` messages (each keeps its own order)."""
    a, b = per_sym[SYMS[0]], per_sym[SYMS[1]]
    out = []
    for i in range(0, max(len(a), len(b)), block):
        out += a[i:i + block] + b[i:i + block]
    return out


def test_gates_stop_the_same_decisions_whatever_the_interleaving_and_batch_cut(chdb_dsn, tmp_path):
    tape = synthetic_tape(SYMS, minutes=180, rate=0.5)
    per_sym = _messages(tape)
    cfg = settings(tmp_path / "data", online_models=False,  # trades on the cohort arms alone, every bar
                   strategy={"no_model_vetoes_cohort": False, "require_warm": False, "s_min": 0.05,
                             "cooldown_bars": 0})
    universe = [f"x:{s}" for s in SYMS]
    runs = []
    for block, size in [(1, 1000), (400, 97), (3000, 5000)]:
        with scratch_store(chdb_dsn) as st:
            run_pipeline(raw_batches(_interleave(per_sym, block), size=size), st, cfg, instruments=universe)
            runs.append(stored(st, "decisions", "origin, variant_id, exchange, symbol, ts", WALL["decisions"]))
    first = runs[0]
    gated = first.filter(pl.col("quality") != "")
    assert set(gated["quality"]) >= {"late_rate", "data_gap"}, "both gates should fire on this tape"
    assert first.filter(pl.col("action") != "hold").height > 0
    for r in runs[1:]:
        assert r.equals(first)
