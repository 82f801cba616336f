"""The result tables ``evaluation_rows``, ``evaluation_summary`` and ``recommendations`` (no dagster).

Every read and write of these tables goes through this module; their DDL is in ``sql/``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import duckdb
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.recsys.evaluate import EvalResult

# evaluation_rows' columns, in table order
_ROW_COLUMNS = ["model", "protocol", "user_id", "profile_size", "n_relevant", "n_candidates", "has_cold", "metric", "value"]


def write_evaluation(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    result: EvalResult,
    *,
    train_seconds: float,
    other_seeds: Sequence[tuple[int, EvalResult, float]] = (),
) -> None:
    """Replace this model's rows under the protocol in ``evaluation_rows`` (long format, of ``result``:
    seed 0) and ``evaluation_summary`` (the means of seed 0 and of each ``(seed, result, train_seconds)``
    of ``other_seeds``), in one transaction."""
    db.run_sql(conn, "evaluation_tables")
    rows = result.per_row
    id_cols = [c for c in ("user_id", "profile_size", "n_relevant", "n_candidates", "has_cold") if c in rows]
    metric_cols = [c for c in rows.columns if c not in id_cols and c != "row"]
    long = rows.melt(id_vars=id_cols, value_vars=metric_cols, var_name="metric", value_name="value")
    long.insert(0, "model", name)
    long.insert(1, "protocol", result.protocol)
    for col in ("profile_size", "n_relevant", "n_candidates"):
        if col not in long:
            long[col] = -1
    if "has_cold" not in long:
        long["has_cold"] = False
    long = long[_ROW_COLUMNS]
    summary = []
    for seed, res, secs in [(0, result, train_seconds), *other_seeds]:
        if res.protocol != result.protocol:
            raise ValueError(f"{name}: seed {seed} was evaluated under {res.protocol!r}, seed 0 under {result.protocol!r}")
        summary += [
            (name, res.protocol, key, float(value), len(res.per_row), secs, int(seed))
            for key, value in res.means.items()
            if isinstance(value, (int, float))
        ]
    with db.transaction(conn):
        conn.execute("DELETE FROM evaluation_rows WHERE model = ? AND protocol = ?", [name, result.protocol])
        conn.execute("DELETE FROM evaluation_summary WHERE model = ? AND protocol = ?", [name, result.protocol])
        conn.register("eval_long", long)
        conn.execute("INSERT INTO evaluation_rows SELECT * FROM eval_long")
        conn.unregister("eval_long")
        conn.executemany(
            "INSERT INTO evaluation_summary (model, protocol, metric, value, n_rows, train_seconds, seed, evaluated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            summary,
        )


def evaluation_summary(conn: duckdb.DuckDBPyConnection, protocol: str) -> pd.DataFrame:
    """``model, seed, metric, value, train_seconds`` of every evaluated model and seed under ``protocol``."""
    # a table no evaluation has written to since seeds came holds seed 0 only (the next write migrates it)
    has_seed = conn.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'evaluation_summary' AND column_name = 'seed'"
    ).fetchall()[0][0]
    seed = "seed" if has_seed else "0 AS seed"
    return conn.execute(
        f"SELECT model, {seed}, metric, value, train_seconds FROM evaluation_summary WHERE protocol = ? "
        "ORDER BY model, seed, metric",
        [protocol],
    ).df()


def evaluation_rows(conn: duckdb.DuckDBPyConnection, protocol: str, metrics: list[str]) -> pd.DataFrame:
    """``model, user_id, profile_size, metric, value`` per holdout row, for ``metrics`` under ``protocol``."""
    return conn.execute(
        "SELECT model, user_id, profile_size, metric, value FROM evaluation_rows WHERE protocol = ? AND metric IN "
        "(SELECT unnest(?::VARCHAR[]))",
        [protocol, list(metrics)],
    ).df()


def replace_recommendations(
    conn: duckdb.DuckDBPyConnection, recs: pd.DataFrame, failures: Mapping[str, str] | None = None
) -> None:
    """Make ``recommendations`` hold exactly ``recs`` (columns model, user_id, rank, item_id, score) and
    ``recommendation_failures`` exactly ``failures`` (model -> why it could not recommend)."""
    db.run_sql(conn, "recommendations_table")
    with db.transaction(conn):
        conn.execute("DELETE FROM recommendations")
        conn.register("recs_df", recs)
        conn.execute("INSERT INTO recommendations SELECT model, user_id, rank, item_id, score FROM recs_df")
        conn.unregister("recs_df")
        conn.execute("DELETE FROM recommendation_failures")
        if failures:
            conn.executemany(
                "INSERT INTO recommendation_failures VALUES (?, ?, now())", sorted(dict(failures).items())
            )


def recommendation_failures(conn: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """model -> why the last recommendations run could not recommend with it (empty when none failed)."""
    if not db.table_exists(conn, "recommendation_failures"):
        return {}
    return dict(conn.execute("SELECT model, reason FROM recommendation_failures ORDER BY model").fetchall())


def has_recommendations(conn: duckdb.DuckDBPyConnection) -> bool:
    return db.table_exists(conn, "recommendations")


def top_recommendations(conn: duckdb.DuckDBPyConnection, model: str, max_rank: int) -> pd.DataFrame:
    """``user_id, item_id`` of ``model``'s stored recommendations up to ``max_rank``, by user then rank."""
    return conn.execute(
        "SELECT user_id, item_id FROM recommendations WHERE model = ? AND rank <= ? ORDER BY user_id, rank",
        [model, max_rank],
    ).df()
