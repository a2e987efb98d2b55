-- Liveness (issue 14): a pipeline_health row also says how far the pipeline has come, so "alive"
-- can be told from "making progress" (`tapeflow health`, `tapeflow status`, Grafana alerts).
-- ADD COLUMN IF NOT EXISTS: stores created before this file gain the columns at the next start;
-- their older rows read NULL / 0.

-- newest 1m bar end this run has written (event time): the pipeline's watermark. It only moves
-- when a minute closes; "stuck" = the same value for longer than the liveness bound.
ALTER TABLE pipeline_health ADD COLUMN IF NOT EXISTS watermark Nullable(DateTime64(3, 'UTC'));

-- trades counted into 1m bars since the process started (trades_in is per interval)
ALTER TABLE pipeline_health ADD COLUMN IF NOT EXISTS trades_total UInt64;

-- wall clock when the writing process started: the rows of one run share it
ALTER TABLE pipeline_health ADD COLUMN IF NOT EXISTS started Nullable(DateTime64(3, 'UTC'));
