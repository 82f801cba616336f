-- The best trial of a model's latest finished tuning run: the highest mean value over its seeds
-- among trials whose every seed completed (ties: the lower trial number, so the default config
-- wins a tie). Parameters: $model.
WITH latest AS (
    SELECT run_id, finished_at FROM tuning_runs
    WHERE model = $model AND finished_at IS NOT NULL
    ORDER BY finished_at DESC, started_at DESC
    LIMIT 1
), per_trial AS (
    SELECT t.run_id, t.trial, any_value(t.params) AS params, avg(t.value) AS value, count(*) AS seeds,
           CAST(round(median(t.best_epoch)) AS INTEGER) AS best_epoch
    FROM tuning_trials t JOIN latest USING (run_id)
    WHERE t.model = $model
    GROUP BY t.run_id, t.trial
    HAVING bool_and(t.state = 'COMPLETE')
)
SELECT p.run_id, p.trial, p.params, p.value, p.seeds, p.best_epoch, r.fixed, r.finished_at, r.data_versions
FROM per_trial p JOIN tuning_runs r ON r.model = $model AND r.run_id = p.run_id
ORDER BY p.value DESC, p.trial
LIMIT 1;
