-- Upsert one committed chunk of results from the registered relation _item_image_rows.
INSERT OR REPLACE INTO item_images
SELECT item_id, status, reason, content_hash, path, orig_width, orig_height, source, now()::TIMESTAMP
FROM _item_image_rows
