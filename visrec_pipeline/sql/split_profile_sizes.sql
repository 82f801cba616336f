SELECT user_id, len(profile) AS n FROM split_holdout ORDER BY user_id;
