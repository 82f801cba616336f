-- Rows of raw_interactions now, in all and in the batch about to be replaced: the shrink guard
-- of write_batch compares them with the new batch (in the same transaction as the write).
SELECT count(*) AS total_rows,
       count(*) FILTER (WHERE batch_id = $batch_id) AS batch_rows
FROM raw_interactions;
