-- Top-k recommendations per (model, user); rank is 1-based.
CREATE TABLE IF NOT EXISTS recommendations (
    model   VARCHAR NOT NULL,
    user_id BIGINT  NOT NULL,
    rank    INTEGER NOT NULL,
    item_id BIGINT  NOT NULL,
    score   DOUBLE
);
