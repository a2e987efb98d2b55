-- Runs (issue 11, dataflows/runs.py): one row per start of `tapeflow run` that writes trading rows.
-- A run is its input (the source fingerprint) and the settings that make its rows (config_hash); its
-- run_id hashes both. The table lists the runs since the trading tables (decisions, fills, equity)
-- were last empty: a start whose run_id differs from one of them is refused unless --replace.

CREATE TABLE IF NOT EXISTS runs
(
    run_id       String,                  -- sha256 of source + config_hash, first 16 hex digits
    started_at   DateTime64(3, 'UTC'),    -- wall clock of this start
    source       String,                  -- JSON: the source fingerprint (dataflows.runner.source_fingerprint)
    config_hash  String,
    config       String,                  -- JSON: the settings in config_hash
    command      String,                  -- the command line of this start
    replaced     UInt8                    -- 1: this start cleared the trading tables (--replace)
)
ENGINE = ReplacingMergeTree
ORDER BY (run_id, started_at);
