SELECT (SELECT count(*) FROM raw_interactions) AS raw_rows_total,
       (SELECT count(DISTINCT (batch_id, line)) FROM raw_interaction_rejects) AS rejected_rows_total,
       (SELECT count(*) FROM ingest_batches) AS batches;
