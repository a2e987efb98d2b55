-- Optimizer variant metrics and pipeline health (written on a schedule).

CREATE TABLE IF NOT EXISTS variant_metrics
(
    ts              DateTime64(3, 'UTC'),   -- event time of the evaluation (bar close)
    origin          LowCardinality(String), -- production | experimental
    strategy_id     LowCardinality(String),
    variant_id      LowCardinality(String),
    config_hash     LowCardinality(String),
    config          String,                 -- JSON of the variant's settings that differ from production
    status          LowCardinality(String), -- active | promoted | retired
    runtime_ms      Int64,                  -- event time since the variant started
    roi             Float64,
    trades          UInt32,
    win_rate        Nullable(Float64),
    avg_pnl         Nullable(Float64),
    sharpe          Nullable(Float64),      -- annualised, per-bar equity returns
    sortino         Nullable(Float64),
    profit_factor   Nullable(Float64),
    max_drawdown    Float64,
    flip_rate       Nullable(Float64),      -- share of decisions whose signal side flipped from the previous one
    latency_p50_ms  Nullable(Float64),
    latency_p99_ms  Nullable(Float64),
    psr             Nullable(Float64),      -- probabilistic Sharpe ratio vs production
    dsr             Nullable(Float64)       -- deflated for the number of variants tried
)
ENGINE = ReplacingMergeTree
ORDER BY (strategy_id, variant_id, ts);

CREATE TABLE IF NOT EXISTS pipeline_health
(
    ts                  DateTime64(3, 'UTC'),  -- wall clock of the sample
    process             UInt16,
    worker              UInt16,
    trades_in           UInt64,                -- since the previous sample
    trades_per_s        Float64,
    bars                UInt64,
    late_trades         UInt64,
    dead_letters        UInt64,
    duplicates          UInt64,
    watermark_lag_ms    Nullable(Float64),     -- wall clock - newest trade time seen
    decision_p50_ms     Nullable(Float64),
    decision_p95_ms     Nullable(Float64),
    decision_p99_ms     Nullable(Float64),
    decisions           UInt64,
    rss_mb              Float64
)
ENGINE = ReplacingMergeTree
ORDER BY (process, worker, ts);
