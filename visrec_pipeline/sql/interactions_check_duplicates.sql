-- (user_id, item_id) pairs that occur more than once (must be none).
SELECT count(*) AS duplicate_pairs,
       coalesce(list(user_id || ':' || item_id ORDER BY user_id, item_id)[1:5], []) AS examples
FROM (SELECT user_id, item_id FROM interactions GROUP BY user_id, item_id HAVING count(*) > 1);
