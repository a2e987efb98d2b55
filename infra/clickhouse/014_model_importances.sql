-- Feature importances of every trained ONNX ensemble (issue 13, models/train.py and
-- dataflows/training.py): LightGBM's split gain of each input feature summed over the members
-- (importance_type "gain"), and its share of the ensemble's total gain, as in the manifest's
-- `importances`. One row per (version, feature), every input feature included (gain 0: never split
-- on): writing a training's rows again changes nothing. status is the deployment gate's decision
-- (accepted | rejected), trained_at the manifest's created_at.

CREATE TABLE IF NOT EXISTS model_importances
(
    version     String,
    feature     LowCardinality(String),
    rank        UInt16,                   -- 1 = the most gain
    gain        Float64,
    share       Float64,                  -- gain / the ensemble's total gain (shares sum to 1)
    trained_at  DateTime64(3, 'UTC'),
    status      LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (version, feature);
