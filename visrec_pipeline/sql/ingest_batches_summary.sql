-- One line per batch, in arrival order, with what is in raw_interactions now.
SELECT b.batch_id, b.batch_seq, b.source_file, b.n_read, b.n_rows, b.n_rejected, b.has_evaluation,
       strftime(b.ingested_at, '%Y-%m-%d %H:%M:%S') AS ingested_at, left(b.sha256, 12) AS sha256
FROM ingest_batches b
ORDER BY b.batch_seq, b.batch_id;
