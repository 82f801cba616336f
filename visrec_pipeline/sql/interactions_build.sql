-- One row per (user_id, item_id): the latest timestamp wins; equal timestamps are
-- decided by the later batch, then the later line, so the kept evaluation flag is
-- deterministic. Rows are ordered as the evaluation protocol orders them.
CREATE OR REPLACE TABLE interactions AS
SELECT user_id, item_id, ts, evaluation
FROM (
    SELECT r.user_id, r.item_id, r.ts, r.evaluation,
           row_number() OVER (
               PARTITION BY r.user_id, r.item_id
               ORDER BY r.ts DESC, b.batch_seq DESC, r.source_line DESC
           ) AS newest_first
    FROM raw_interactions r
    JOIN ingest_batches b USING (batch_id)
)
WHERE newest_first = 1
ORDER BY ts, item_id, user_id;
