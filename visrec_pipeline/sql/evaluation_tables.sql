-- Per-row metrics (long format, any k) and their means, one set per (model, protocol).
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
    evaluated_at  TIMESTAMP
);
