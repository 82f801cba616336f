"""The SQL split (and dedup) against a plain pandas reference of shared/spec/evaluation.md, on random data."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from visrec_pipeline.ingest import build_interactions, build_split, ingest_batch
from visrec_pipeline.ingest.checks import split_checks


def reference_dedup(raw: pd.DataFrame) -> pd.DataFrame:
    """Latest row per (user, item); equal timestamps: later batch, then later line."""
    ordered = raw.sort_values(["user_id", "item_id", "ts", "batch_seq", "line"], kind="stable")
    return ordered.drop_duplicates(["user_id", "item_id"], keep="last")


def reference_split(raw: pd.DataFrame, n: int, recompute: bool) -> tuple[list[tuple], list[tuple]]:
    d = reference_dedup(raw).sort_values(["ts", "item_id", "user_id"], kind="stable").reset_index(drop=True)
    if d["evaluation"].notna().any() and not recompute:
        is_eval = d["evaluation"].fillna(False).astype(bool)
    else:
        from_end = d.groupby("user_id").cumcount(ascending=False)
        size = d.groupby("user_id")["item_id"].transform("size")
        is_eval = (size > n) & (from_end < n)
    train = d.loc[~is_eval, ["user_id", "item_id", "ts"]]
    holdout = []
    for user, rows in d.groupby("user_id"):
        mask = is_eval[rows.index]
        if mask.any():
            profile = rows.loc[~mask, "item_id"].tolist()  # time order (d is sorted by ts, item_id)
            predict = sorted(rows.loc[mask, "item_id"].tolist())
            holdout.append((int(user), profile, predict))
    train_rows = sorted(map(tuple, train.astype("int64").to_numpy().tolist()))
    return train_rows, holdout


def random_batches(seed: int, with_evaluation: bool) -> list[pd.DataFrame]:
    """Two batches with many timestamp ties and repeated (user, item) pairs within and across batches."""
    rng = np.random.default_rng(seed)
    batches = []
    for size in (500, 120):
        df = pd.DataFrame(
            {
                "user_id": rng.integers(0, 40, size),
                "item_id": rng.integers(0, 30, size) * 7,  # ids not contiguous
                "timestamp": rng.integers(1_000, 1_030, size),  # few distinct values -> ties
            }
        )
        if with_evaluation:
            df["evaluation"] = rng.random(size) < 0.15
        batches.append(df)
    return batches


def load(conn, tmp_path, batches: list[pd.DataFrame]) -> pd.DataFrame:
    """Ingest the batches through files (as the pipeline does); return them as one reference frame."""
    frames = []
    for seq, df in enumerate(batches):
        path = tmp_path / f"batch{seq}.csv"
        df.to_csv(path, index=False)
        ingest_batch(conn, "initial" if seq == 0 else f"b{seq}", path)
        frames.append(
            df.rename(columns={"timestamp": "ts"}).assign(
                batch_seq=seq, line=np.arange(len(df)) + 2, evaluation=df.get("evaluation")
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("with_evaluation, recompute", [(False, False), (True, False), (True, True)])
def test_sql_split_equals_reference(tmp_path, seed, n, with_evaluation, recompute):
    raw_batches = random_batches(seed * 10 + n, with_evaluation)
    with duckdb.connect() as conn:
        raw = load(conn, tmp_path, raw_batches)
        build_interactions(conn)
        stats = build_split(conn, holdout_per_user=n, recompute_evaluation=recompute)
        train = sorted(conn.execute("SELECT user_id, item_id, ts FROM split_train").fetchall())
        holdout = conn.execute("SELECT user_id, profile, predict FROM split_holdout ORDER BY user_id").fetchall()
        interactions = conn.execute(
            "SELECT user_id, item_id, ts, evaluation FROM interactions ORDER BY user_id, item_id"
        ).df()
        outcomes = split_checks(conn, stats["share_users_with_holdout"])

    expected_train, expected_holdout = reference_split(raw, n, recompute)
    assert train == expected_train
    assert holdout == expected_holdout
    assert stats["use_given_evaluation"] == (with_evaluation and not recompute)

    dedup = reference_dedup(raw).sort_values(["user_id", "item_id"])
    assert interactions[["user_id", "item_id", "ts"]].to_numpy().tolist() == (
        dedup[["user_id", "item_id", "ts"]].to_numpy().tolist()
    )
    if with_evaluation:
        assert interactions["evaluation"].tolist() == dedup["evaluation"].tolist()

    failed = [o.check.name for o in outcomes if not o.passed and o.check.severity == "ERROR"]
    if not (with_evaluation and not recompute):
        assert failed == []  # given flags may leave a user with an empty profile; computed ones never


def test_users_with_n_or_fewer_interactions_are_training_only(tmp_path):
    df = pd.DataFrame({"user_id": [1, 1, 2, 2, 2], "item_id": [5, 6, 5, 6, 7], "timestamp": [1, 2, 1, 2, 3]})
    with duckdb.connect() as conn:
        load(conn, tmp_path, [df])
        build_interactions(conn)
        build_split(conn, holdout_per_user=2)
        assert conn.execute("SELECT * FROM split_holdout").fetchall() == [(2, [5], [6, 7])]
        assert conn.execute("SELECT count(*) FROM split_train WHERE user_id = 1").fetchone() == (2,)


def test_ties_are_broken_by_item_id(tmp_path):
    df = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [30, 10, 20], "timestamp": [5, 5, 5]})
    with duckdb.connect() as conn:
        load(conn, tmp_path, [df])
        build_interactions(conn)
        build_split(conn)
        assert conn.execute("SELECT * FROM split_holdout").fetchall() == [(1, [10, 20], [30])]
        assert conn.execute("SELECT item_id FROM split_train").fetchall() == [(10,), (20,)]


def test_holdout_per_user_must_be_positive(tmp_path):
    df = pd.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [1]})
    with duckdb.connect() as conn:
        load(conn, tmp_path, [df])
        build_interactions(conn)
        with pytest.raises(ValueError, match="holdout_per_user must be at least 1, got 0"):
            build_split(conn, holdout_per_user=0)
