-- Status counts over the whole catalogue; items never attempted count as 'pending'.
SELECT coalesce(i.status, 'pending') AS status, count(*) AS items
FROM item_catalog c
LEFT JOIN item_images i ON i.item_id = c.item_id
GROUP BY ALL
ORDER BY items DESC, status
