-- Calibration per model (issue 12; the formulas are models/calibration.py's).
--
-- prediction_calibration: one row per matured prediction and probability of a class: kind
-- 'calibrated' (p_*, what the gates read) or 'raw' (raw_*, the model's own output), cls 0 down,
-- 1 flat, 2 up, p its probability, hit 1 when that class happened, bin = floor(p x 10) in 0..9
-- (p = 1 in bin 9). Filter it by start (the predicted bar) for a time range.
CREATE OR REPLACE VIEW prediction_calibration AS
SELECT
    pr.exchange AS exchange, pr.symbol AS symbol, pr.tf AS tf, pr.start AS start, pr.model AS model,
    pr.version AS version, lb.label AS label, tupleElement(c, 1) AS kind, tupleElement(c, 2) AS cls,
    tupleElement(c, 3) AS p, toUInt8(lb.label = cls) AS hit, toUInt8(least(floor(p * 10), 9)) AS bin
FROM predictions AS pr FINAL
INNER JOIN labels AS lb FINAL
    ON pr.exchange = lb.exchange AND pr.symbol = lb.symbol AND pr.tf = lb.tf AND pr.start = lb.start
ARRAY JOIN [('calibrated', 0, pr.p_down), ('calibrated', 1, pr.p_flat), ('calibrated', 2, pr.p_up),
            ('raw', 0, pr.raw_down), ('raw', 1, pr.raw_flat), ('raw', 2, pr.raw_up)] AS c;

-- model_reliability: the reliability curve per model, kind and class over the whole history: per
-- bin, n predictions, their mean probability of the class and how often it happened. Calibrated:
-- mean_predicted = observed_freq.
CREATE OR REPLACE VIEW model_reliability AS
SELECT model, tf, kind, cls, bin, count() AS n, avg(p) AS mean_predicted, avg(hit) AS observed_freq
FROM prediction_calibration
GROUP BY model, tf, kind, cls, bin;

-- model_calibration: per model and kind over the whole history: labels n, the classwise expected
-- calibration error ece = mean over the classes of sum_bins (n_bin / n) |observed - predicted|
-- (10 equal-width bins; a calibrated model on a finite sample still shows ~0.01-0.03), log loss
-- (p floored at 1e-15) and prior_log_loss, the label entropy of those rows (the log loss of always
-- predicting their class frequencies: below it, a model has skill).
CREATE OR REPLACE VIEW model_calibration AS
SELECT r.model AS model, r.tf AS tf, r.kind AS kind, s.n AS n, r.ece AS ece, s.log_loss AS log_loss,
       s.prior_log_loss AS prior_log_loss
FROM
(
    SELECT model, tf, kind, sum(n * abs(observed_freq - mean_predicted)) / sum(n) AS ece
    FROM model_reliability
    GROUP BY model, tf, kind
) AS r
INNER JOIN
(
    SELECT model, tf, kind, countIf(hit = 1) AS n, avgIf(-log(greatest(p, 1e-15)), hit = 1) AS log_loss,
           -(countIf(hit = 1 AND cls = 0) / n * log(greatest(countIf(hit = 1 AND cls = 0) / n, 1e-15))
             + countIf(hit = 1 AND cls = 1) / n * log(greatest(countIf(hit = 1 AND cls = 1) / n, 1e-15))
             + countIf(hit = 1 AND cls = 2) / n * log(greatest(countIf(hit = 1 AND cls = 2) / n, 1e-15))) AS prior_log_loss
    FROM prediction_calibration
    GROUP BY model, tf, kind
) AS s
ON r.model = s.model AND r.tf = s.tf AND r.kind = s.kind;
