-- One row per triple set (random sampler spec or guided triples file) for lineage.
CREATE TABLE IF NOT EXISTS triple_sets (
    name              VARCHAR PRIMARY KEY,
    seed              BIGINT,
    n_users           BIGINT,
    n_items           BIGINT,
    n_positives       BIGINT,
    triples_per_epoch BIGINT,
    file              VARCHAR,
    created_at        TIMESTAMP
);
