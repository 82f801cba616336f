"""``incoming_interactions``: one partition per interactions file delivered into ``incoming/``.

Dynamic partitions, not time windows: batches arrive when someone (or the
Commons poll) delivers a file, with no fixed period, so a time grid would be
mostly empty partitions or split one file over several. A partition is one
file, keyed by its safe name plus content hash (``ingest.incoming.batch_key``):
delivering the same bytes again is the same partition, and materializing a
partition replaces that batch in ``raw_interactions`` (never duplicates it).
"""

# No ``from __future__ import annotations``: Dagster resolves the annotations at definition time.

import dagster as dg
import pyarrow.compute as pc

from visrec_pipeline.defs.ingest import input_failure, shrink_refusal_as_failure
from visrec_pipeline.defs.resources import DUCKDB_POOL, VisrecDuckDB, VisrecSettings
from visrec_pipeline.ingest import InputFileError, batches_summary, read_interactions, write_batch
from visrec_pipeline.ingest.incoming import find_batch_file, items_file_for, key_hash
from visrec_pipeline.ingest.store import raw_counts

BATCHES = dg.DynamicPartitionsDefinition(name="incoming_batches")
INCOMING_ASSET = "incoming_interactions"
# visrec_all (one unpartitioned job over the whole graph) leaves out assets with this tag.
PARTITIONED_TAG = {"visrec/partitioned": "batch"}
CODE_VERSION = "1"


@dg.asset(
    name=INCOMING_ASSET,
    group_name="ingest",
    partitions_def=BATCHES,
    pool=DUCKDB_POOL,
    code_version=CODE_VERSION,
    kinds={"duckdb"},
    tags=PARTITIONED_TAG,
    description="One later batch of interactions: the file incoming/<name>.csv|.parquet (its new items' "
    "metadata in incoming/<name>_items.csv) validated and written as its own batch of raw_interactions. "
    "A file with any malformed row is rejected whole. Partitions are added by incoming_files_sensor.",
)
def incoming_interactions(
    context: dg.AssetExecutionContext, settings: VisrecSettings, duckdb: VisrecDuckDB
) -> dg.MaterializeResult:
    key = context.partition_key
    key_hash(key)  # refuse anything that is not a batch key before touching the file system
    incoming_dir = settings.workspace.incoming_dir
    found = find_batch_file(incoming_dir, key)
    if found is None:
        raise dg.Failure(
            description=f"no file in {incoming_dir} has the content of batch {key} any more "
            "(removed or changed since it was registered)",
            allow_retries=False,
        )
    try:
        batch = read_interactions(found.path, file=found.source_file, future_tolerance_s=settings.future_tolerance_s)
    except InputFileError as exc:
        lead = f"batch {found.source_file} rejected whole, nothing written (earlier batches are untouched):"
        raise input_failure(exc, lead=lead) from exc
    with shrink_refusal_as_failure(), duckdb.get_connection() as conn:
        write_batch(conn, key, batch, source_file=found.source_file, shrink_policy=settings.shrink_policy)
        batches = batches_summary(conn)
        counts = raw_counts(conn)
    items_file = items_file_for(found.path)
    context.log.info(f"{found.source_file}: {batch.n_rows} rows written as batch {key}")
    return dg.MaterializeResult(
        metadata={
            "source_file": dg.MetadataValue.path(str(found.path)),
            "sha256": batch.sha256,
            "rows_loaded": batch.n_rows,
            "users": pc.count_distinct(batch.rows.column("user_id")).as_py(),
            "items": pc.count_distinct(batch.rows.column("item_id")).as_py(),
            "items_file": f"incoming/{items_file.name}" if items_file.is_file() else "none",
            "has_evaluation_column": batch.has_evaluation,
            "batches": len(batches),
            "raw_rows_total": counts["raw_rows_total"],
            "dagster/row_count": batch.n_rows,
        },
        # the content decides the version: the same bytes again are not a change
        data_version=dg.DataVersion(batch.sha256[:16]),
    )


defs = dg.Definitions(assets=[incoming_interactions])
