SELECT user_id, count(*) AS n FROM interactions GROUP BY user_id ORDER BY user_id;
