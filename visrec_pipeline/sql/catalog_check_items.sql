-- Items of interactions that are missing from item_catalog (must be none).
SELECT count(*) AS missing_items, coalesce(list(item_id ORDER BY item_id)[1:5], []) AS examples
FROM (SELECT DISTINCT item_id FROM interactions WHERE item_id NOT IN (SELECT item_id FROM item_catalog));
