-- Features, labels and model predictions of the primary timeframe (SPEC 4-5).
-- Feature values are a map (feature name -> value; absent = not defined yet or overlay missing),
-- overlay features prefixed by their timeframe: values['rsi'], values['1h_rsi'].

CREATE TABLE IF NOT EXISTS features
(
    exchange    LowCardinality(String),
    symbol      LowCardinality(String),
    tf          LowCardinality(String),
    start       DateTime64(3, 'UTC'),
    end         DateTime64(3, 'UTC'),
    close       Float64,
    warm        UInt8,
    regime      LowCardinality(String),
    values      Map(LowCardinality(String), Float64),
    overlay_ok  Map(LowCardinality(String), UInt8)
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, tf, start);

CREATE TABLE IF NOT EXISTS labels
(
    exchange    LowCardinality(String),
    symbol      LowCardinality(String),
    tf          LowCardinality(String),
    start       DateTime64(3, 'UTC'),
    end         DateTime64(3, 'UTC'),
    horizon     UInt16,
    fwd_ret     Float64,
    band        Float64,
    label       Int8,        -- 0 down, 1 flat, 2 up
    matured_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, tf, start, horizon);

CREATE TABLE IF NOT EXISTS predictions
(
    exchange    LowCardinality(String),
    symbol      LowCardinality(String),
    tf          LowCardinality(String),
    start       DateTime64(3, 'UTC'),
    end         DateTime64(3, 'UTC'),
    model       LowCardinality(String),   -- river_lr, river_arf, onnx_0.., onnx_ensemble
    version     String,
    p_down      Float64,
    p_flat      Float64,
    p_up        Float64,
    confidence  Float64,                  -- max(p_up, p_down)
    alpha       Float64,                  -- |p_up - p_down|
    votes       String                    -- ensemble: JSON of member probabilities
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, tf, start, model);

CREATE TABLE IF NOT EXISTS model_metrics
(
    exchange    LowCardinality(String),
    symbol      LowCardinality(String),
    model       LowCardinality(String),
    ts          DateTime64(3, 'UTC'),     -- when the label that updated them matured
    accuracy    Float64,
    log_loss    Float64,
    brier       Float64,
    n           UInt32                    -- labels in the rolling window
)
ENGINE = ReplacingMergeTree
ORDER BY (exchange, symbol, model, ts);
