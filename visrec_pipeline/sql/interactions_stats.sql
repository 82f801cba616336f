SELECT count(*) AS interactions,
       count(DISTINCT user_id) AS users,
       count(DISTINCT item_id) AS items,
       min(ts) AS first_ts,
       max(ts) AS last_ts,
       count(*) FILTER (WHERE evaluation) AS evaluation_true,
       count(*) FILTER (WHERE NOT evaluation) AS evaluation_false,
       count(*) FILTER (WHERE evaluation IS NULL) AS evaluation_null,
       (SELECT count(*) FROM raw_interactions) AS raw_rows
FROM interactions;
