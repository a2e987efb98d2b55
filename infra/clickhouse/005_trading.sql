-- Decisions, paper fills and equity of every strategy (production and optimizer variants).
-- Every row says whose it is: origin (production | experimental), strategy_id, variant_id, config_hash.

CREATE TABLE IF NOT EXISTS decisions
(
    origin         LowCardinality(String),
    strategy_id    LowCardinality(String),
    variant_id     LowCardinality(String),
    config_hash    LowCardinality(String),
    ts             DateTime64(3, 'UTC'),   -- the scored bar's end: when the decision is made
    decided_at     DateTime64(3, 'UTC'),   -- wall clock
    exchange       LowCardinality(String),
    symbol         LowCardinality(String),
    tf             LowCardinality(String),
    bar_start      DateTime64(3, 'UTC'),
    close          Float64,
    action         LowCardinality(String), -- open_long | open_short | close | hold | none
    side           Int8,
    arm            LowCardinality(String),
    reason         LowCardinality(String),
    arms           String,                 -- JSON: per arm side, strength, eligible, reasons
    gates_passed   Array(LowCardinality(String)),
    gates_failed   Array(LowCardinality(String)),
    vetoes         Array(LowCardinality(String)),
    shadow_vetoes  Array(LowCardinality(String)),
    quality        LowCardinality(String),
    best_conf      Nullable(Float64),
    conf_min       Float64,
    rv             Nullable(Float64),
    trend          Nullable(Float64),
    size_frac      Float64,
    vol_scale      Float64,
    kelly          Nullable(Float64),
    notional       Float64,
    position_id    UInt64,
    bandit_draws   String,                 -- JSON
    latency_ms     Float64                 -- wall ms from the 1m window close to the decision
)
ENGINE = ReplacingMergeTree
ORDER BY (origin, strategy_id, variant_id, exchange, symbol, ts);

CREATE TABLE IF NOT EXISTS fills
(
    origin         LowCardinality(String),
    strategy_id    LowCardinality(String),
    variant_id     LowCardinality(String),
    config_hash    LowCardinality(String),
    ts             DateTime64(3, 'UTC'),   -- open time of the 1m bar the fill used
    exchange       LowCardinality(String),
    symbol         LowCardinality(String),
    side           LowCardinality(String), -- buy | sell
    qty            Float64,
    price          Float64,                -- after slippage
    ref_price      Float64,                -- before slippage
    notional       Float64,
    fee            Float64,
    slippage_bps   Float64,
    reason         LowCardinality(String), -- entry | stop_loss | trailing_stop | take_profit | ...
    position_id    UInt64,
    position_side  Int8,
    realised_pnl   Nullable(Float64),      -- exits: net PnL of the trade (both fees)
    pnl_bps        Nullable(Float64),
    decision_ts    DateTime64(3, 'UTC'),
    arm            LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (origin, strategy_id, variant_id, position_id, ts, reason);

CREATE TABLE IF NOT EXISTS equity
(
    origin         LowCardinality(String),
    strategy_id    LowCardinality(String),
    variant_id     LowCardinality(String),
    config_hash    LowCardinality(String),
    ts             DateTime64(3, 'UTC'),   -- the 1m bar close at which equity was marked
    seq            UInt64,                 -- the latest mark of a ts wins
    equity         Float64,
    cash           Float64,
    realised_pnl   Float64,
    unrealised_pnl Float64,
    fees           Float64,
    exposure       Float64,
    open_positions UInt16,
    peak           Float64,
    drawdown       Float64,
    halted         UInt8
)
ENGINE = ReplacingMergeTree(seq)
ORDER BY (origin, strategy_id, variant_id, ts);
