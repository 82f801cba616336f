-- Holdout users with an item both in the profile and in predict (must be none).
SELECT count(*) AS overlapping_users, coalesce(list(user_id ORDER BY user_id)[1:5], []) AS examples
FROM split_holdout
WHERE len(list_intersect(profile, predict)) > 0;
