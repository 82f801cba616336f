SELECT (SELECT count(*) FROM split_train) AS train_rows,
       (SELECT count(DISTINCT user_id) FROM split_train) AS train_users,
       (SELECT count(*) FROM split_holdout) AS holdout_users,
       (SELECT coalesce(sum(len(predict)), 0) FROM split_holdout) AS predict_items,
       (SELECT count(DISTINCT user_id) FROM interactions) AS users,
       (SELECT count(*) FROM interactions) AS interactions,
       (SELECT count(evaluation) FROM interactions) AS rows_with_evaluation_flag;
