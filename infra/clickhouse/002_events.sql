-- Events: gaps and reconnects from ingest (in band on the trade topic), later kill switches,
-- promotions, config and model changes. `detail` is JSON or text.

CREATE TABLE IF NOT EXISTS events
(
    kind      LowCardinality(String),
    ts        DateTime64(3, 'UTC'),
    exchange  LowCardinality(String),
    symbol    LowCardinality(String),
    from_ts   Nullable(DateTime64(3, 'UTC')),
    to_ts     Nullable(DateTime64(3, 'UTC')),
    reason    String,
    detail    String,
    source    LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (kind, exchange, symbol, ts, reason);
