-- Tables of the raw_interactions asset. A batch (the initial file, or one file of
-- incoming/) is replaced whole: its rows are deleted and inserted in one transaction.
CREATE TABLE IF NOT EXISTS ingest_batches (
    batch_id       VARCHAR NOT NULL,
    batch_seq      BIGINT NOT NULL,     -- order of arrival: 'initial' is 0, later batches count up
    source_file    VARCHAR NOT NULL,    -- relative to the dataset folder
    sha256         VARCHAR NOT NULL,
    n_read         BIGINT NOT NULL,     -- data rows in the file
    n_rows         BIGINT NOT NULL,     -- rows loaded
    n_rejected     BIGINT NOT NULL,     -- rows quarantined in raw_interaction_rejects
    has_evaluation BOOLEAN NOT NULL,
    ingested_at    TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS raw_interactions (
    user_id     BIGINT NOT NULL CHECK (user_id >= 0),
    item_id     BIGINT NOT NULL CHECK (item_id >= 0),
    ts          BIGINT NOT NULL CHECK (ts >= 0),
    evaluation  BOOLEAN,                -- NULL when the file has no evaluation column
    batch_id    VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL,
    source_line BIGINT NOT NULL         -- CSV: 1-based line (header = 1); Parquet: 0-based row index
);

CREATE TABLE IF NOT EXISTS raw_interaction_rejects (
    batch_id    VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL,
    line        BIGINT,                 -- as source_line
    column_name VARCHAR,
    value       VARCHAR,
    reason      VARCHAR NOT NULL
);
