"""Reading, validating and storing interaction files; derived tables and their checks (no dagster).

Typical use (what the ``raw_interactions`` asset and an incremental refresh do)::

    batch = read_interactions(path, file="incoming/2021-06.csv")   # no DB connection held
    with db.connect(ws.db_path) as conn:
        write_batch(conn, "2021-06", batch)                      # replaces that batch atomically
        build_interactions(conn); build_catalog(conn, items); build_split(conn)
"""

from visrec_pipeline.ingest.derive import build_catalog, build_interactions, build_split, interactions_summary
from visrec_pipeline.ingest.errors import InputFileError, Problem
from visrec_pipeline.ingest.interactions_file import (
    InteractionBatch,
    find_interactions_file,
    read_interactions,
)
from visrec_pipeline.ingest.items_file import read_dataset_items, read_items
from visrec_pipeline.ingest.store import INITIAL_BATCH, batches_summary, ensure_tables, ingest_batch, write_batch

__all__ = [
    "INITIAL_BATCH",
    "InputFileError",
    "InteractionBatch",
    "Problem",
    "batches_summary",
    "build_catalog",
    "build_interactions",
    "build_split",
    "ensure_tables",
    "find_interactions_file",
    "ingest_batch",
    "interactions_summary",
    "read_dataset_items",
    "read_interactions",
    "read_items",
    "write_batch",
]
