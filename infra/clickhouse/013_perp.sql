-- Perpetual-futures data (operators/perp.py) and the paper books' funding ledger.

CREATE TABLE IF NOT EXISTS funding_rates
(
    exchange      LowCardinality(String),
    symbol        LowCardinality(String),
    ts            DateTime64(3, 'UTC'),            -- when the venue showed it
    rate          Float64,                         -- paid at funding_time: longs pay shorts when > 0
    funding_time  Nullable(DateTime64(3, 'UTC')),
    mark_price    Nullable(Float64),
    index_price   Nullable(Float64),
    source        LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, ts);

CREATE TABLE IF NOT EXISTS open_interest
(
    exchange       LowCardinality(String),
    symbol         LowCardinality(String),
    ts             DateTime64(3, 'UTC'),
    open_interest  Nullable(Float64),              -- base units
    oi_value       Nullable(Float64),              -- quote value
    source         LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, ts);

CREATE TABLE IF NOT EXISTS liquidations
(
    exchange  LowCardinality(String),
    symbol    LowCardinality(String),
    ts        DateTime64(3, 'UTC'),
    side      LowCardinality(String),              -- the forced order's side: sell = a long liquidated
    price     Float64,
    amount    Float64,
    notional  Float64,
    source    LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, ts, side, price, amount);

CREATE TABLE IF NOT EXISTS funding_payments
(
    origin         LowCardinality(String),
    strategy_id    LowCardinality(String),
    variant_id     LowCardinality(String),
    config_hash    LowCardinality(String),
    ts             DateTime64(3, 'UTC'),           -- the funding time
    exchange       LowCardinality(String),
    symbol         LowCardinality(String),
    position_id    UInt64,
    position_side  Int8,
    qty            Float64,
    mark_price     Float64,
    rate           Float64,
    amount         Float64                         -- to the book: > 0 received, < 0 paid
)
ENGINE = ReplacingMergeTree
ORDER BY (origin, strategy_id, variant_id, position_id, ts);

ALTER TABLE equity ADD COLUMN IF NOT EXISTS funding Float64 DEFAULT 0 AFTER fees;
