"""The DuckDB table ``item_images``: its schema, the upsert of one chunk, and the reads of the assets.

One row per catalogued item whose image has been attempted (see ``sql/images_table.sql``).
"""

from __future__ import annotations

from typing import Sequence

import duckdb
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.images.worker import ItemImageRow


def ensure_table(conn: duckdb.DuckDBPyConnection) -> None:
    db.run_sql(conn, "images_table")


def require_table(conn: duckdb.DuckDBPyConnection) -> None:
    """Fail clearly when the item_images asset never ran."""
    if not db.table_exists(conn, "item_images"):
        raise RuntimeError("table item_images does not exist: materialize the item_images asset first")


def upsert_rows(conn: duckdb.DuckDBPyConnection, rows: Sequence[ItemImageRow]) -> None:
    """Insert or replace ``rows`` (unique item ids) in one statement; call inside a transaction."""
    if not rows:
        return
    frame = pd.DataFrame(
        {
            "item_id": pd.array([r.item_id for r in rows], dtype="int64"),
            "status": [r.status for r in rows],
            "reason": [r.reason or "" for r in rows],
            "content_hash": pd.array([r.content_hash for r in rows], dtype="string"),
            "path": pd.array([r.path for r in rows], dtype="string"),
            "orig_width": pd.array([r.orig_width for r in rows], dtype="Int32"),
            "orig_height": pd.array([r.orig_height for r in rows], dtype="Int32"),
            "source": [r.source for r in rows],
        }
    )
    if frame["item_id"].duplicated().any():
        raise ValueError("duplicate item ids in one chunk of item_images rows")
    conn.register("_item_image_rows", frame)
    try:
        db.run_sql(conn, "images_upsert")
    finally:
        conn.unregister("_item_image_rows")


def catalogue_with_images(conn: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """``item_id, title, status, path, source`` of every catalogued item (NULLs: never attempted)."""
    return db.query_df(conn, "images_pending")


def catalogue_status_summary(conn: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """``status, items`` over the whole catalogue; items never attempted count as ``pending``."""
    return db.query_df(conn, "images_summary")


def status_counts(conn: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """``status, items, example_reason`` over the rows of item_images, by status."""
    return db.query_df(conn, "images_status_counts")


def recent_failures(conn: duckdb.DuckDBPyConnection, limit: int) -> pd.DataFrame:
    """``item_id, status, reason, source`` of the last ``limit`` rows that are not ok."""
    return db.query_df(conn, "images_recent_failures", {"limit": limit})


def catalogued_and_ok(conn: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """(catalogued items, of them with an ok image)."""
    row = db.query_one(conn, "images_ok_share")
    return row["catalogued"], row["ok"]


def row_count(conn: duckdb.DuckDBPyConnection) -> int:
    return int(conn.execute("SELECT count(*) FROM item_images").fetchone()[0])


def ok_count(conn: duckdb.DuckDBPyConnection) -> int:
    return conn.execute("SELECT count(*) FROM item_images WHERE status = 'ok'").fetchone()[0]


def ok_paths(conn: duckdb.DuckDBPyConnection) -> list[tuple[int, str]]:
    """``(item_id, thumbnail path relative to the workspace root)`` of every ok image."""
    return conn.execute("SELECT item_id, path FROM item_images WHERE status = 'ok'").fetchall()


def ok_files(conn: duckdb.DuckDBPyConnection) -> list[tuple[int, str, str]]:
    """``(item_id, content_hash, path)`` of every ok image."""
    return conn.execute("SELECT item_id, content_hash, path FROM item_images WHERE status = 'ok'").fetchall()


def ok_hashes(conn: duckdb.DuckDBPyConnection, limit: int) -> list[tuple[int, str]]:
    """``(item_id, content_hash)`` of the first ``limit`` ok images by item id."""
    rows = conn.execute(
        "SELECT item_id, content_hash FROM item_images WHERE status = 'ok' ORDER BY item_id LIMIT ?", [limit]
    ).fetchall()
    return [(int(i), h) for i, h in rows]
