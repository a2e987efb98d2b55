-- Views over the base tables (read with FINAL: the base tables are ReplacingMergeTree).

-- Each prediction beside the label it was about, once that label matured.
CREATE OR REPLACE VIEW prediction_outcomes AS
SELECT
    p.exchange AS exchange, p.symbol AS symbol, p.tf AS tf, p.start AS start, p.end AS end,
    p.model AS model, p.version AS version,
    p.p_down AS p_down, p.p_flat AS p_flat, p.p_up AS p_up, p.confidence AS confidence, p.alpha AS alpha,
    l.label AS label, l.fwd_ret AS fwd_ret,
    multiIf(p.p_up >= p.p_down AND p.p_up >= p.p_flat, 2, p.p_down >= p.p_flat, 0, 1) AS predicted,
    multiIf(l.label = 0, p.p_down, l.label = 1, p.p_flat, p.p_up) AS p_true,
    pow(p.p_down - (l.label = 0), 2) + pow(p.p_flat - (l.label = 1), 2) + pow(p.p_up - (l.label = 2), 2) AS brier
FROM predictions AS p FINAL
INNER JOIN labels AS l FINAL
    ON p.exchange = l.exchange AND p.symbol = l.symbol AND p.tf = l.tf AND p.start = l.start;
