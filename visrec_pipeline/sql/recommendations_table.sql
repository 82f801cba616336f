-- Top-k recommendations per (model, user); rank is 1-based.
CREATE TABLE IF NOT EXISTS recommendations (
    model   VARCHAR NOT NULL,
    user_id BIGINT  NOT NULL,
    rank    INTEGER NOT NULL,
    item_id BIGINT  NOT NULL,
    score   DOUBLE
);
-- Models the last recommendations run could not recommend with (missing or damaged checkpoint,
-- error while scoring), replaced with the recommendations.
CREATE TABLE IF NOT EXISTS recommendation_failures (
    model       VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    recorded_at TIMESTAMP
);
