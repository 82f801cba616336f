-- Rows of item_images by status, with one reason as an example.
SELECT status, count(*) AS items, any_value(reason) AS example_reason
FROM item_images
GROUP BY status
ORDER BY status
