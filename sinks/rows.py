"""Records -> table rows: the one place where a record type meets its table's columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

import json

from operators.bars import Bar
from operators.decision import Decision
from operators.paper import EquityPoint, Fill, FundingPayment
from operators.perp import FUNDING_TABLE, LIQ_TABLE, OI_TABLE, PerpUpdate
from operators.risk import RiskEvent
from operators.records import Event
from operators.features import AlignedRow
from operators.optimizer import VARIANT_METRICS_COLUMNS, VariantMetrics
from operators.labels import Label
from operators.signals import ModelMetrics, ScoredRow
from operators.records import NamedCount, DeadLetter, LateTrades

BAR_COLUMNS = [
    "exchange", "symbol", "tf", "start", "end", "open", "high", "low", "close", "volume", "notional",
    "vwap", "trades", "buy_volume", "sell_volume", "delta", "min_delta", "max_delta", "largest_trade",
    "largest_notional", "parent_orders", "pro_orders", "amateur_orders", "pros_gross", "pros_net",
    "amateurs_gross", "amateurs_net", "s_top", "s_bot", "s_mood", "pro_threshold", "amateur_threshold",
    "poc", "vah", "val", "profile_bin", "profile_coarse", "partial",
]
LATE_COLUMNS = ["exchange", "symbol", "id", "ts", "price", "amount", "side", "trader", "recv_ts", "seq",
                "watermark", "reason"]
DEAD_COLUMNS = ["source", "partition", "offset", "payload", "reason", "detail", "recv_ts"]
EVENT_COLUMNS = ["kind", "ts", "exchange", "symbol", "from_ts", "to_ts", "reason", "detail", "source"]
FEATURE_COLUMNS = ["exchange", "symbol", "tf", "start", "end", "close", "warm", "regime", "values", "overlay_ok"]
LABEL_COLUMNS = ["exchange", "symbol", "tf", "start", "end", "horizon", "fwd_ret", "band", "label", "matured_at"]
PREDICTION_COLUMNS = ["exchange", "symbol", "tf", "start", "end", "model", "version", "p_down", "p_flat", "p_up",
                      "confidence", "alpha", "votes", "raw_down", "raw_flat", "raw_up"]
METRIC_COLUMNS = ["exchange", "symbol", "model", "ts", "accuracy", "log_loss", "brier", "n"]
TAG_COLUMNS = ["origin", "strategy_id", "variant_id", "config_hash"]
DECISION_COLUMNS = TAG_COLUMNS + [
    "ts", "decided_at", "exchange", "symbol", "tf", "bar_start", "close", "action", "side", "arm", "reason", "arms",
    "gates_passed", "gates_failed", "vetoes", "shadow_vetoes", "quality", "best_conf", "conf_min", "rv", "trend",
    "size_frac", "vol_scale", "kelly", "notional", "position_id", "bandit_draws", "latency_ms"]
FILL_COLUMNS = TAG_COLUMNS + [
    "ts", "exchange", "symbol", "side", "qty", "price", "ref_price", "notional", "fee", "slippage_bps", "reason",
    "position_id", "position_side", "realised_pnl", "pnl_bps", "decision_ts", "arm"]
EQUITY_COLUMNS = TAG_COLUMNS + [
    "ts", "seq", "equity", "cash", "realised_pnl", "unrealised_pnl", "fees", "funding", "exposure", "open_positions",
    "peak", "drawdown", "halted"]
FUNDING_PAYMENT_COLUMNS = TAG_COLUMNS + [
    "ts", "exchange", "symbol", "position_id", "position_side", "qty", "mark_price", "rate", "amount"]
#: perp update kind -> (table, columns; ``notional`` is derived)
PERP_TABLES = {
    "funding": (FUNDING_TABLE, ["exchange", "symbol", "ts", "rate", "funding_time", "mark_price", "index_price",
                                "source"]),
    "open_interest": (OI_TABLE, ["exchange", "symbol", "ts", "open_interest", "oi_value", "source"]),
    "liquidation": (LIQ_TABLE, ["exchange", "symbol", "ts", "side", "price", "amount", "notional", "source"]),
}


@dataclass
class Rows:
    columns: list[str]
    data: list[list]


@dataclass(frozen=True)
class SourcePosition:
    """How far a source partition's batch goes (Kafka: topic, partition, next offset to read). Not
    stored: the sink commits it to the consumer group once the epoch's rows are (dataflows/kafka_source.py,
    ``OffsetCommitter``)."""

    source: str
    partition: str
    next_offset: int


def bar_row(b: Bar) -> list:
    return [getattr(b, c) for c in BAR_COLUMNS]


def dead_row(d: DeadLetter) -> list:
    return [d.source, d.partition, d.offset, d.payload, d.reason, d.detail, d.recv_ts]


def late_rows(lt: LateTrades) -> list[list]:
    df = lt.trades.select(
        "exchange", "symbol", "id", "ts", "price", "amount",
        pl.when(pl.col("is_buy")).then(pl.lit("buy")).otherwise(pl.lit("sell")).alias("side"),
        "trader", "recv_ts", "seq", "watermark", pl.lit(lt.reason).alias("reason"),
    )
    return [list(r) for r in df.iter_rows()]


def feature_row(r: AlignedRow) -> list:
    values = {k: v for k, v in r.features.items() if v is not None}
    return [r.exchange, r.symbol, r.tf, r.start, r.end, r.close, int(r.warm), r.regime, values,
            {k: int(v) for k, v in r.overlay_ok.items()}]


def prediction_rows(s: ScoredRow) -> list[list]:
    return [[s.exchange, s.symbol, s.tf, s.start, s.end, p.model, p.version, p.p_down, p.p_flat, p.p_up,
             p.confidence, p.alpha, json.dumps([list(v) for v in p.votes]) if p.votes else "", *p.raw_probs]
            for p in s.predictions.values()]


def decision_row(d: Decision) -> list:
    row = []
    for c in DECISION_COLUMNS:
        v = getattr(d, c)
        if c == "arms":
            v = json.dumps([{"arm": a.arm, "side": a.side, "strength": a.strength, "eligible": a.eligible,
                             "reasons": list(a.reasons), "value": a.value, "model": a.model, "p_win": a.p_win}
                            for a in v])
        elif c == "bandit_draws":
            v = json.dumps(v, sort_keys=True)
        elif c in ("gates_passed", "gates_failed", "vetoes", "shadow_vetoes"):
            v = list(v)
        row.append(v)
    return row


def count(stats: Any, rec: Any) -> None:
    """Count a record into ``stats`` (a ``SinkStats``): bars per timeframe, trades in 1m bars,
    late trades, dead letters, events by kind and named counters."""
    if isinstance(rec, Bar):
        stats.bars[rec.tf] = stats.bars.get(rec.tf, 0) + 1
        if rec.tf == "1m":
            stats.trades_in_bars += rec.trades
    elif isinstance(rec, LateTrades):
        stats.late_trades += rec.trades.height
        key = f"late.{rec.reason}"
        stats.counters[key] = stats.counters.get(key, 0) + rec.trades.height
    elif isinstance(rec, DeadLetter):
        stats.dead_letters += 1
        key = f"dead.{rec.reason}"
        stats.counters[key] = stats.counters.get(key, 0) + 1
    elif isinstance(rec, PerpUpdate):
        stats.counters[f"perp.{rec.kind}"] = stats.counters.get(f"perp.{rec.kind}", 0) + 1
    elif isinstance(rec, Event):
        stats.counters[f"events.{rec.kind}"] = stats.counters.get(f"events.{rec.kind}", 0) + 1
    elif isinstance(rec, NamedCount):
        stats.counters[rec.name] = stats.counters.get(rec.name, 0) + rec.value


def to_rows(records: list[Any], stats: Any) -> dict[str, Rows]:
    """Group records by table; count what passes in ``stats`` (a ``SinkStats``)."""
    out: dict[str, Rows] = {}

    def add(table: str, columns: list[str], rows: list[list]) -> None:
        if table not in out:
            out[table] = Rows(columns, [])
        out[table].data.extend(rows)

    for rec in records:
        if isinstance(rec, tuple) and len(rec) == 2 and isinstance(rec[0], str):
            rec = rec[1]  # (key, record)
        count(stats, rec)
        if isinstance(rec, Bar):
            add("bars", BAR_COLUMNS, [bar_row(rec)])
        elif isinstance(rec, LateTrades):
            add("late_trades", LATE_COLUMNS, late_rows(rec))
        elif isinstance(rec, DeadLetter):
            add("dead_letters", DEAD_COLUMNS, [dead_row(rec)])
        elif isinstance(rec, Event):
            add("events", EVENT_COLUMNS, [[getattr(rec, c) for c in EVENT_COLUMNS]])
        elif isinstance(rec, AlignedRow):
            add("features", FEATURE_COLUMNS, [feature_row(rec)])
        elif isinstance(rec, Label):
            add("labels", LABEL_COLUMNS, [[getattr(rec, c) for c in LABEL_COLUMNS]])
        elif isinstance(rec, ScoredRow):
            add("predictions", PREDICTION_COLUMNS, prediction_rows(rec))
        elif isinstance(rec, ModelMetrics):
            add("model_metrics", METRIC_COLUMNS, [[getattr(rec, c) for c in METRIC_COLUMNS]])
        elif isinstance(rec, Decision):
            add("decisions", DECISION_COLUMNS, [decision_row(rec)])
        elif isinstance(rec, Fill):
            add("fills", FILL_COLUMNS, [[getattr(rec, c) for c in FILL_COLUMNS]])
        elif isinstance(rec, EquityPoint):
            add("equity", EQUITY_COLUMNS, [[getattr(rec, c) for c in EQUITY_COLUMNS]])
        elif isinstance(rec, RiskEvent):
            ev = rec.as_event()
            add("events", EVENT_COLUMNS, [[getattr(ev, c) for c in EVENT_COLUMNS]])
        elif isinstance(rec, PerpUpdate):
            table, cols = PERP_TABLES[rec.kind]
            add(table, cols, [[getattr(rec, c) for c in cols]])
        elif isinstance(rec, FundingPayment):
            add("funding_payments", FUNDING_PAYMENT_COLUMNS, [[getattr(rec, c) for c in FUNDING_PAYMENT_COLUMNS]])
        elif isinstance(rec, VariantMetrics):
            add("variant_metrics", VARIANT_METRICS_COLUMNS, [rec.row()])
        elif isinstance(rec, (NamedCount, SourcePosition)):
            pass  # counted above / committed by the sink: stored nowhere
        else:
            raise TypeError(f"no table for record type {type(rec).__name__}")
    return out
