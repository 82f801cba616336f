-- Rows of interactions that carry an evaluation flag from the input.
SELECT count(evaluation) AS flagged FROM interactions;
