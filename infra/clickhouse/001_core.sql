-- Core tables of the walking skeleton. Migration 1 (see sinks/clickhouse.py: applied once per store,
-- recorded in schema_migrations): change a table in a new numbered file, never here.
-- Keys are deterministic: re-running the same input converges to the same rows (read with FINAL).
-- Times are DateTime64(3, 'UTC'); bars are labelled by their start.

CREATE TABLE IF NOT EXISTS bars
(
    exchange          LowCardinality(String),
    symbol            LowCardinality(String),
    tf                LowCardinality(String),
    start             DateTime64(3, 'UTC'),
    end               DateTime64(3, 'UTC'),
    open              Float64,
    high              Float64,
    low               Float64,
    close             Float64,
    volume            Float64,
    notional          Float64,
    vwap              Float64,
    trades            UInt32,
    buy_volume        Float64,
    sell_volume       Float64,
    delta             Float64,
    min_delta         Float64,
    max_delta         Float64,
    largest_trade     Float64,
    largest_notional  Float64,
    parent_orders     UInt32,
    pro_orders        UInt32,
    amateur_orders    UInt32,
    pros_gross        Float64,
    pros_net          Float64,
    amateurs_gross    Float64,
    amateurs_net      Float64,
    s_top             Float64,
    s_bot             Float64,
    s_mood            Float64,
    pro_threshold     Float64,
    amateur_threshold Float64,
    poc               Float64,
    vah               Float64,
    val               Float64,
    profile_bin       Float64,
    profile_coarse    UInt8,  -- 1: range too wide for the bin cap, profile_bin is 10^k x the instrument bin
    partial           UInt8   -- 1: emitted at end of input before the period ended
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, tf, start);

CREATE TABLE IF NOT EXISTS late_trades
(
    exchange  LowCardinality(String),
    symbol    LowCardinality(String),
    id        String,
    ts        DateTime64(3, 'UTC'),
    price     Float64,
    amount    Float64,
    side      LowCardinality(String),
    trader    Nullable(String),
    recv_ts   DateTime64(3, 'UTC'),
    seq       Int64,
    watermark DateTime64(3, 'UTC'),
    reason    LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, id);

CREATE TABLE IF NOT EXISTS dead_letters
(
    source    LowCardinality(String),
    partition String,
    offset    Int64,
    payload   String,
    reason    LowCardinality(String),
    detail    String,
    recv_ts   DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (source, partition, offset);
