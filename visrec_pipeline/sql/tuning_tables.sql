-- Hyper-parameter tuning (pipeline/tuning.py). One row per tuning run of a model, and one per
-- (trial, seed) of it. A run is (model, run_id): re-running a run id replaces its rows; another
-- run id appends. The tuned configuration of a model is read from its latest finished run.
CREATE TABLE IF NOT EXISTS tuning_runs (
    model            VARCHAR   NOT NULL,
    run_id           VARCHAR   NOT NULL,
    started_at       TIMESTAMP NOT NULL,
    finished_at      TIMESTAMP,          -- NULL while running, or when the run was killed
    metric           VARCHAR   NOT NULL, -- what value holds, e.g. validation AUC
    budget           JSON      NOT NULL, -- n_trials, seeds_per_trial, timeout_s, max_epochs, sampler_seed, device
    space            JSON      NOT NULL, -- the searched parameters and their ranges
    fixed            JSON      NOT NULL, -- overrides every trial got
    data_versions    JSON      NOT NULL, -- fingerprints of the split tuned on
    n_trials_run     INTEGER,
    stopped_by       VARCHAR,            -- n_trials or timeout
    wall_seconds     DOUBLE,
    PRIMARY KEY (model, run_id)
);
CREATE TABLE IF NOT EXISTS tuning_trials (
    model       VARCHAR   NOT NULL,
    run_id      VARCHAR   NOT NULL,
    trial       INTEGER   NOT NULL,  -- 0 is the model's default config
    seed        INTEGER   NOT NULL,
    params      JSON      NOT NULL,  -- the searched keys (dotted paths) and their values
    value       DOUBLE,              -- validation metric; NULL unless state = 'COMPLETE'
    state       VARCHAR   NOT NULL,  -- COMPLETE or FAIL
    best_epoch  INTEGER,             -- the epoch early stopping kept (models with epochs)
    epochs_run  INTEGER,
    duration_s  DOUBLE    NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    error       VARCHAR,
    PRIMARY KEY (model, run_id, trial, seed)
);
