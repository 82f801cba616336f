-- The last $limit rows that are not ok, newest first.
SELECT item_id, status, reason, source
FROM item_images
WHERE status <> 'ok'
ORDER BY updated_at DESC, item_id
LIMIT $limit
