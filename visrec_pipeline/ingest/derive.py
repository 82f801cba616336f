"""Derived tables: deduplicated ``interactions``, ``item_catalog`` and the train/holdout split.

Each builder rewrites its table(s) from SQL in ``visrec_pipeline/sql/`` inside one
transaction and returns a summary for metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from visrec_pipeline import db
from visrec_pipeline.db import query_df, query_one, run_sql
from visrec_pipeline.ingest.items_file import empty_items
from visrec_pipeline.ingest.summary import distribution, sparsity


def build_interactions(conn: duckdb.DuckDBPyConnection) -> dict:
    """``interactions`` from ``raw_interactions``: one row per (user, item), the latest kept."""
    with db.transaction(conn):
        run_sql(conn, "interactions_build")
    return interactions_summary(conn)


def interactions_summary(conn: duckdb.DuckDBPyConnection) -> dict:
    stats = query_one(conn, "interactions_stats")
    per_user = query_df(conn, "interactions_per_user")["n"].to_numpy(np.int64)
    stats["duplicates_removed"] = int(stats["raw_rows"]) - int(stats["interactions"])
    stats["sparsity"] = sparsity(int(stats["interactions"]), int(stats["users"]), int(stats["items"]))
    stats["per_user"] = distribution(per_user)
    return stats


def build_catalog(conn: duckdb.DuckDBPyConnection, items: pa.Table | None) -> dict:
    """``item_catalog``: every item of ``interactions``, enriched from ``items`` (``items.csv``) if given."""
    conn.register("items_input", items if items is not None else empty_items())
    try:
        with db.transaction(conn):
            run_sql(conn, "catalog_build")
        stats = query_one(conn, "catalog_stats")
    finally:
        conn.unregister("items_input")
    stats["items_csv"] = items is not None
    return stats


@dataclass(frozen=True)
class SplitMode:
    use_given: bool  # the input's evaluation column decides
    holdout_per_user: int

    @property
    def description(self) -> str:
        if self.use_given:
            return "evaluation column of the input (rows without a flag are training rows)"
        return f"per-user last-{self.holdout_per_user} holdout (ties: item_id, then user_id)"


def split_mode(conn: duckdb.DuckDBPyConnection, holdout_per_user: int, recompute_evaluation: bool) -> SplitMode:
    """Use the input's evaluation column when it has one (any flagged row), unless asked to recompute."""
    if holdout_per_user < 1:
        raise ValueError(f"holdout_per_user must be at least 1, got {holdout_per_user}")
    flagged = query_one(conn, "split_flagged_rows")["flagged"]
    return SplitMode(bool(flagged) and not recompute_evaluation, holdout_per_user)


def build_split(
    conn: duckdb.DuckDBPyConnection, *, holdout_per_user: int = 1, recompute_evaluation: bool = False
) -> dict:
    """``split_train`` and ``split_holdout`` from ``interactions`` (``shared/spec/evaluation.md``)."""
    mode = split_mode(conn, holdout_per_user, recompute_evaluation)
    with db.transaction(conn):
        run_sql(conn, "split_build", {"use_given": mode.use_given, "n": mode.holdout_per_user})
    stats = query_one(conn, "split_stats")
    profile_sizes = query_df(conn, "split_profile_sizes")["n"].to_numpy(np.int64)
    users = int(stats["users"])
    stats["mode"] = mode.description
    stats["use_given_evaluation"] = mode.use_given
    stats["holdout_per_user"] = mode.holdout_per_user
    stats["share_users_with_holdout"] = int(stats["holdout_users"]) / users if users else 0.0
    stats["profile_size"] = distribution(profile_sizes)
    return stats


# The content each ingest asset writes; a fingerprint changes exactly when that content does.
_FINGERPRINTS = {
    "raw_interactions": (("raw_interactions", "user_id, item_id, ts, evaluation, batch_id, source_line"),),
    "interactions": (("interactions", "user_id, item_id, ts, evaluation"),),
    "item_catalog": (("item_catalog", "item_id, title, creator, url, first_seen"),),
    "split": (("split_train", "user_id, item_id, ts"), ("split_holdout", "user_id, profile, predict")),
}


def fingerprint(conn: duckdb.DuckDBPyConnection, asset: str) -> str:
    """Order-independent content hash of the table(s) behind ``asset`` (a Dagster data version)."""
    parts = []
    for table, columns in _FINGERPRINTS[asset]:
        # table and columns are the constants above, never user input
        n, h = conn.execute(f"SELECT count(*), coalesce(sum(hash({columns})), 0) FROM {table}").fetchall()[0]
        parts.append(f"{table}:{n}:{h}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
