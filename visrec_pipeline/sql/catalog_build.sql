-- One row per item that has interactions, with items.csv metadata where listed
-- (registered as items_input). first_seen = the item's earliest interaction.
CREATE OR REPLACE TABLE item_catalog (
    item_id    BIGINT PRIMARY KEY,
    title      VARCHAR,
    creator    VARCHAR,
    url        VARCHAR,
    first_seen BIGINT NOT NULL
);

INSERT INTO item_catalog (item_id, title, creator, url, first_seen)
SELECT i.item_id,
       nullif(trim(m.title), ''),
       nullif(trim(m.creator), ''),
       nullif(trim(m.url), ''),
       least(i.first_ts, coalesce(r.first_ts, i.first_ts))
FROM (SELECT item_id, min(ts) AS first_ts FROM interactions GROUP BY item_id) i
LEFT JOIN (SELECT item_id, min(ts) AS first_ts FROM raw_interactions GROUP BY item_id) r USING (item_id)
LEFT JOIN items_input m USING (item_id)
ORDER BY i.item_id;
