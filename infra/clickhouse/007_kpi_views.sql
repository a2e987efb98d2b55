-- KPI views (SPEC 8): what the dashboards, the report and anyone with a SQL prompt read.
-- Every view reads the ReplacingMergeTree base tables with FINAL, so a replayed or re-inserted row
-- counts once. Strategy views are per (origin, strategy_id, variant_id): production and every
-- optimizer variant side by side. Days are UTC days (toDate of a UTC DateTime64).
-- Ratios that have no defined value (no trades, zero spread, one return) are NULL, never NaN.
-- Conventions for the whole file (the schema splitter cuts at semicolons): no semicolon anywhere
-- but at the end of a statement, and comments only on their own lines.

-- Equity curve: one row per equity mark (the latest seq of each mark time wins), with the running
-- all-time peak of the curve and the drawdown from it as a fraction (0.05 = 5 % below the peak).
CREATE OR REPLACE VIEW kpi_equity_curve AS
SELECT
    origin, strategy_id, variant_id, ts, equity, cash, realised_pnl, unrealised_pnl, fees, exposure,
    open_positions, halted,
    max(equity) OVER w AS running_peak,
    1 - equity / (max(equity) OVER w) AS drawdown
FROM equity FINAL
WINDOW w AS (PARTITION BY origin, strategy_id, variant_id ORDER BY ts ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW);

-- Daily PnL, return, drawdown and rolling Sharpe.
-- close_equity: the day's last mark. open_equity: the previous day's close (the first day: its first
-- mark). pnl = close - open, daily_return = close / open - 1.
-- max_drawdown: the deepest drawdown from the running all-time peak seen during the day,
-- max_drawdown_to_date: the deepest one so far (= the max drawdown of the curve up to that day).
-- sharpe_30d: mean / sample std of the daily returns of the last 30 days (this one included)
-- times sqrt(365) (crypto trades every day), NULL with fewer than 2 returns or zero spread.
-- Days without a mark are absent (a day with no mark has no return).
CREATE OR REPLACE VIEW kpi_daily_pnl AS
SELECT
    origin, strategy_id, variant_id, day, marks, open_equity, close_equity, pnl, daily_return, max_drawdown,
    max(max_drawdown) OVER (PARTITION BY origin, strategy_id, variant_id ORDER BY day
                            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS max_drawdown_to_date,
    if(count() OVER w30 >= 2 AND stddevSamp(daily_return) OVER w30 > 0,
       avg(daily_return) OVER w30 / stddevSamp(daily_return) OVER w30 * sqrt(365), NULL) AS sharpe_30d
FROM
(
    SELECT
        origin, strategy_id, variant_id, day, marks, close_equity, max_drawdown,
        coalesce(lagInFrame(toNullable(close_equity)) OVER (PARTITION BY origin, strategy_id, variant_id ORDER BY day
                                                           ROWS BETWEEN 1 PRECEDING AND CURRENT ROW),
                 first_equity) AS open_equity,
        close_equity - open_equity AS pnl,
        close_equity / open_equity - 1 AS daily_return
    FROM
    (
        SELECT
            origin, strategy_id, variant_id, toDate(ts) AS day, count() AS marks,
            argMin(equity, ts) AS first_equity, argMax(equity, ts) AS close_equity, max(drawdown) AS max_drawdown
        FROM kpi_equity_curve
        GROUP BY origin, strategy_id, variant_id, day
    )
)
WINDOW w30 AS (PARTITION BY origin, strategy_id, variant_id ORDER BY day ROWS BETWEEN 29 PRECEDING AND CURRENT ROW);

-- Sharpe and drawdown per strategy and variant over the whole stored history.
-- sharpe_minute: per-minute returns of the curve (the last mark of each minute, return against the
-- previous minute that has a mark), mean / sample std x sqrt(525600 minutes a year), the same
-- convention as the run summary (dataflows/reporting.py) except that the curve starts at its first
-- stored mark. sharpe_daily: the same over daily_return of kpi_daily_pnl, x sqrt(365).
-- Both NULL with fewer than 2 returns or zero spread.
CREATE OR REPLACE VIEW kpi_sharpe AS
SELECT
    origin, strategy_id, variant_id, first_ts, last_ts, first_equity, last_equity,
    last_equity - first_equity AS pnl, last_equity / first_equity - 1 AS total_return, max_drawdown,
    minute_returns, sharpe_minute, d.days AS days, d.sharpe_daily AS sharpe_daily
FROM
(
    SELECT
        origin, strategy_id, variant_id, min(minute) AS first_ts, max(minute) AS last_ts,
        argMin(eq, minute) AS first_equity, argMax(eq, minute) AS last_equity, max(dd) AS max_drawdown,
        count(ret) AS minute_returns,
        if(count(ret) >= 2 AND stddevSamp(ret) > 0, avg(ret) / stddevSamp(ret) * sqrt(525600), NULL) AS sharpe_minute
    FROM
    (
        SELECT
            origin, strategy_id, variant_id, minute, eq, dd,
            eq / lagInFrame(toNullable(eq)) OVER (PARTITION BY origin, strategy_id, variant_id ORDER BY minute
                                                  ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) - 1 AS ret
        FROM
        (
            SELECT origin, strategy_id, variant_id, toStartOfMinute(ts) AS minute,
                   argMax(equity, ts) AS eq, max(drawdown) AS dd
            FROM kpi_equity_curve
            GROUP BY origin, strategy_id, variant_id, minute
        )
    )
    GROUP BY origin, strategy_id, variant_id
) AS m
LEFT JOIN
(
    SELECT
        origin, strategy_id, variant_id, count() AS days,
        if(count() >= 2 AND stddevSamp(daily_return) > 0,
           avg(daily_return) / stddevSamp(daily_return) * sqrt(365), NULL) AS sharpe_daily
    FROM kpi_daily_pnl
    GROUP BY origin, strategy_id, variant_id
) AS d USING (origin, strategy_id, variant_id);

-- Closed trades: every decision that opened a position (action open_long or open_short), joined by
-- position_id to the fills of that position once it has an exit fill (a fill with realised_pnl).
-- gross_pnl = net_pnl + fees, fees = every fill's fee of the position (entry and exit),
-- net_pnl = the exit's realised_pnl (both fees paid), pnl_bps = the exit's pnl_bps (net, of the entry
-- notional). conf_decile: 1..10, rank deciles (ntile) of best_conf among the closed trades of the same
-- strategy and variant, ties broken by decision time then symbol (with fewer than 10 trades each
-- trade is its own bucket), 0 when the decision had no model confidence (best_conf NULL).
-- Positions still open, and entries that never filled, are not here.
CREATE OR REPLACE VIEW kpi_closed_trades AS
SELECT
    origin, strategy_id, variant_id, position_id, exchange, symbol, side, arm, decision_ts, best_conf,
    if(best_conf IS NULL, 0,
       ntile(10) OVER (PARTITION BY origin, strategy_id, variant_id, best_conf IS NULL
                       ORDER BY best_conf, decision_ts, symbol)) AS conf_decile,
    decision_notional, entry_ts, entry_price, closed_at, exit_price, exit_reason, traded_notional,
    fees, net_pnl, net_pnl + fees AS gross_pnl, pnl_bps, net_pnl > 0 AS win
FROM
(
    SELECT
        d.origin AS origin, d.strategy_id AS strategy_id, d.variant_id AS variant_id,
        d.position_id AS position_id, d.exchange AS exchange, d.symbol AS symbol, d.side AS side, d.arm AS arm,
        d.ts AS decision_ts, d.best_conf AS best_conf, d.notional AS decision_notional,
        f.entry_ts AS entry_ts, f.entry_price AS entry_price, f.closed_at AS closed_at, f.exit_price AS exit_price,
        f.exit_reason AS exit_reason, f.traded_notional AS traded_notional, f.fees AS fees,
        f.net_pnl AS net_pnl, f.pnl_bps AS pnl_bps
    FROM
    (
        SELECT origin, strategy_id, variant_id, position_id, exchange, symbol, side, arm, ts, best_conf, notional
        FROM decisions FINAL
        WHERE action IN ('open_long', 'open_short') AND position_id > 0
    ) AS d
    INNER JOIN
    (
        SELECT
            origin, strategy_id, variant_id, position_id,
            minIf(ts, reason = 'entry') AS entry_ts, anyIf(price, reason = 'entry') AS entry_price,
            maxIf(ts, realised_pnl IS NOT NULL) AS closed_at, anyIf(price, realised_pnl IS NOT NULL) AS exit_price,
            anyIf(reason, realised_pnl IS NOT NULL) AS exit_reason,
            sum(notional) AS traded_notional, sum(fee) AS fees,
            sumIf(assumeNotNull(realised_pnl), realised_pnl IS NOT NULL) AS net_pnl,
            sumIf(assumeNotNull(pnl_bps), pnl_bps IS NOT NULL) AS pnl_bps,
            countIf(realised_pnl IS NOT NULL) AS exits
        FROM fills FINAL
        GROUP BY origin, strategy_id, variant_id, position_id
        HAVING exits > 0
    ) AS f
    ON d.origin = f.origin AND d.strategy_id = f.strategy_id AND d.variant_id = f.variant_id
       AND d.position_id = f.position_id
);

-- Hit rate and average PnL by confidence decile (deciles as in kpi_closed_trades).
-- hit_rate = share of trades with net_pnl > 0. conf_lo / conf_hi: the decile's best_conf range.
CREATE OR REPLACE VIEW kpi_confidence_deciles AS
SELECT
    origin, strategy_id, variant_id, conf_decile,
    count() AS trades, countIf(win) AS wins, countIf(win) / count() AS hit_rate,
    avg(net_pnl) AS avg_pnl, avg(pnl_bps) AS avg_pnl_bps, sum(net_pnl) AS total_pnl,
    min(best_conf) AS conf_lo, max(best_conf) AS conf_hi
FROM kpi_closed_trades
GROUP BY origin, strategy_id, variant_id, conf_decile;

-- Calibration per model (and timeframe) over every matured prediction (prediction_outcomes):
-- brier = mean multi-class Brier score (sum over down/flat/up of (p - outcome)^2, 0 best, 2 worst),
-- accuracy = share where the arg-max class was the label, log_loss = mean -ln p(true class) (p floored
-- at 1e-15), mean_confidence = mean of max(p_up, p_down).
CREATE OR REPLACE VIEW kpi_calibration AS
SELECT
    model, tf, count() AS n, min(start) AS first_start, max(start) AS last_start,
    avg(brier) AS brier, avg(predicted = label) AS accuracy,
    avg(-log(greatest(p_true, 1e-15))) AS log_loss, avg(confidence) AS mean_confidence
FROM prediction_outcomes
GROUP BY model, tf;

-- The same per UTC day of the predicted bar's start (calibration over time).
CREATE OR REPLACE VIEW kpi_calibration_daily AS
SELECT
    model, tf, toDate(start) AS day, count() AS n,
    avg(brier) AS brier, avg(predicted = label) AS accuracy,
    avg(-log(greatest(p_true, 1e-15))) AS log_loss, avg(confidence) AS mean_confidence
FROM prediction_outcomes
GROUP BY model, tf, day;

-- Reliability bins per model: one-vs-rest for each class (down, flat, up), each prediction gives a
-- (predicted probability, happened 0/1) pair per class. bin = floor(p x 10) in 0..9 (p = 1 falls in
-- bin 9), bin_lo = bin / 10. mean_predicted vs observed_freq per bin is the reliability diagram,
-- a calibrated model has them equal. class = 'all' pools the three classes.
CREATE OR REPLACE VIEW kpi_reliability AS
SELECT
    model, tf, class, bin, bin / 10 AS bin_lo, count() AS n,
    avg(p) AS mean_predicted, avg(hit) AS observed_freq
FROM
(
    SELECT model, tf, tupleElement(c, 1) AS cls, tupleElement(c, 2) AS p, tupleElement(c, 3) AS hit,
           toUInt8(least(floor(p * 10), 9)) AS bin
    FROM prediction_outcomes
    ARRAY JOIN [('down', p_down, toUInt8(label = 0)), ('flat', p_flat, toUInt8(label = 1)),
                ('up', p_up, toUInt8(label = 2))] AS c
)
ARRAY JOIN [cls, 'all'] AS class
GROUP BY model, tf, class, bin;

-- Veto frequency by reason per strategy, variant and UTC day: decisions whose vetoes contained the
-- reason (arrayJoin over the distinct reasons of each decision), the day's decisions, and the share.
CREATE OR REPLACE VIEW kpi_veto_frequency AS
SELECT
    origin, strategy_id, variant_id, day, arrayJoin(arrayDistinct(vetoes)) AS reason,
    count() AS vetoed, any(day_decisions) AS decisions, count() / any(day_decisions) AS share
FROM
(
    SELECT origin, strategy_id, variant_id, toDate(ts) AS day, vetoes,
           count() OVER (PARTITION BY origin, strategy_id, variant_id, toDate(ts)) AS day_decisions
    FROM decisions FINAL
)
GROUP BY origin, strategy_id, variant_id, day, reason;

-- The same for shadow_vetoes (would-be vetoes recorded in shadow mode, the trade was not blocked).
CREATE OR REPLACE VIEW kpi_shadow_veto_frequency AS
SELECT
    origin, strategy_id, variant_id, day, arrayJoin(arrayDistinct(shadow_vetoes)) AS reason,
    count() AS vetoed, any(day_decisions) AS decisions, count() / any(day_decisions) AS share
FROM
(
    SELECT origin, strategy_id, variant_id, toDate(ts) AS day, shadow_vetoes,
           count() OVER (PARTITION BY origin, strategy_id, variant_id, toDate(ts)) AS day_decisions
    FROM decisions FINAL
)
GROUP BY origin, strategy_id, variant_id, day, reason;

-- Turnover per UTC day: traded notional of every fill (entries and exits) / the day's average
-- equity mark. Days with marks but no fills have turnover 0, fills on a day without marks are absent.
CREATE OR REPLACE VIEW kpi_turnover_daily AS
SELECT
    origin, strategy_id, variant_id, day, avg_equity, fills, traded_notional,
    traded_notional / avg_equity AS turnover
FROM
(
    SELECT origin, strategy_id, variant_id, toDate(ts) AS day, avg(equity) AS avg_equity
    FROM equity FINAL
    GROUP BY origin, strategy_id, variant_id, day
) AS e
LEFT JOIN
(
    SELECT origin, strategy_id, variant_id, toDate(ts) AS day, count() AS fills, sum(notional) AS traded_notional
    FROM fills FINAL
    GROUP BY origin, strategy_id, variant_id, day
) AS f USING (origin, strategy_id, variant_id, day);

-- Fees as a share of gross PnL, per UTC day of the exit (closed trades, kpi_closed_trades):
-- total_gross_pnl = PnL before fees, total_fees = entry and exit fees of those trades,
-- total_net_pnl = gross - fees, fee_share = fees / gross when gross > 0 (NULL when the trades lost
-- before fees: then the fees only deepened a loss), fee_share_abs = fees / sum |gross per trade|
-- (always defined when a trade moved: how much of the traded edge, won or lost, went to fees).
CREATE OR REPLACE VIEW kpi_fees_daily AS
SELECT
    origin, strategy_id, variant_id, toDate(closed_at) AS day, count() AS trades,
    sum(gross_pnl) AS total_gross_pnl, sum(fees) AS total_fees, sum(net_pnl) AS total_net_pnl,
    if(sum(gross_pnl) > 0, sum(fees) / sum(gross_pnl), NULL) AS fee_share,
    if(sum(abs(gross_pnl)) > 0, sum(fees) / sum(abs(gross_pnl)), NULL) AS fee_share_abs
FROM kpi_closed_trades
GROUP BY origin, strategy_id, variant_id, day;

-- The same over the whole history per strategy and variant.
CREATE OR REPLACE VIEW kpi_fees AS
SELECT
    origin, strategy_id, variant_id, count() AS trades,
    sum(gross_pnl) AS total_gross_pnl, sum(fees) AS total_fees, sum(net_pnl) AS total_net_pnl,
    if(sum(gross_pnl) > 0, sum(fees) / sum(gross_pnl), NULL) AS fee_share,
    if(sum(abs(gross_pnl)) > 0, sum(fees) / sum(abs(gross_pnl)), NULL) AS fee_share_abs
FROM kpi_closed_trades
GROUP BY origin, strategy_id, variant_id;

-- Bandit arm selection per hour (of decision time): selected = decisions where the bandit picked the
-- arm (arm not empty, whether or not a gate then blocked the entry), opened = those that opened a
-- position, open_share = opened / all positions opened by that strategy in that hour (NULL if none).
CREATE OR REPLACE VIEW kpi_arm_selection AS
SELECT
    origin, strategy_id, variant_id, hour, arm, selected, opened,
    if(sum(opened) OVER h > 0, opened / sum(opened) OVER h, NULL) AS open_share
FROM
(
    SELECT origin, strategy_id, variant_id, toStartOfHour(ts) AS hour, arm,
           count() AS selected, countIf(action IN ('open_long', 'open_short')) AS opened
    FROM decisions FINAL
    WHERE arm != ''
    GROUP BY origin, strategy_id, variant_id, hour, arm
)
WINDOW h AS (PARTITION BY origin, strategy_id, variant_id, hour);

-- Decision latency percentiles (wall ms from the 1m window close to the decision) per strategy,
-- variant and hour of decision time, from decisions.latency_ms (linear interpolation, as numpy).
CREATE OR REPLACE VIEW kpi_decision_latency AS
SELECT
    origin, strategy_id, variant_id, toStartOfHour(ts) AS hour, count() AS decisions,
    quantile(0.5)(latency_ms) AS p50_ms, quantile(0.95)(latency_ms) AS p95_ms,
    quantile(0.99)(latency_ms) AS p99_ms, max(latency_ms) AS max_ms
FROM decisions FINAL
GROUP BY origin, strategy_id, variant_id, hour;

-- Pipeline health per wall-clock minute over every process and worker (pipeline_health rows).
-- trades_per_s = sum over workers of each worker's mean rate in the minute, trades = trades counted
-- into 1m bars, late_rate = late / (trades + late), dead_letter_rate = dead / (trades + late + dead),
-- watermark_lag_ms = the worst worker's lag, decision_pNN_ms = the worst worker's percentile
-- (percentiles of different workers cannot be merged exactly: the max is an upper bound).
CREATE OR REPLACE VIEW kpi_pipeline_health AS
SELECT
    minute, count() AS workers, sum(w_trades) AS trades, sum(w_rate) AS trades_per_s, sum(w_bars) AS bars,
    sum(w_late) AS late_trades, sum(w_dead) AS dead_letters, sum(w_dups) AS duplicates,
    if(sum(w_trades) + sum(w_late) > 0, sum(w_late) / (sum(w_trades) + sum(w_late)), NULL) AS late_rate,
    if(sum(w_trades) + sum(w_late) + sum(w_dead) > 0,
       sum(w_dead) / (sum(w_trades) + sum(w_late) + sum(w_dead)), NULL) AS dead_letter_rate,
    max(w_lag) AS watermark_lag_ms, max(w_p50) AS decision_p50_ms, max(w_p95) AS decision_p95_ms,
    max(w_p99) AS decision_p99_ms, sum(w_decisions) AS decisions, sum(w_rss) AS rss_mb
FROM
(
    SELECT
        toStartOfMinute(ts) AS minute, process, worker,
        sum(trades_in) AS w_trades, avg(trades_per_s) AS w_rate, sum(bars) AS w_bars, sum(late_trades) AS w_late,
        sum(dead_letters) AS w_dead, sum(duplicates) AS w_dups, max(watermark_lag_ms) AS w_lag,
        max(decision_p50_ms) AS w_p50, max(decision_p95_ms) AS w_p95, max(decision_p99_ms) AS w_p99,
        sum(decisions) AS w_decisions, max(rss_mb) AS w_rss
    FROM pipeline_health FINAL
    GROUP BY minute, process, worker
)
GROUP BY minute;

-- Event-time throughput per instrument and minute, straight from the stored rows (needs no
-- pipeline_health): trades in the 1m bar, trades_per_s = trades / 60, late trades of that minute
-- (late_trades by trade time) and late_rate = late / (trades + late).
CREATE OR REPLACE VIEW kpi_throughput AS
SELECT
    exchange, symbol, minute, trades, trades / 60 AS trades_per_s, notional, late,
    if(trades + late > 0, late / (trades + late), NULL) AS late_rate
FROM
(
    SELECT exchange, symbol, start AS minute, trades, notional
    FROM bars FINAL
    WHERE tf = '1m'
) AS b
FULL OUTER JOIN
(
    SELECT exchange, symbol, toStartOfMinute(ts) AS minute, count() AS late
    FROM late_trades FINAL
    GROUP BY exchange, symbol, minute
) AS l USING (exchange, symbol, minute);

-- Dead letters per minute of receipt, source and reason.
CREATE OR REPLACE VIEW kpi_dead_letters AS
SELECT toStartOfMinute(recv_ts) AS minute, source, reason, count() AS dead_letters
FROM dead_letters FINAL
GROUP BY minute, source, reason;
