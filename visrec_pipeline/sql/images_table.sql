-- One row per catalogued item whose image has been attempted (item_images asset).
-- status: ok | missing | corrupt | too_large | http_error; reason says why in words.
-- path: the thumbnail, relative to the workspace root (images/<hash[:2]>/<hash>.jpg), NULL unless ok.
-- orig_width/orig_height: the source image's size when known (also for some failures).
CREATE TABLE IF NOT EXISTS item_images (
    item_id      BIGINT PRIMARY KEY,
    status       VARCHAR NOT NULL CHECK (status IN ('ok', 'missing', 'corrupt', 'too_large', 'http_error')),
    reason       VARCHAR NOT NULL,
    content_hash VARCHAR CHECK (content_hash IS NULL OR length(content_hash) = 64),
    path         VARCHAR,
    orig_width   INTEGER,
    orig_height  INTEGER,
    source       VARCHAR NOT NULL,
    updated_at   TIMESTAMP NOT NULL,
    CHECK ((status = 'ok') = (content_hash IS NOT NULL AND path IS NOT NULL))
);
