"""One backbone's features brought up to date: the steps of an ``embeddings_<backbone>`` asset.

1. :func:`plan` (connection held for the reads only): check the shard files against their
   recorded hashes (no connection held), then which ok images need features, the items of a
   damaged shard included.
2. :func:`extract` (no connection held): their features, into one new shard that appears only
   once complete (on a Ray cluster: one shard per worker batch, see distributed/embeddings.py).
3. :func:`commit`: point the index at the new rows and record the new files' hashes (one
   transaction), compact the shards when there are too many, delete superseded (and damaged)
   shard files, and read back what is now served.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import duckdb
import numpy as np
import pandas as pd

from visrec_pipeline.embeddings import store
from visrec_pipeline.embeddings.backbones import output_shapes
from visrec_pipeline.embeddings.extract import ExtractStats, LoadedBackbone, extract_features
from visrec_pipeline.embeddings.shard_files import FileDigest, recorded
from visrec_pipeline.embeddings.thumbnails import thumbnail_path
from visrec_pipeline.images import table as images_table

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]


@dataclass(frozen=True)
class Plan:
    todo: pd.DataFrame  # item_id, content_hash, path of the ok images to compute
    image_status: pd.DataFrame  # status, items, example_reason over item_images
    shards_before: set[tuple[str, str]]  # (weights_tag, shard) the index referenced before this run
    shard_check: store.ShardCheck  # damaged shards (their items are in todo) and first hashes of old shards

    @property
    def n_ok(self) -> int:
        return int(self.image_status.loc[self.image_status["status"] == "ok", "items"].sum())

    @property
    def n_not_ok(self) -> int:
        return int(self.image_status.loc[self.image_status["status"] != "ok", "items"].sum())

    @property
    def n_reused(self) -> int:
        return self.n_ok - len(self.todo)


def plan(connect: Connect, features_dir: Path, backbone: LoadedBackbone) -> Plan:
    """The ok images needing features under ``backbone``'s weights and revision (new, changed,
    other weights, lost or damaged shard, older revision)."""
    spec = backbone.spec
    with connect() as conn:
        images_table.require_table(conn)
        store.ensure_tables(conn)
        shards_before = store.referenced_shards(conn, spec.name)
        records = recorded(conn, spec.name)
    check = store.check_shards(features_dir, spec.name, shards_before, records)
    with connect() as conn:
        todo = store.todo_items(
            conn, features_dir, spec.name, backbone.weights.tag, spec.revision, damaged_shards=check.damaged_shards
        )
        return Plan(todo, images_table.status_counts(conn), shards_before, check)


@dataclass(frozen=True)
class Extraction:
    stats: ExtractStats
    rows: pd.DataFrame  # item_id, shard, row, content_hash of the images read
    failures: list[tuple[int, str]]  # (item_id, error) of the images that could not be read
    # new shard -> kind -> size and SHA-256 of its files: one shard here, one per worker batch on
    # a cluster (distributed/embeddings.py); empty when nothing was written
    shards: dict[str, dict[str, FileDigest]]


def extract(
    backbone: LoadedBackbone, plan: Plan, root: Path, features_dir: Path, **options: Any
) -> Extraction:
    """Features of ``plan.todo`` (thumbnails under the workspace ``root``) into a new shard;
    ``options`` are :func:`extract_features`' (device, precision, batch size, progress...)."""
    spec, tag = backbone.spec, backbone.weights.tag
    item_ids = plan.todo["item_id"].to_numpy(np.int64)
    paths = [thumbnail_path(root, p) for p in plan.todo["path"]]
    with store.ShardWriter(features_dir, spec.name, tag, item_ids) as writer:
        stats = extract_features(
            backbone,
            paths,
            writer.write,
            int8_calibration=store.calibration_path(features_dir, spec.name, tag, spec.revision),
            **options,
        )
    failed_pos = np.array([p for p, _ in stats.failures], dtype=np.int64)
    good = np.ones(len(plan.todo), dtype=bool)
    good[failed_pos] = False
    rows = pd.DataFrame(
        {
            "item_id": item_ids[good],
            "shard": writer.shard,
            "row": np.flatnonzero(good),
            "content_hash": plan.todo["content_hash"].to_numpy()[good],
        }
    )
    failures = [(int(item_ids[p]), e) for p, e in stats.failures]
    return Extraction(stats, rows, failures, {writer.shard: writer.digests} if writer.shard else {})


def provenance(backbone: LoadedBackbone) -> dict:
    """The ``embedding_provenance`` fields of ``backbone``'s features (see :func:`store.commit_index`)."""
    spec = backbone.spec
    pooled_dim, spatial = output_shapes(spec)
    return {
        "weights_used": backbone.weights.used,
        "weights_warning": backbone.weights.warning,
        "pooled_node": spec.pooled_node,
        "pooled_dim": pooled_dim,
        "spatial_node": spec.spatial_node,
        "spatial_regions": spatial[0] if spatial else None,
        "spatial_channels": spatial[1] if spatial else None,
        "preprocessing": repr(backbone.transform).replace("\n", " "),
    }


@dataclass(frozen=True)
class Committed:
    pruned: int  # index rows dropped: other weights, or the item's image gone or not ok
    compacted_into: str | None  # the shard the current rows were compacted into, if they were
    files_removed: int
    snapshot: store.FeatureSnapshot  # what is served now
    ok_paths: list[tuple[int, str]]  # (item_id, thumbnail path) of the ok images, for previews
    n_shards: int


def commit(
    connect: Connect,
    features_dir: Path,
    backbone: LoadedBackbone,
    plan: Plan,
    extraction: Extraction,
    provenance: dict,
    *,
    max_shards: int,
) -> Committed:
    """Point the index at ``extraction``'s rows, then tidy the shards; one connection unless the
    shards need compacting (copied with no connection held)."""
    spec, tag = backbone.spec, backbone.weights.tag
    written = {(tag, shard) for shard in extraction.shards}

    def tidy(conn: duckdb.DuckDBPyConnection) -> tuple[int, store.FeatureSnapshot, list[tuple[int, str]], int]:
        superseded = (plan.shards_before | written) - store.referenced_shards(conn, spec.name)
        files_removed = store.remove_unreferenced(conn, features_dir, spec.name, superseded)
        snap = store.snapshot(conn, features_dir, spec.name)
        return files_removed, snap, images_table.ok_paths(conn), len(store.referenced_shards(conn, spec.name))

    compacted = None
    with connect() as conn:
        pruned = store.commit_index(
            conn,
            spec.name,
            tag,
            None,
            extraction.rows,
            provenance,
            spec.revision,
            shards=extraction.shards,
            unusable_shards=plan.shard_check.damaged_shards,
            first_digests=plan.shard_check.first_digests,
        )
        compact = len(store.referenced_shards(conn, spec.name)) > max_shards
        if not compact:
            tidied = tidy(conn)
    if compact:
        compacted = store.compact(connect, features_dir, spec.name, max_shards=max_shards)
        with connect() as conn:
            tidied = tidy(conn)
    return Committed(pruned, compacted, *tidied)
