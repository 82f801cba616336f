SELECT count(*) AS items,
       count(title) AS with_title,
       count(creator) AS with_creator,
       count(url) AS with_url,
       count(DISTINCT creator) AS creators,
       (SELECT count(*) FROM items_input) AS items_csv_rows,
       (SELECT count(*) FROM items_input WHERE item_id NOT IN (SELECT item_id FROM item_catalog))
           AS items_csv_without_interactions,
       count(*) FILTER (WHERE item_id NOT IN (SELECT item_id FROM items_input)) AS items_not_in_items_csv
FROM item_catalog;
