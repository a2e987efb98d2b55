-- Predictions keep the model's raw output beside the calibrated probabilities that decisions read
-- (issue 12, models/calibration.py): p_down/p_flat/p_up are calibrated (River, the ONNX ensemble),
-- raw_down/raw_flat/raw_up what the model itself said. Rows written before calibration existed
-- (and models that are not calibrated, the ensemble's members) have raw = p.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS raw_down Float64 DEFAULT p_down AFTER p_up;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS raw_flat Float64 DEFAULT p_flat AFTER raw_down;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS raw_up Float64 DEFAULT p_up AFTER raw_flat;
