"""Assets ``embeddings_<backbone>`` (one per registered backbone, built by one factory) and
``visual_clusters``: CNN features of every ok thumbnail, computed incrementally, and k-means over them."""

import time
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.defs.automation import data_side
from visrec_pipeline.defs.resources import ComputeResource, VisrecDuckDB, VisrecSettings
from visrec_pipeline.defs.temp_files import remove_leftover_temps
from visrec_pipeline.devices import resolve_device
from visrec_pipeline.distributed.cluster import ray_session
from visrec_pipeline.distributed.embeddings import extract_on_ray
from visrec_pipeline.embeddings import bring_your_own, preview, store, update
from visrec_pipeline.embeddings.backbones import BACKBONES, BackboneSpec
from visrec_pipeline.embeddings.extract import load_backbone
from visrec_pipeline.embeddings.kmeans import ClusterState, assign, kmeans, l2_normalize
from visrec_pipeline.embeddings.thumbnails import ThumbnailPaths
from visrec_pipeline.embeddings.weights import WeightsChoice
from visrec_pipeline.images import table as images_table
from visrec_pipeline.paths import Workspace
from visrec_pipeline.reporting.grids import png_markdown

EMBEDDINGS_CODE_VERSION = "1"


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


def _loud(context: dg.AssetExecutionContext, warning: str) -> None:
    bar = "!" * 78
    context.log.warning(f"\n{bar}\nWEIGHTS WARNING: {warning}\n{bar}")


def _embedding_metadata(
    ws: Workspace,
    spec: BackboneSpec,
    choice: WeightsChoice,
    plan: update.Plan,
    extraction: update.Extraction,
    provenance: dict,
    committed: update.Committed,
    grid: bytes | None,
    engine: dict,
) -> dict:
    stats = extraction.stats
    regions, channels = provenance["spatial_regions"], provenance["spatial_channels"]
    failures_md = pd.DataFrame(
        extraction.failures[:20], columns=["item_id", "error"]
    ).to_markdown(index=False) if extraction.failures else "none"
    statuses = plan.image_status
    metadata = {
        "items_served": len(committed.snapshot.item_ids),
        "computed": stats.n_ok,
        "reused": plan.n_reused,
        "failed_to_read": len(extraction.failures),
        "skipped_not_ok": plan.n_not_ok,
        "index_rows_dropped": committed.pruned,
        "pooled_dim": provenance["pooled_dim"],
        "spatial_shape": f"{regions} x {channels} (regions x channels, float16)" if regions is not None else "none",
        "weights_used": choice.used,
        "weights_tag": choice.tag,
        "weights_warning": choice.warning or "none",
        **engine,
        "device": stats.device,
        "precision": stats.precision,
        "graph": stats.graph,
        **({"int8_calibration": stats.int8_calibration} if stats.int8_calibration else {}),
        "batch_size": stats.batch_size,
        "num_workers": stats.num_workers,
        "images_per_s": round(stats.images_per_s, 2),
        "extract_seconds": round(stats.seconds, 2),
        "shards": committed.n_shards,
        "compacted_into": committed.compacted_into or "no compaction",
        "shard_files_removed": committed.files_removed,
        "damaged_shard_files": dg.MetadataValue.json(
            {shard: str(err.path) for shard, err in sorted(plan.shard_check.damaged.items())}
        ),
        "features_dir": dg.MetadataValue.path(str(ws.features_dir / spec.name)),
        "image_status": dg.MetadataValue.md(statuses.to_markdown(index=False) if len(statuses) else "no images"),
        "read_failures": dg.MetadataValue.md(failures_md),
    }
    if grid is not None:
        metadata["similar_images"] = dg.MetadataValue.md(
            png_markdown(grid, "query images (outlined) and their cosine nearest neighbours")
        )
    return metadata


def _register_brought(
    context: dg.AssetExecutionContext,
    ws: Workspace,
    spec: BackboneSpec,
    brought: bring_your_own.BroughtFiles,
    duckdb: VisrecDuckDB,  # type: ignore[valid-type]
) -> dg.MaterializeResult:
    context.log.info(f"{spec.name}: precomputed features in {brought.pooled.parent}: validating and registering them")
    done = bring_your_own.register(duckdb.get_connection, ws.features_dir, brought, spec.revision)
    context.log.info(
        f"{spec.name}: {done.items} items of precomputed features "
        + ("already registered (same files)" if done.reused else f"copied into shard {done.shard}")
    )
    files = pd.DataFrame(
        [(name, d.bytes, d.sha256) for name, d in sorted(done.files.items())], columns=["file", "bytes", "sha256"]
    )
    return dg.MaterializeResult(
        metadata={
            "items_served": done.items,
            "source": bring_your_own.WEIGHTS_USED,
            "weights_used": bring_your_own.WEIGHTS_USED,
            "weights_tag": done.weights_tag,
            "reused": done.reused,
            "pooled_dim": done.dim,
            "spatial_shape": (
                f"{done.spatial_shape[0]} x {done.spatial_shape[1]} (regions x channels, float16)"
                if done.spatial_shape else "none"
            ),
            "files": dg.MetadataValue.md(files.to_markdown(index=False)),
            "shard_files_removed": done.files_removed,
            "features_dir": dg.MetadataValue.path(str(ws.features_dir / spec.name)),
        }
    )


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
        context: dg.AssetExecutionContext,
        config: EmbeddingConfig,
        settings: VisrecSettings,
        duckdb: VisrecDuckDB,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        ws = settings.workspace.ensure()
        similar_previews = ws.previews_dir / f"similar_{spec.name}"
        remove_leftover_temps(context, ws.features_dir / spec.name, similar_previews, ws.init_cache_dir)
        brought = bring_your_own.find(ws.dataset_dir, spec.name)
        if brought is not None:  # the dataset ships its features: register them, compute nothing
            return _register_brought(context, ws, spec, brought, duckdb)
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

        # 1. What to compute (connection held only for the reads; shard files hashed without it).
        plan = update.plan(duckdb.get_connection, ws.features_dir, backbone)
        for damaged in plan.shard_check.damaged.values():
            context.log.warning(
                f"feature shard file {damaged.path} is damaged ({damaged.problem}): recomputing the items it held"
            )
        context.log.info(f"{spec.name}: {len(plan.todo)} of {plan.n_ok} ok images to compute, {plan.n_reused} reused")

        # 2. Extract with no connection held; the new shard appears only once complete.
        def progress(done: int, total: int, rate: float) -> None:
            context.log.info(f"{spec.name}: {done}/{total} images, {rate:.1f} images/s")

        options = dict(
            device=config.device, precision=config.precision, batch_size=config.batch_size, cpu_graph=config.cpu_graph
        )
        compute_settings = compute.settings
        if compute_settings.distributed and len(plan.todo):
            # actors write the shards; this step alone commits the index below
            with ray_session(compute_settings) as address:
                on_ray = extract_on_ray(
                    backbone, plan, ws.root, ws.features_dir, compute_settings, init_cache_dir=ws.init_cache_dir,
                    progress=progress, num_workers=config.num_workers, **options,
                )
            extraction = on_ray.extraction
            engine = {
                "engine": "ray", "ray_address": address, "ray_workers": on_ray.workers, "ray_shards": on_ray.shards,
                "ray_setup_seconds": round(on_ray.setup_seconds, 2),
            }
            context.log.info(
                f"{spec.name}: {len(plan.todo)} images on Ray ({address}): {on_ray.workers} workers, "
                f"{on_ray.shards} shards, {extraction.stats.images_per_s:.1f} images/s"
            )
        else:
            extraction = update.extract(
                backbone, plan, ws.root, ws.features_dir, num_workers=config.num_workers, progress=progress,
                progress_every=config.progress_every_batches, **options,
            )
            # a Ray run with nothing to compute starts no cluster
            engine = {"engine": "ray (nothing to compute)" if compute_settings.distributed else "local"}
        for note in extraction.stats.notes:
            context.log.warning(note)
        if extraction.failures:
            item_id, error = extraction.failures[0]
            context.log.warning(
                f"{spec.name}: {len(extraction.failures)} image(s) could not be read, e.g. item {item_id}: {error}"
            )

        # 3. Point the index at the new rows (one transaction), then tidy the shards.
        provenance = update.provenance(backbone)
        committed = update.commit(
            duckdb.get_connection, ws.features_dir, backbone, plan, extraction, provenance, max_shards=config.max_shards
        )
        grid = preview.neighbour_grid(
            committed.snapshot, ThumbnailPaths(ws.root, committed.ok_paths), config.neighbour_queries,
            config.neighbours, preview.GridCache(similar_previews),
        )
        return dg.MaterializeResult(
            metadata=_embedding_metadata(ws, spec, choice, plan, extraction, provenance, committed, grid, engine)
        )

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
            images_table.require_table(conn)
            store.ensure_tables(conn)
            n_ok = images_table.ok_count(conn)
            missing_files = store.missing_shards(conn, ws.features_dir, spec.name)
            prov = store.feature_provenance(conn, spec.name)
            served = len(store.snapshot(conn, ws.features_dir, spec.name).item_ids) if prov else 0
        # features brought with the dataset need no image: every row they hold is served
        brought = prov.get("weights_used") == bring_your_own.WEIGHTS_USED
        return dg.AssetCheckResult(
            passed=not missing_files and (served == n_ok or (brought and served == prov.get("n_items"))),
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
    deps=[dg.AssetKey(f"embeddings_{FEATURE_BACKBONE}")],
    group_name="features",
    code_version="1",
    description=f"k-means (k-means++ init, Lloyd) over L2-normalised pooled {FEATURE_BACKBONE} features; the "
    "stand-in for 'artist' in CuratorNet's guidelines when an item has no creator. Table `visual_clusters`.",
    kinds={"pytorch", "duckdb"},
    automation_condition=data_side(),
)
def visual_clusters(
    context: dg.AssetExecutionContext, config: ClusterConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
) -> dg.MaterializeResult:
    ws = settings.workspace
    cluster_previews = ws.previews_dir / f"clusters_{FEATURE_BACKBONE}"
    remove_leftover_temps(context, ws.features_dir / "clusters", cluster_previews)
    with duckdb.get_connection() as conn:
        store.ensure_tables(conn)
        snap = store.snapshot(conn, ws.features_dir, FEATURE_BACKBONE)
        path_rows = images_table.ok_paths(conn)
    ids = snap.item_ids
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    state_path = ws.features_dir / "clusters" / f"{FEATURE_BACKBONE}.npz"
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
        context.log.warning(f"no {FEATURE_BACKBONE} features are served: visual_clusters is empty")
    seconds = time.perf_counter() - t0
    with duckdb.get_connection() as conn:
        store.replace_clusters(conn, FEATURE_BACKBONE, ids, labels)

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
            ThumbnailPaths(ws.root, path_rows), ids, labels, min(config.preview_clusters, len(sizes)),
            config.samples_per_cluster, preview.GridCache(cluster_previews),
        )
        metadata["cluster_samples"] = dg.MetadataValue.md(png_markdown(png, "cluster samples"))
    return dg.MaterializeResult(metadata=metadata)


EMBEDDING_ASSETS = [embedding_asset(spec) for spec in BACKBONES.values()]
EMBEDDING_CHECKS = [embedding_coverage_check(a, spec) for a, spec in zip(EMBEDDING_ASSETS, BACKBONES.values())]

defs = dg.Definitions(assets=[*EMBEDDING_ASSETS, visual_clusters], asset_checks=EMBEDDING_CHECKS)
