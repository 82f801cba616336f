-- train ∪ predict must be exactly interactions (as a multiset of pairs), and each
-- profile must be exactly that user's training items, in time order (ties: item_id).
WITH parts AS (
    SELECT user_id, item_id FROM split_train
    UNION ALL
    SELECT user_id, unnest(predict) AS item_id FROM split_holdout
),
missing AS (SELECT user_id, item_id FROM interactions EXCEPT ALL SELECT user_id, item_id FROM parts),
extra AS (SELECT user_id, item_id FROM parts EXCEPT ALL SELECT user_id, item_id FROM interactions),
train_lists AS (
    SELECT user_id, list(item_id ORDER BY ts, item_id) AS items FROM split_train GROUP BY user_id
),
wrong_profiles AS (
    SELECT h.user_id
    FROM split_holdout h LEFT JOIN train_lists t USING (user_id)
    WHERE h.profile IS DISTINCT FROM coalesce(t.items, []::BIGINT[])
)
SELECT (SELECT count(*) FROM missing) AS missing_pairs,
       (SELECT count(*) FROM extra) AS extra_pairs,
       (SELECT count(*) FROM wrong_profiles) AS wrong_profiles;
