-- Feature store index: one current row per (backbone, item); `shard`/`row` locate the vector in
-- <features_dir>/<backbone>/<weights_tag made file-safe>/<shard>.{pooled,spatial,ids}.npy.
CREATE TABLE IF NOT EXISTS embedding_index (
    backbone     VARCHAR   NOT NULL,
    weights_tag  VARCHAR   NOT NULL,
    item_id      BIGINT    NOT NULL,
    shard        VARCHAR   NOT NULL,
    "row"        BIGINT    NOT NULL,
    content_hash VARCHAR   NOT NULL,
    computed_at  TIMESTAMP NOT NULL,
    revision     INTEGER   NOT NULL DEFAULT 0,  -- the backbone's feature revision (BackboneSpec.revision)
    PRIMARY KEY (backbone, item_id)
);
-- databases created before the revision column: their rows are revision 0
ALTER TABLE embedding_index ADD COLUMN IF NOT EXISTS revision INTEGER DEFAULT 0;
-- Size and SHA-256 of every file of a referenced shard (kind: ids | pooled | spatial), recorded with
-- the index rows that point at the shard and checked before the file is read. Shards indexed before
-- this table existed get their row from the next embeddings run.
CREATE TABLE IF NOT EXISTS embedding_shard_files (
    backbone    VARCHAR   NOT NULL,
    weights_tag VARCHAR   NOT NULL,
    shard       VARCHAR   NOT NULL,
    kind        VARCHAR   NOT NULL,
    bytes       BIGINT    NOT NULL,
    sha256      VARCHAR   NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (backbone, shard, kind)
);
-- Which weights the current features of a backbone came from (a random-init fallback is loud here).
CREATE TABLE IF NOT EXISTS embedding_provenance (
    backbone         VARCHAR PRIMARY KEY,
    weights_tag      VARCHAR   NOT NULL,
    weights_used     VARCHAR   NOT NULL,
    weights_warning  VARCHAR,
    pooled_node      VARCHAR   NOT NULL,
    pooled_dim       INTEGER,
    spatial_node     VARCHAR,
    spatial_regions  INTEGER,
    spatial_channels INTEGER,
    preprocessing    VARCHAR   NOT NULL,
    updated_at       TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS visual_clusters (
    backbone VARCHAR NOT NULL,
    item_id  BIGINT  NOT NULL,
    cluster  INTEGER NOT NULL,
    PRIMARY KEY (backbone, item_id)
);
