-- Catalogued items, and of them those with an ok image.
SELECT count(*) AS catalogued, count(*) FILTER (WHERE i.status = 'ok') AS ok
FROM item_catalog c
LEFT JOIN item_images i ON i.item_id = c.item_id
