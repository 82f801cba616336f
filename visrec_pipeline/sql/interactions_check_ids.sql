-- Rows with a negative or missing id or timestamp (must be none).
SELECT count(*) FILTER (WHERE user_id IS NULL OR user_id < 0) AS bad_user_ids,
       count(*) FILTER (WHERE item_id IS NULL OR item_id < 0) AS bad_item_ids,
       count(*) FILTER (WHERE ts IS NULL OR ts < 0) AS bad_timestamps
FROM interactions;
