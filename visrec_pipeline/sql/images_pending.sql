-- Every catalogued item with its current image row (NULLs when never attempted);
-- the sync decides in Python which ones need work (it also checks ok files still exist).
SELECT c.item_id, c.title, i.status, i.path, i.source
FROM item_catalog c
LEFT JOIN item_images i ON i.item_id = c.item_id
ORDER BY c.item_id
