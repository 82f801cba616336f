"""The DuckDB table ``triple_sets``: one row per training triple set (the random sampler's spec or
the guided triples file), written by the triples assets and read for a model's lineage."""

from __future__ import annotations

import duckdb

from visrec_pipeline import db


def ensure_table(conn: duckdb.DuckDBPyConnection) -> None:
    db.run_sql(conn, "triple_sets_table")


def record(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    *,
    seed: int,
    n_users: int,
    n_items: int,
    n_positives: int,
    triples_per_epoch: int,
    file: str | None = None,
) -> None:
    """Replace the row of triple set ``name`` in one transaction."""
    ensure_table(conn)
    with db.transaction(conn):
        conn.execute("DELETE FROM triple_sets WHERE name = ?", [name])
        conn.execute(
            "INSERT INTO triple_sets VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [name, seed, n_users, n_items, n_positives, triples_per_epoch, file],
        )


def read(conn: duckdb.DuckDBPyConnection, name: str) -> tuple | None:
    """``(seed, n_users, n_items, n_positives, triples_per_epoch, file, created_at as ISO text)`` of
    triple set ``name``; None when it was never recorded."""
    if not db.table_exists(conn, "triple_sets"):
        return None
    rows = conn.execute(
        "SELECT seed, n_users, n_items, n_positives, triples_per_epoch, file, strftime(created_at, '%Y-%m-%dT%H:%M:%S') "
        "FROM triple_sets WHERE name = ?",
        [name],
    ).fetchall()
    return rows[0] if rows else None
