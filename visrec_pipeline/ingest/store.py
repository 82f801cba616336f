"""Write validated interaction batches into DuckDB (``raw_interactions`` and friends).

A batch is one input file: the dataset's initial file is batch ``initial``,
each later file (e.g. from ``incoming/``) gets its own id. Writing a batch
deletes whatever that batch wrote before and inserts the new rows in one
transaction, so a re-run never duplicates and a failure or a kill mid-way
leaves the previous state. A batch with no rows, or one that would shrink
``raw_interactions`` by more than the policy's share, is refused unless the
policy allows shrinking (``shrink_guard.py``).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from visrec_pipeline import db
from visrec_pipeline.db import query_df, query_one, run_sql
from visrec_pipeline.ingest.interactions_file import InteractionBatch, read_interactions
from visrec_pipeline.ingest.shrink_guard import ShrinkPolicy, check_batch_size

INITIAL_BATCH = "initial"

REJECTS_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("column_name", pa.string()),
        ("value", pa.string()),
        ("reason", pa.string()),
    ]
)


def ensure_tables(conn: duckdb.DuckDBPyConnection) -> None:
    run_sql(conn, "ingest_tables")


def _rejects_table(batch: InteractionBatch) -> pa.Table:
    return pa.Table.from_pylist(
        [{"line": p.position, "column_name": p.column, "value": p.value, "reason": p.message} for p in batch.rejects],
        schema=REJECTS_SCHEMA,
    )


def write_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    batch: InteractionBatch,
    *,
    source_file: str | None = None,
    shrink_policy: ShrinkPolicy = ShrinkPolicy(),
) -> None:
    """Replace batch ``batch_id`` with ``batch`` in one transaction (``BatchShrinkRefused``, nothing
    written, when ``shrink_policy`` does not allow what that does to the row count)."""
    if not batch_id:
        raise ValueError("batch_id must be a non-empty string")
    ensure_tables(conn)
    params = {
        "batch_id": batch_id,
        "source_file": source_file or batch.file,
        "sha256": batch.sha256,
        "n_read": batch.n_read,
        "n_rows": batch.n_rows,
        "n_rejected": batch.n_rejected_rows,
        "has_evaluation": batch.has_evaluation,
    }
    conn.register("batch_rows", batch.rows)
    conn.register("batch_rejects", _rejects_table(batch))
    try:
        with db.transaction(conn):
            sizes = query_one(conn, "ingest_batch_sizes", {"batch_id": batch_id})
            check_batch_size(batch, batch_id, params["source_file"], **sizes, policy=shrink_policy)
            run_sql(conn, "ingest_write_batch", params)
    finally:
        conn.unregister("batch_rows")
        conn.unregister("batch_rejects")


def ingest_batch(
    conn: duckdb.DuckDBPyConnection,
    batch_id: str,
    path: str | Path,
    *,
    quarantine: bool = False,
    source_file: str | None = None,
    shrink_policy: ShrinkPolicy = ShrinkPolicy(),
) -> InteractionBatch:
    """Validate ``path`` and replace batch ``batch_id`` with its rows.

    ``source_file`` (default: the file name) names the file in messages and in
    ``raw_interactions.source_file``, e.g. ``incoming/2021-06.csv``. Raises
    ``InputFileError`` (nothing written) when the file has bad rows and
    ``quarantine`` is off, ``BatchShrinkRefused`` (nothing written) when it
    has no rows or shrinks the data more than ``shrink_policy`` allows.
    Callers that hold ``conn`` should prefer ``read_interactions`` with the
    connection closed, then ``write_batch``.
    """
    batch = read_interactions(path, file=source_file, quarantine=quarantine)
    write_batch(conn, batch_id, batch, source_file=source_file, shrink_policy=shrink_policy)
    return batch


def batches_summary(conn: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    return query_df(conn, "ingest_batches_summary")


def raw_counts(conn: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return {k: int(v) for k, v in query_one(conn, "ingest_counts").items()}


def catalog_item_count(conn: duckdb.DuckDBPyConnection) -> int:
    """Items in ``item_catalog`` now (0 before its first build): the catalogue's growth per refresh."""
    if not db.table_exists(conn, "item_catalog"):
        return 0
    return int(conn.execute("SELECT count(*) FROM item_catalog").fetchall()[0][0])
