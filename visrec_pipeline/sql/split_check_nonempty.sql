-- Holdout users with an empty profile or an empty predict list (must be none).
SELECT count(*) FILTER (WHERE len(profile) = 0) AS empty_profiles,
       count(*) FILTER (WHERE predict IS NULL OR len(predict) = 0) AS empty_predicts,
       coalesce(list(user_id ORDER BY user_id) FILTER (WHERE len(profile) = 0 OR predict IS NULL
                                                       OR len(predict) = 0)[1:5], []) AS examples
FROM split_holdout;
