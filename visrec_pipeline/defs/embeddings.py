"""Assets ``embeddings_<backbone>`` (one per registered backbone, built by one factory) and
``visual_clusters``: CNN features of every ok thumbnail, computed incrementally, and k-means over them."""

from collections.abc import Iterator, Mapping
import time
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from visrec_pipeline import db
from visrec_pipeline.defs.automation import data_side
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.embeddings import preview, store
from visrec_pipeline.embeddings.backbones import BACKBONES, BackboneSpec, output_shapes
from visrec_pipeline.embeddings.extract import extract_features, load_backbone, resolve_device
from visrec_pipeline.embeddings.kmeans import ClusterState, assign, kmeans, l2_normalize
from visrec_pipeline.embeddings.similarity import cosine_neighbours
from visrec_pipeline.reporting.grids import png_markdown

EMBEDDINGS_CODE_VERSION = "1"
CLUSTER_BACKBONE = "resnet50"


class EmbeddingConfig(dg.Config):
    weights: str = Field(
        default="auto",
        description="imagenet | random | auto (ImageNet when cached or quickly downloadable, else random init "
        "with a warning) | path to a state dict .pth file",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto picks cuda when available")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        default="auto",
        description="auto = bf16 on CUDA (autocast) and on CPUs with native bf16 (model converted to bf16), else fp32; "
        "int8 (CPU): quantized model, 1.4-1.6x the bf16 throughput, pooled features at cosine ~0.9998 to fp32, "
        "calibrated once per feature set on its first images (stored next to the features)",
    )
    cpu_graph: bool = Field(
        default=True,
        description="on CPU, run a traced, frozen TorchScript graph with oneDNN Graph fusion (false: eager PyTorch)",
    )
    batch_size: int = Field(default=32, ge=1)
    num_workers: int = Field(
        default=-1, description="DataLoader decode workers; -1 = min(2, CPUs) on CPU, min(8, CPUs) on CUDA"
    )
    seed: int = Field(default=0, description="seed of the random initialisation (weights=random or auto fallback)")
    download_timeout_s: float = Field(default=10.0, gt=0, description="socket timeout of the weights download")
    progress_every_batches: int = Field(default=10, ge=1)
    max_shards: int = Field(default=20, ge=1, description="compact the shards into one when there are more")
    neighbour_queries: int = Field(default=4, ge=0, description="query images in the similar-images grid")
    neighbours: int = Field(default=5, ge=1)


def _image_path(root: Path, rel: str | None) -> Path | None:
    """The thumbnail path, only if it stays inside the workspace (paths come from a table)."""
    if not rel:
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


class _ThumbnailPaths(Mapping):
    """item id -> thumbnail path, resolved on lookup: previews need a few dozen of thousands of rows."""

    def __init__(self, root: Path, rows: list[tuple[int, str]]):
        self._root, self._rel = root, {int(i): p for i, p in rows}

    def __getitem__(self, item_id: int) -> Path | None:
        return _image_path(self._root, self._rel[item_id])

    def __iter__(self) -> Iterator[int]:
        return iter(self._rel)

    def __len__(self) -> int:
        return len(self._rel)


def _require_item_images(conn) -> None:
    if not db.table_exists(conn, "item_images"):
        raise RuntimeError("table item_images does not exist: materialize the item_images asset first")


def _neighbour_grid(
    snap: store.FeatureSnapshot, paths: dict[int, Path], n_queries: int, k: int, cache: preview.GridCache
) -> bytes | None:
    ids = snap.item_ids
    if len(ids) < 2 or n_queries == 0:
        return None
    query_ids = preview.stable_sample(ids, n_queries)  # the same queries refresh after refresh
    qf, _ = snap.pooled(query_ids)
    nn_ids, nn_sims = cosine_neighbours(query_ids, qf, snap.iter_pooled(), k)
    return preview.neighbours_png(paths, query_ids.tolist(), nn_ids, nn_sims, cache)


def _loud(context: dg.AssetExecutionContext, warning: str) -> None:
    bar = "!" * 78
    context.log.warning(f"\n{bar}\nWEIGHTS WARNING: {warning}\n{bar}")


def embedding_asset(spec: BackboneSpec) -> dg.AssetsDefinition:
    """The ``embeddings_<spec.name>`` asset."""
    spatial_text = f"; spatial `{spec.spatial_node}` map stored float16 as [n, regions, channels]" if spec.spatial_node else ""

    @dg.asset(
        name=f"embeddings_{spec.name}",
        deps=[dg.AssetKey("item_images")],
        group_name="features",
        code_version=f"{EMBEDDINGS_CODE_VERSION}:{spec.pooled_node}:{spec.spatial_node}:{spec.weights}:r{spec.revision}",
        description=f"{spec.name} features (torchvision, {spec.weights}) of every ok thumbnail: pooled `{spec.pooled_node}` "
        f"float32{spatial_text}. Only new or changed images are computed; rows live in `embedding_index`.",
        kinds={"pytorch", "duckdb"},
        automation_condition=data_side(),
    )
    def _asset(
        context: dg.AssetExecutionContext, config: EmbeddingConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
    ) -> dg.MaterializeResult:
        ws = settings.workspace.ensure()
        backbone = load_backbone(
            spec,
            config.weights,
            seed=config.seed,
            download_timeout_s=config.download_timeout_s,
            init_cache_dir=ws.init_cache_dir,
            single_use=True,
        )
        choice = backbone.weights
        if choice.warning:
            _loud(context, choice.warning)
        context.log.info(f"{spec.name}: weights {choice.used} (tag {choice.tag})")

        # 1. What to compute (connection held only for the reads).
        with duckdb.get_connection() as conn:
            _require_item_images(conn)
            store.ensure_tables(conn)
            todo = store.todo_items(conn, ws.features_dir, spec.name, choice.tag, spec.revision)
            statuses = conn.execute(
                "SELECT status, count(*) AS items, any_value(reason) AS example_reason FROM item_images "
                "GROUP BY status ORDER BY status"
            ).df()
            shards_before = store.referenced_shards(conn, spec.name)
        n_ok = int(statuses.loc[statuses["status"] == "ok", "items"].sum())
        not_ok = statuses[statuses["status"] != "ok"]

        # 2. Extract with no connection held; the new shard appears only once complete.
        item_ids = todo["item_id"].to_numpy(np.int64)
        paths = [_image_path(ws.root, p) for p in todo["path"]]
        context.log.info(f"{spec.name}: {len(todo)} of {n_ok} ok images to compute, {n_ok - len(todo)} reused")

        def progress(done: int, total: int, rate: float) -> None:
            context.log.info(f"{spec.name}: {done}/{total} images, {rate:.1f} images/s")

        with store.ShardWriter(ws.features_dir, spec.name, choice.tag, item_ids) as writer:
            stats = extract_features(
                backbone,
                paths,
                writer.write,
                device=config.device,
                precision=config.precision,
                batch_size=config.batch_size,
                num_workers=config.num_workers,
                progress=progress,
                progress_every=config.progress_every_batches,
                cpu_graph=config.cpu_graph,
                int8_calibration=store.calibration_path(ws.features_dir, spec.name, choice.tag, spec.revision),
            )
        for note in stats.notes:
            context.log.warning(note)
        failed_pos = np.array([p for p, _ in stats.failures], dtype=np.int64)
        good = np.ones(len(todo), dtype=bool)
        good[failed_pos] = False
        rows = pd.DataFrame(
            {"item_id": item_ids[good], "row": np.flatnonzero(good), "content_hash": todo["content_hash"].to_numpy()[good]}
        )
        if stats.failures:
            context.log.warning(
                f"{spec.name}: {len(stats.failures)} image(s) could not be read, e.g. item "
                f"{int(item_ids[stats.failures[0][0]])}: {stats.failures[0][1]}"
            )

        # 3. Point the index at the new rows (one transaction), then tidy the shards.
        pooled_dim, spatial = output_shapes(spec)
        provenance = {
            "weights_used": choice.used,
            "weights_warning": choice.warning,
            "pooled_node": spec.pooled_node,
            "pooled_dim": pooled_dim,
            "spatial_node": spec.spatial_node,
            "spatial_regions": spatial[0] if spatial else None,
            "spatial_channels": spatial[1] if spatial else None,
            "preprocessing": repr(backbone.transform).replace("\n", " "),
        }
        written = {(choice.tag, writer.shard)} if writer.shard else set()

        def tidy(conn):
            superseded = (shards_before | written) - store.referenced_shards(conn, spec.name)
            files_removed = store.remove_unreferenced(conn, ws.features_dir, spec.name, superseded)
            snap = store.snapshot(conn, ws.features_dir, spec.name)
            path_rows = conn.execute("SELECT item_id, path FROM item_images WHERE status = 'ok'").fetchall()
            return files_removed, snap, path_rows, len(store.referenced_shards(conn, spec.name))

        compacted = None
        with duckdb.get_connection() as conn:  # one connection unless the shards need compacting
            pruned = store.commit_index(
                conn, spec.name, choice.tag, writer.shard, rows, provenance, spec.revision
            )
            compact = len(store.referenced_shards(conn, spec.name)) > config.max_shards
            if not compact:
                files_removed, snap, path_rows, n_shards = tidy(conn)
        if compact:  # copies features with no connection held
            compacted = store.compact(duckdb.get_connection, ws.features_dir, spec.name, max_shards=config.max_shards)
            with duckdb.get_connection() as conn:
                files_removed, snap, path_rows, n_shards = tidy(conn)
        paths_by_id = _ThumbnailPaths(ws.root, path_rows)
        grid = _neighbour_grid(
            snap, paths_by_id, config.neighbour_queries, config.neighbours,
            preview.GridCache(ws.previews_dir / f"similar_{spec.name}"),
        )

        failures_md = pd.DataFrame(
            [(int(item_ids[p]), e) for p, e in stats.failures[:20]], columns=["item_id", "error"]
        ).to_markdown(index=False) if stats.failures else "none"
        metadata = {
            "items_served": len(snap.item_ids),
            "computed": stats.n_ok,
            "reused": n_ok - len(todo),
            "failed_to_read": len(stats.failures),
            "skipped_not_ok": int(not_ok["items"].sum()),
            "index_rows_dropped": pruned,
            "pooled_dim": pooled_dim,
            "spatial_shape": f"{spatial[0]} x {spatial[1]} (regions x channels, float16)" if spatial else "none",
            "weights_used": choice.used,
            "weights_tag": choice.tag,
            "weights_warning": choice.warning or "none",
            "device": stats.device,
            "precision": stats.precision,
            "graph": stats.graph,
            **({"int8_calibration": stats.int8_calibration} if stats.int8_calibration else {}),
            "batch_size": stats.batch_size,
            "num_workers": stats.num_workers,
            "images_per_s": round(stats.images_per_s, 2),
            "extract_seconds": round(stats.seconds, 2),
            "shards": n_shards,
            "compacted_into": compacted or "no compaction",
            "shard_files_removed": files_removed,
            "features_dir": dg.MetadataValue.path(str(ws.features_dir / spec.name)),
            "image_status": dg.MetadataValue.md(statuses.to_markdown(index=False) if len(statuses) else "no images"),
            "read_failures": dg.MetadataValue.md(failures_md),
        }
        if grid is not None:
            metadata["similar_images"] = dg.MetadataValue.md(
                png_markdown(grid, "query images (outlined) and their cosine nearest neighbours")
            )
        return dg.MaterializeResult(metadata=metadata)

    return _asset


def embedding_coverage_check(asset: dg.AssetsDefinition, spec: BackboneSpec) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="features_cover_ok_images",
        description="Every ok image has current features whose shard files exist.",
    )
    def _check(settings: VisrecSettings, duckdb: VisrecDuckDB) -> dg.AssetCheckResult:
        ws = settings.workspace
        with duckdb.get_connection() as conn:
            _require_item_images(conn)
            store.ensure_tables(conn)
            n_ok = conn.execute("SELECT count(*) FROM item_images WHERE status = 'ok'").fetchone()[0]
            missing_files = store.missing_shards(conn, ws.features_dir, spec.name)
            served = len(store.snapshot(conn, ws.features_dir, spec.name).item_ids) if store.feature_provenance(
                conn, spec.name
            ) else 0
        return dg.AssetCheckResult(
            passed=not missing_files and served == n_ok,
            severity=dg.AssetCheckSeverity.ERROR if missing_files else dg.AssetCheckSeverity.WARN,
            metadata={"ok_images": int(n_ok), "served": served, "missing_shard_files": len(missing_files)},
        )

    return _check


class ClusterConfig(dg.Config):
    k: int = Field(default=20, ge=1, description="number of clusters (fewer when there are fewer items)")
    seed: int = 0
    max_iter: int = Field(default=100, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    samples_per_cluster: int = Field(default=6, ge=1, description="images per cluster in the preview grid")
    preview_clusters: int = Field(default=8, ge=0)
    refit_share: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="New items join the last fit's nearest centroid (cluster ids stay stable, no refit) while at "
        "most this share of items is new since that fit; beyond it, or when k, seed or weights change, k-means "
        "is refitted on all items. 0 = always refit.",
    )


@dg.asset(
    deps=[dg.AssetKey(f"embeddings_{CLUSTER_BACKBONE}")],
    group_name="features",
    code_version="1",
    description=f"k-means (k-means++ init, Lloyd) over L2-normalised pooled {CLUSTER_BACKBONE} features; the "
    "stand-in for 'artist' in CuratorNet's guidelines when an item has no creator. Table `visual_clusters`.",
    kinds={"pytorch", "duckdb"},
    automation_condition=data_side(),
)
def visual_clusters(
    context: dg.AssetExecutionContext, config: ClusterConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
) -> dg.MaterializeResult:
    ws = settings.workspace
    with duckdb.get_connection() as conn:
        store.ensure_tables(conn)
        snap = store.snapshot(conn, ws.features_dir, CLUSTER_BACKBONE)
        path_rows = conn.execute("SELECT item_id, path FROM item_images WHERE status = 'ok'").fetchall()
    ids = snap.item_ids
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    state_path = ws.features_dir / "clusters" / f"{CLUSTER_BACKBONE}.npz"
    weights_tag = str(snap.provenance.get("weights_tag"))
    result, mode = None, "empty"
    if len(ids):
        feats = l2_normalize(torch.from_numpy(snap.pooled(ids)[0]))
        state = ClusterState.load(state_path)
        if state is not None and state.can_extend(
            ids, k=config.k, seed=config.seed, weights_tag=weights_tag, refit_share=config.refit_share
        ):
            # a refresh with a few new items: they join the nearest centroid, the others keep their cluster
            labels, centroids, mode = assign(feats, state.centroids), state.centroids, "assigned to the last fit"
        else:
            result = kmeans(feats, config.k, seed=config.seed, max_iter=config.max_iter, device=device)
            labels, centroids, mode = result.labels, result.centroids, "refitted"
            ClusterState(centroids, np.asarray(ids, np.int64), config.k, config.seed, weights_tag).save(state_path)
    else:
        labels, centroids = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        context.log.warning(f"no {CLUSTER_BACKBONE} features are served: visual_clusters is empty")
    seconds = time.perf_counter() - t0
    out = pd.DataFrame({"backbone": CLUSTER_BACKBONE, "item_id": ids, "cluster": labels.astype(np.int32)})
    with duckdb.get_connection() as conn:
        conn.register("_new_clusters", out)
        try:
            with db.transaction(conn):
                conn.execute("DELETE FROM visual_clusters WHERE backbone = ?", [CLUSTER_BACKBONE])
                conn.execute("INSERT INTO visual_clusters SELECT backbone, item_id, cluster FROM _new_clusters")
        finally:
            conn.unregister("_new_clusters")

    sizes = np.bincount(labels, minlength=len(centroids)) if len(ids) else np.zeros(0, np.int64)
    metadata = {
        "items": len(ids),
        "mode": mode,
        "k": len(sizes),
        "cluster_sizes": dg.MetadataValue.md(
            pd.DataFrame({"cluster": np.arange(len(sizes)), "items": sizes}).to_markdown(index=False) if len(sizes) else "none"
        ),
        "largest_cluster_share": round(float(sizes.max() / max(len(ids), 1)), 3) if len(sizes) else 0.0,
        "iterations": result.n_iter if result else 0,
        "converged": bool(result.converged) if result else True,
        "seconds": round(seconds, 3),
        **({"inertia": round(result.inertia, 4)} if result else {}),
        "weights_tag": snap.provenance.get("weights_tag"),
        "weights_warning": snap.provenance.get("weights_warning") or "none",
    }
    if len(ids) and config.preview_clusters:
        png = preview.cluster_samples_png(
            _ThumbnailPaths(ws.root, path_rows), ids, labels, min(config.preview_clusters, len(sizes)),
            config.samples_per_cluster, preview.GridCache(ws.previews_dir / f"clusters_{CLUSTER_BACKBONE}"),
        )
        metadata["cluster_samples"] = dg.MetadataValue.md(png_markdown(png, "cluster samples"))
    return dg.MaterializeResult(metadata=metadata)


EMBEDDING_ASSETS = [embedding_asset(spec) for spec in BACKBONES.values()]
EMBEDDING_CHECKS = [embedding_coverage_check(a, spec) for a, spec in zip(EMBEDDING_ASSETS, BACKBONES.values())]

defs = dg.Definitions(assets=[*EMBEDDING_ASSETS, visual_clusters], asset_checks=EMBEDDING_CHECKS)
