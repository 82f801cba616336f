-- Replace one batch of raw_interactions (run inside one transaction). The validated
-- rows are registered as batch_rows, the quarantined cells as batch_rejects.
-- A replaced batch keeps its place in the batch order; 'initial' is first, a new one goes last.
CREATE OR REPLACE TEMP TABLE batch_seq_of AS
SELECT coalesce(
    (SELECT batch_seq FROM ingest_batches WHERE batch_id = $batch_id),
    CASE WHEN $batch_id = 'initial' THEN 0
         ELSE (SELECT coalesce(max(batch_seq), 0) + 1 FROM ingest_batches) END
) AS batch_seq;

DELETE FROM raw_interactions WHERE batch_id = $batch_id;
DELETE FROM raw_interaction_rejects WHERE batch_id = $batch_id;
DELETE FROM ingest_batches WHERE batch_id = $batch_id;

INSERT INTO raw_interactions (user_id, item_id, ts, evaluation, batch_id, source_file, source_line)
SELECT user_id, item_id, ts, evaluation, $batch_id, $source_file, source_line
FROM batch_rows
ORDER BY source_line;

INSERT INTO raw_interaction_rejects (batch_id, source_file, line, column_name, value, reason)
SELECT $batch_id, $source_file, line, column_name, value, reason
FROM batch_rejects
ORDER BY line, column_name;

INSERT INTO ingest_batches
    (batch_id, batch_seq, source_file, sha256, n_read, n_rows, n_rejected, has_evaluation, ingested_at)
SELECT $batch_id, batch_seq, $source_file, $sha256, $n_read, $n_rows, $n_rejected, $has_evaluation,
       now()::TIMESTAMP
FROM batch_seq_of;

DROP TABLE batch_seq_of;
