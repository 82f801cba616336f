-- Per-row metrics (long format, any k) of a model's seed 0 and the means of each of its seeds, one
-- set per (model, protocol).
CREATE TABLE IF NOT EXISTS evaluation_rows (
    model        VARCHAR NOT NULL,
    protocol     VARCHAR NOT NULL,
    user_id      BIGINT  NOT NULL,
    profile_size INTEGER,
    n_relevant   INTEGER,
    n_candidates INTEGER,
    has_cold     BOOLEAN,
    metric       VARCHAR NOT NULL,
    value        DOUBLE
);
CREATE TABLE IF NOT EXISTS evaluation_summary (
    model         VARCHAR NOT NULL,
    protocol      VARCHAR NOT NULL,
    metric        VARCHAR NOT NULL,
    value         DOUBLE,
    n_rows        BIGINT,
    train_seconds DOUBLE,
    evaluated_at  TIMESTAMP,
    seed          INTEGER DEFAULT 0  -- 0: the model's own checkpoint; k: models/<name>/seed_<k>.pt
);
-- a table written before seeds were evaluated gets the column in place (its rows are seed 0)
ALTER TABLE evaluation_summary ADD COLUMN IF NOT EXISTS seed INTEGER DEFAULT 0;
