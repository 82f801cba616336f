-- The per-user last-N holdout of shared/spec/evaluation.md (run inside one transaction).
-- interactions is already deduplicated (latest row per pair). Within a user the rows
-- are ordered by ts, then item_id (the global order ts, item_id, user_id restricted to
-- one user); the last $n rows of a user with more than $n rows are evaluation rows.
-- With $use_given the input's evaluation column decides instead (NULL = training).
CREATE OR REPLACE TEMP TABLE split_marked AS
SELECT user_id, item_id, ts,
       CASE WHEN $use_given THEN coalesce(evaluation, false)
            ELSE n_user > $n AND from_end <= $n
       END AS is_evaluation
FROM (
    SELECT user_id, item_id, ts, evaluation,
           row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, item_id DESC) AS from_end,
           count(*) OVER (PARTITION BY user_id) AS n_user
    FROM interactions
);

CREATE OR REPLACE TABLE split_train AS
SELECT user_id, item_id, ts
FROM split_marked
WHERE NOT is_evaluation
ORDER BY ts, item_id, user_id;

-- profile = the user's training items in time order (oldest first; ties: item_id), so the most
-- recent ones can be taken (the tutorial protocol's last 10, max_profile_len); predict = the
-- evaluation items, ascending.
CREATE OR REPLACE TABLE split_holdout AS
SELECT user_id,
       coalesce(list(item_id ORDER BY ts, item_id) FILTER (WHERE NOT is_evaluation), []::BIGINT[]) AS profile,
       list(item_id ORDER BY item_id) FILTER (WHERE is_evaluation) AS predict
FROM split_marked
GROUP BY user_id
HAVING bool_or(is_evaluation)
ORDER BY user_id;

DROP TABLE split_marked;
