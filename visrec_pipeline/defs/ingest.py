"""Ingest assets: raw_interactions -> interactions -> item_catalog and split, with their checks.

Thin layer over ``visrec_pipeline.ingest``: files are read and validated with
no database connection held, then one short connection writes (in a
transaction), runs the checks and collects metadata.
"""

# No ``from __future__ import annotations`` here: Dagster resolves the Config and
# resource annotations of asset functions at definition time.

from contextlib import contextmanager
from typing import Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from visrec_pipeline.defs.automation import data_side
from visrec_pipeline.defs.resources import (
    ALLOW_SHRINKING_ENV,
    DUCKDB_POOL,
    MAX_SHRINK_SHARE_ENV,
    VisrecDuckDB,
    VisrecSettings,
)
from visrec_pipeline.ingest import (
    INITIAL_BATCH,
    InputFileError,
    batches_summary,
    build_catalog,
    build_interactions,
    build_split,
    find_interactions_file,
    read_interactions,
    write_batch,
)
from visrec_pipeline.ingest.checks import (
    CheckOutcome,
    catalog_checks,
    checks_for,
    interactions_checks,
    rejected_rows_check,
    split_checks,
)
from visrec_pipeline.ingest.derive import fingerprint
from visrec_pipeline.ingest.errors import DatasetFolderError
from visrec_pipeline.ingest.incoming import read_catalog_items
from visrec_pipeline.ingest.shrink_guard import BatchShrinkRefused
from visrec_pipeline.ingest.store import catalog_item_count, raw_counts
from visrec_pipeline.ingest.summary import distribution_markdown, markdown_table

GROUP = "ingest"
CODE_VERSION = "1"
# Later batches (incoming/, one partition per file) feed interactions next to the initial file.
INCOMING = dg.AssetKey("incoming_interactions")
_SHOWN_PROBLEMS = 20

SHRINK_HINT = (
    "If that is intended, set allow_shrinking: true on the settings resource (launchpad: resources -> settings; "
    f"default from {ALLOW_SHRINKING_ENV}=1) and run again; max_shrink_share ({MAX_SHRINK_SHARE_ENV}, default 0.5) "
    "sets how much one batch may remove without it."
)

QUARANTINE_HINT = (
    "Fix the file, or materialize raw_interactions with config quarantine_bad_rows: true to keep the good "
    "rows and record the bad ones in the table raw_interaction_rejects."
)


def _check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(c.name, asset=asset, description=c.description, blocking=c.severity == "ERROR")
        for c in checks_for(asset)
    ]


def _check_results(outcomes: list[CheckOutcome]) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(
            check_name=o.check.name,
            passed=bool(o.passed),
            severity=dg.AssetCheckSeverity[o.check.severity],
            metadata=o.metadata,
            description=o.check.description,
        )
        for o in outcomes
    ]


def _table_md(df: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(list(df.columns), df.itertuples(index=False, name=None)))


def _problems_md(problems) -> dg.MetadataValue:
    rows = [(p.file, p.unit, p.position, p.column, p.message) for p in problems[:_SHOWN_PROBLEMS]]
    return dg.MetadataValue.md(markdown_table(["file", "unit", "position", "column", "problem"], rows))


def input_failure(exc: Exception, hint: str = "", *, lead: str = "") -> dg.Failure:
    """A step failure whose message names the file, line and column of the first problems
    (``lead``: a first line before them, ``hint``: a last line after them)."""
    metadata = {}
    if isinstance(exc, InputFileError):
        metadata = {"problems": len(exc.problems), "first problems": _problems_md(exc.problems)}
    text = (f"{lead}\n" if lead else "") + str(exc) + (f"\n{hint}" if hint else "")
    return dg.Failure(description=text, metadata=metadata, allow_retries=False)


@contextmanager
def shrink_refusal_as_failure() -> Iterator[None]:
    """A batch refused by the shrink guard (nothing written) fails the step with the way to allow it."""
    try:
        yield
    except BatchShrinkRefused as exc:
        raise dg.Failure(description=f"{exc}\n{SHRINK_HINT}", allow_retries=False) from exc


class RawInteractionsConfig(dg.Config):
    quarantine_bad_rows: bool = Field(
        default=False,
        description="Keep the good rows of a file with malformed rows and record the bad ones (line, column, "
        "value, reason) in raw_interaction_rejects, instead of failing.",
    )


@dg.asset(
    group_name=GROUP,
    pool=DUCKDB_POOL,
    code_version=CODE_VERSION,
    kinds={"duckdb"},
    automation_condition=data_side(),
    check_specs=_check_specs("raw_interactions"),
    description="The dataset's interactions file (interactions.csv or .parquet: user_id, item_id, timestamp"
    "[, evaluation]) validated and loaded as batch 'initial' of the table raw_interactions; re-running replaces "
    "the batch. The demo dataset is generated first when VISREC_DATASET=demo.",
)
def raw_interactions(
    context: dg.AssetExecutionContext,
    config: RawInteractionsConfig,
    settings: VisrecSettings,
    duckdb: VisrecDuckDB,
) -> dg.MaterializeResult:
    ws = settings.workspace
    if ws.is_demo:
        from visrec_pipeline.demo import ensure_demo_dataset

        ensure_demo_dataset(ws.dataset_dir)
    try:
        path = find_interactions_file(ws.dataset_dir)
        batch = read_interactions(
            path,
            file=path.name,
            quarantine=config.quarantine_bad_rows,
            future_tolerance_s=settings.future_tolerance_s,
        )
    except InputFileError as exc:
        raise input_failure(exc, QUARANTINE_HINT) from exc
    except DatasetFolderError as exc:
        raise input_failure(exc) from exc
    context.log.info(f"{batch.file}: {batch.n_rows} rows valid, {batch.n_rejected_rows} rejected ({batch.reader})")

    with shrink_refusal_as_failure(), duckdb.get_connection() as conn:
        write_batch(conn, INITIAL_BATCH, batch, shrink_policy=settings.shrink_policy)
        batches = batches_summary(conn)
        counts = raw_counts(conn)
        version = fingerprint(conn, "raw_interactions")

    metadata = {
        "source_file": dg.MetadataValue.path(str(path)),
        "sha256": batch.sha256,
        "rows_in_file": batch.n_read,
        "rows_loaded": batch.n_rows,
        "rejected_rows": batch.n_rejected_rows,
        "has_evaluation_column": batch.has_evaluation,
        "ignored_columns": ", ".join(batch.ignored_columns) or "none",
        "reader": batch.reader,
        "batches": len(batches),
        "batch_table": _table_md(batches),
        "raw_rows_total": counts["raw_rows_total"],
        "rejected_rows_total": counts["rejected_rows_total"],
        "dagster/row_count": counts["raw_rows_total"],
    }
    if batch.rejects:
        metadata["rejects"] = _problems_md(batch.rejects)
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=_check_results([rejected_rows_check(batch.n_rejected_rows)]),
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    group_name=GROUP,
    deps=[raw_interactions, INCOMING],
    pool=DUCKDB_POOL,
    code_version=CODE_VERSION,
    kinds={"duckdb"},
    automation_condition=data_side(),
    check_specs=_check_specs("interactions"),
    description="One row per (user_id, item_id) from every batch of raw_interactions (the initial file and "
    "every incoming batch): the latest timestamp "
    "wins (ties: the later batch, then the later line); the evaluation flag of the kept row is carried.",
)
def interactions(context: dg.AssetExecutionContext, duckdb: VisrecDuckDB) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        stats = build_interactions(conn)
        outcomes = interactions_checks(conn)
        version = fingerprint(conn, "interactions")
    return dg.MaterializeResult(
        metadata={
            "interactions": int(stats["interactions"]),
            "users": int(stats["users"]),
            "items": int(stats["items"]),
            "sparsity": float(stats["sparsity"]),
            "duplicates_removed": int(stats["duplicates_removed"]),
            "raw_rows": int(stats["raw_rows"]),
            "first_ts": dg.MetadataValue.timestamp(float(stats["first_ts"] or 0)),
            "last_ts": dg.MetadataValue.timestamp(float(stats["last_ts"] or 0)),
            "evaluation_flags (true/false/none)": f"{stats['evaluation_true']}/{stats['evaluation_false']}/"
            f"{stats['evaluation_null']}",
            "interactions_per_user": dg.MetadataValue.md(distribution_markdown(stats["per_user"], "per user")),
            "dagster/row_count": int(stats["interactions"]),
        },
        check_results=_check_results(outcomes),
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    group_name=GROUP,
    deps=[interactions, raw_interactions],
    pool=DUCKDB_POOL,
    code_version=CODE_VERSION,
    kinds={"duckdb"},
    automation_condition=data_side(),
    check_specs=_check_specs("item_catalog"),
    description="One row per item with interactions: title, creator and URL from the dataset's items.csv "
    "or an incoming/<batch>_items.csv when listed there (NULL otherwise), and first_seen, the item's earliest interaction (unix seconds).",
)
def item_catalog(
    context: dg.AssetExecutionContext, settings: VisrecSettings, duckdb: VisrecDuckDB
) -> dg.MaterializeResult:
    try:
        items, items_files = read_catalog_items(settings.workspace.dataset_dir)
    except InputFileError as exc:
        raise input_failure(exc) from exc
    with duckdb.get_connection() as conn:
        before = catalog_item_count(conn)
        stats = build_catalog(conn, items)
        outcomes = catalog_checks(conn)
        version = fingerprint(conn, "item_catalog")
    return dg.MaterializeResult(
        metadata={
            "items": int(stats["items"]),
            "with_title": int(stats["with_title"]),
            "with_creator": int(stats["with_creator"]),
            "with_url": int(stats["with_url"]),
            "creators": int(stats["creators"]),
            "items_csv": "present" if stats["items_csv"] else "absent",
            "new_items": int(stats["items"]) - before,
            "items_files": ", ".join(items_files) or "none",
            "items_csv_rows": int(stats["items_csv_rows"]),
            "items_csv_rows_ignored (no interactions)": int(stats["items_csv_without_interactions"]),
            "items_without_metadata": int(stats["items_not_in_items_csv"]),
            "dagster/row_count": int(stats["items"]),
        },
        check_results=_check_results(outcomes),
        data_version=dg.DataVersion(version),
    )


class SplitConfig(dg.Config):
    holdout_per_user: int = Field(
        default=1, ge=1, description="N of the per-user last-N holdout: users with more than N rows hold out N."
    )
    recompute_evaluation: bool = Field(
        default=False,
        description="Ignore an evaluation column of the input and recompute the holdout with last-N.",
    )


@dg.asset(
    group_name=GROUP,
    deps=[interactions],
    pool=DUCKDB_POOL,
    code_version=CODE_VERSION,
    kinds={"duckdb"},
    automation_condition=data_side(),
    check_specs=_check_specs("split"),
    description="The per-user last-N holdout of shared/spec/evaluation.md: split_train(user_id, item_id, ts) and "
    "split_holdout(user_id, profile, predict). An evaluation column in the input is used as-is unless "
    "recompute_evaluation is set.",
)
def split(context: dg.AssetExecutionContext, config: SplitConfig, duckdb: VisrecDuckDB) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        stats = build_split(
            conn, holdout_per_user=config.holdout_per_user, recompute_evaluation=config.recompute_evaluation
        )
        outcomes = split_checks(conn, stats["share_users_with_holdout"])
        version = fingerprint(conn, "split")
    return dg.MaterializeResult(
        metadata={
            "mode": stats["mode"],
            "holdout_per_user": int(stats["holdout_per_user"]),
            "train_rows": int(stats["train_rows"]),
            "train_users": int(stats["train_users"]),
            "holdout_users": int(stats["holdout_users"]),
            "predict_items": int(stats["predict_items"]),
            "users": int(stats["users"]),
            "share_users_with_holdout": float(stats["share_users_with_holdout"]),
            "rows_with_evaluation_flag": int(stats["rows_with_evaluation_flag"]),
            "profile_size": dg.MetadataValue.md(distribution_markdown(stats["profile_size"], "holdout profile")),
            "dagster/row_count": int(stats["train_rows"]),
        },
        check_results=_check_results(outcomes),
        data_version=dg.DataVersion(version),
    )


INGEST_ASSETS = [raw_interactions, interactions, item_catalog, split]

defs = dg.Definitions(assets=INGEST_ASSETS)
