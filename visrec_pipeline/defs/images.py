"""``item_images``: every catalogued item's image validated, thumbnailed and stored content-addressed.

Sources: the dataset folder's ``images/`` or Wikimedia Commons (by the
catalogue's file title), through :class:`CommonsImageSource`; or none, for a
dataset folder that ships its features (``features/``, see
``embeddings/bring_your_own.py``) and no ``images/``: nothing is fetched, the
models read the brought features, and only models that train on pixels
(DVBPR) stop, saying why. The work itself
is plain Python in ``visrec_pipeline.images``; this module wires it to Dagster.

Checks:
- ``item_images_ok_share``: the share of catalogued items with an ``ok`` image
  is at least ``VISREC_MIN_IMAGE_SHARE`` (environment variable, read when the
  check runs; default 0.9). An env var because asset checks take no run config.
  A dataset that ships features and no images expects none: the check passes
  and says so.
- ``item_images_files_intact``: every ``ok`` row's thumbnail exists and its
  SHA-256 equals ``content_hash``.

No ``from __future__ import annotations`` here: Dagster resolves the Config
and resource parameter annotations at decoration time and cannot read strings.
"""


import os
import time
from typing import Literal

import dagster as dg
import pandas as pd
from pydantic import Field, field_validator

from visrec_pipeline.defs.automation import data_side
from visrec_pipeline.defs.resources import DUCKDB_POOL, VisrecDuckDB, VisrecSettings
from visrec_pipeline.defs.temp_files import remove_leftover_temps
from visrec_pipeline.embeddings import bring_your_own
from visrec_pipeline.embeddings.backbones import BACKBONES
from visrec_pipeline.images.commons import (
    DEFAULT_API_URL,
    STANDARD_THUMB_WIDTHS,
    CommonsClient,
    make_user_agent,
)
from visrec_pipeline.images import table as images_table
from visrec_pipeline.images.store import ImageStore, file_sha256
from visrec_pipeline.images.sync import (
    DEFAULT_CHUNK_SIZE,
    CommonsImageFetcher,
    FolderImageSource,
    ImageSource,
    SyncReport,
    sync_item_images,
)
from visrec_pipeline.images.validate import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, STATUSES, ImageLimits
from visrec_pipeline.reporting.grids import image_grid_png, png_markdown

MIN_IMAGE_SHARE_ENV = "VISREC_MIN_IMAGE_SHARE"
DEFAULT_MIN_IMAGE_SHARE = 0.9
GRID_SIZE = 16
CODE_VERSION = "1"


class CommonsImageSource(dg.ConfigurableResource):
    """How to reach Wikimedia Commons (used by ``item_images`` when the source is Commons)."""

    api_url: str = Field(default=DEFAULT_API_URL, description="The MediaWiki Action API endpoint.")
    contact: str = Field(
        default_factory=lambda: os.environ.get("VISREC_COMMONS_CONTACT", ""),
        description="URL or e-mail put in the User-Agent, as Wikimedia's policy requires (VISREC_COMMONS_CONTACT).",
    )
    # int + validator, not Literal[250, 330]: Dagster config enums must be strings
    thumb_width: int = Field(
        default=330, description=f"Thumbnail width to download, one of {STANDARD_THUMB_WIDTHS}: Commons only "
        "renders standard widths."
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Seconds to establish a connection.")
    read_timeout_s: float = Field(default=60.0, gt=0, description="Longest wait for any single socket read.")
    transfer_timeout_s: float = Field(default=300.0, gt=0, description="Longest time one response body may take.")
    max_retries: int = Field(default=5, ge=0, description="Retries per request after the first attempt.")
    backoff_base_s: float = Field(default=1.0, ge=0, description="Full-jitter backoff base (doubles per retry).")
    max_retry_after_s: float = Field(default=300.0, gt=0, description="Give up when asked to wait longer.")
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0, description="Largest file accepted for download.")
    verify_original: bool = Field(
        default=False,
        description="Download the original file and check its size and SHA-1 instead of the (unverifiable) thumbnail.",
    )

    @field_validator("thumb_width")
    @classmethod
    def _standard_width(cls, value: int) -> int:
        if value not in STANDARD_THUMB_WIDTHS:
            raise ValueError(f"thumb_width must be one of Commons' standard widths {STANDARD_THUMB_WIDTHS}, got {value}")
        return value

    def client(self) -> CommonsClient:
        return CommonsClient(
            self.api_url,
            make_user_agent(self.contact),
            thumb_width=self.thumb_width,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            transfer_timeout_s=self.transfer_timeout_s,
            max_retries=self.max_retries,
            backoff_base_s=self.backoff_base_s,
            max_retry_after_s=self.max_retry_after_s,
            max_bytes=self.max_bytes,
        )


class ItemImagesConfig(dg.Config):
    source: Literal["folder", "commons", "none", "auto"] = Field(
        default="auto",
        description="auto: the dataset folder's images/ when it exists; else none when the folder ships features "
        "(features/<backbone>.npy or .parquet); else Commons by title. none: fetch nothing.",
    )
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="Refuse images with more pixels.")
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0, description="Refuse image files larger than this.")
    retry_failed: bool = Field(default=False, description="Also re-process items whose earlier attempt failed.")
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, gt=0, description="Items per committed transaction.")
    workers: int = Field(default=2, gt=0, description="Decode/resize workers.")
    pool: Literal["thread", "process"] = Field(
        default="thread", description="Worker pool kind (threads measured faster: Pillow releases the GIL)."
    )


def _md_cell(value: object) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def md_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def ships_features_without_images(ws) -> list[str]:
    """The backbones whose features the dataset folder ships, when it has no ``images/`` (else [])."""
    if ws.is_demo or (ws.dataset_dir / "images").is_dir():
        return []
    return [name for name in BACKBONES if bring_your_own.find(ws.dataset_dir, name) is not None]


def _resolve_source(
    config: ItemImagesConfig, settings: VisrecSettings, commons: CommonsImageSource
) -> ImageSource | None:
    """The image source, or None for ``none`` (nothing to fetch)."""
    ws = settings.workspace
    images_dir = ws.dataset_dir / "images"
    kind = config.source
    if kind == "auto":  # the demo always has its images on disk, never on Commons
        if images_dir.is_dir() or ws.is_demo:
            kind = "folder"
        else:
            kind = "none" if ships_features_without_images(ws) else "commons"
    if kind == "none":
        return None
    if kind == "folder":
        if not images_dir.is_dir():
            raise dg.Failure(f"source=folder but the dataset has no images/ folder: {images_dir}")
        return FolderImageSource(images_dir)
    return CommonsImageFetcher(commons.client(), verify_original=commons.verify_original)


def _grid_markdown(store: ImageStore, examples: list[tuple[int, str]]) -> str | None:
    present = [(i, h) for i, h in examples if store.exists(h)]
    if not present:
        return None
    images = [store.open(h, at_least=96) for _, h in present]
    png = image_grid_png(images, captions=[f"item {i}" for i, _ in present], cols=8, tile=96)
    return png_markdown(png, "sample thumbnails")


@dg.asset(
    group_name="images",
    deps=[dg.AssetKey("item_catalog")],
    pool=DUCKDB_POOL,
    code_version=CODE_VERSION,
    kinds={"duckdb", "python"},
    automation_condition=data_side(),
    description="Every catalogued item's image (dataset folder or Wikimedia Commons) validated, turned into a "
    "256x256 JPEG thumbnail and stored content-addressed under images/; table item_images records status and "
    "reason per item. Only items not yet attempted are processed; chunks are committed as they finish.",
)
def item_images(
    context: dg.AssetExecutionContext,
    config: ItemImagesConfig,
    settings: VisrecSettings,
    duckdb: VisrecDuckDB,
    commons: CommonsImageSource,
) -> dg.MaterializeResult:
    ws = settings.workspace
    store = ImageStore.for_workspace(ws)
    temps_removed = remove_leftover_temps(context, store.root)
    source = _resolve_source(config, settings, commons)
    if source is None:
        return _no_images(context, settings, duckdb, temps_removed)
    limits = ImageLimits(max_pixels=config.max_pixels, max_bytes=config.max_bytes)

    def progress(_chunk: int, report: SyncReport) -> None:
        context.log.info(
            f"item_images: {report.processed}/{report.pending} processed ({report.images_per_s:.1f} images/s), "
            f"{report.counts}"
        )

    started = time.perf_counter()
    client = getattr(source, "client", None)
    try:
        report = sync_item_images(
            duckdb.get_connection,
            source,
            store,
            workspace_root=ws.root,
            limits=limits,
            retry_failed=config.retry_failed,
            chunk_size=config.chunk_size,
            workers=config.workers,
            pool_kind=config.pool,
            on_chunk=progress,
        )
    finally:
        if client is not None:
            client.close()

    with duckdb.get_connection() as conn:
        summary = images_table.catalogue_status_summary(conn)
        failures = images_table.recent_failures(conn, limit=10)
        n_rows = images_table.row_count(conn)
        examples = report.ok_examples or images_table.ok_hashes(conn, limit=GRID_SIZE)

    counts = {s: 0 for s in (*STATUSES, "pending")}
    counts.update({str(r.status): int(r.items) for r in summary.itertuples()})
    metadata: dict[str, object] = {
        "source": source.name,
        "dagster/row_count": n_rows,
        "catalogued_items": int(summary["items"].sum()) if not summary.empty else 0,
        **{f"status_{s}": n for s, n in counts.items()},
        "processed_this_run": report.processed,
        "this_run_by_status": dg.MetadataValue.json(report.counts),
        "throughput_images_per_s": round(report.images_per_s, 2),
        "ms_per_image": round(1000 * report.elapsed_s / report.processed, 2) if report.processed else 0.0,
        "elapsed_s": round(time.perf_counter() - started, 2),
        "status_counts": dg.MetadataValue.md(md_table(summary)),
        "image_store": dg.MetadataValue.path(str(store.root)),
        "temp_files_removed": temps_removed,
    }
    if client is not None:
        metadata["http_retries"] = client.retries
    if not failures.empty:
        metadata["failures"] = dg.MetadataValue.md(md_table(failures))
    grid = _grid_markdown(store, examples[:GRID_SIZE])
    if grid:
        metadata["sample_thumbnails"] = dg.MetadataValue.md(grid)
    return dg.MaterializeResult(metadata=metadata)


def _no_images(
    context: dg.AssetExecutionContext, settings: VisrecSettings, duckdb: VisrecDuckDB, temps_removed: int
) -> dg.MaterializeResult:
    """source none: the table exists (downstream reads it) and nothing is fetched."""
    ws = settings.workspace
    brought = ships_features_without_images(ws)
    with duckdb.get_connection() as conn:
        images_table.ensure_table(conn)
        summary = images_table.catalogue_status_summary(conn)
        n_rows = images_table.row_count(conn)
    context.log.info(
        f"item_images: source none: the dataset folder {ws.dataset_dir} has no images/ "
        f"{'and ships features for ' + ', '.join(brought) if brought else ''}; nothing fetched. Models that "
        "train on pixels (DVBPR) need images: add images/ or set source: commons."
    )
    return dg.MaterializeResult(
        metadata={
            "source": "none",
            "dagster/row_count": n_rows,
            "catalogued_items": int(summary["items"].sum()) if not summary.empty else 0,
            "brought_features": ", ".join(brought) or "none",
            "processed_this_run": 0,
            "temp_files_removed": temps_removed,
        }
    )


def min_image_share() -> float:
    """The floor of ``item_images_ok_share`` from ``VISREC_MIN_IMAGE_SHARE`` (default 0.9)."""
    raw = os.environ.get(MIN_IMAGE_SHARE_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_IMAGE_SHARE
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{MIN_IMAGE_SHARE_ENV} must be a number in [0, 1], got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{MIN_IMAGE_SHARE_ENV} must be in [0, 1], got {value}")
    return value


@dg.asset_check(
    asset=item_images,
    pool=DUCKDB_POOL,
    description=f"Share of catalogued items with an ok image >= {MIN_IMAGE_SHARE_ENV} (default "
    f"{DEFAULT_MIN_IMAGE_SHARE}).",
)
def item_images_ok_share(settings: VisrecSettings, duckdb: VisrecDuckDB) -> dg.AssetCheckResult:
    floor = min_image_share()
    with duckdb.get_connection() as conn:
        total, ok = images_table.catalogued_and_ok(conn)
    share = ok / total if total else 0.0
    brought = ships_features_without_images(settings.workspace) if ok == 0 else []
    description = None if total else "item_catalog is empty"
    if brought and total:
        description = f"no images expected: the dataset ships features ({', '.join(brought)}) and no images/"
    return dg.AssetCheckResult(
        passed=bool(total) and (share >= floor or bool(brought)),
        metadata={"ok_items": int(ok), "catalogued_items": int(total), "ok_share": round(share, 4), "floor": floor},
        description=description,
    )


@dg.asset_check(
    asset=item_images,
    pool=DUCKDB_POOL,
    description="Every ok row's thumbnail file exists and its SHA-256 equals content_hash.",
)
def item_images_files_intact(settings: VisrecSettings, duckdb: VisrecDuckDB) -> dg.AssetCheckResult:
    ws = settings.workspace
    with duckdb.get_connection() as conn:
        rows = images_table.ok_files(conn)
    store = ImageStore.for_workspace(ws)
    missing, mismatched, misplaced = [], [], []
    for item_id, h, rel in rows:  # hashing ~20 KB per thumbnail; the connection is closed meanwhile
        try:
            expected = store.relative_path(h)
        except ValueError:  # not a SHA-256 digest
            expected = None
        if expected is None or rel != expected:
            misplaced.append(item_id)
            continue
        path = store.path_for(h)  # built from the validated hash, never from the stored string
        if not path.is_file():
            missing.append(item_id)
        elif file_sha256(path) != h:
            mismatched.append(item_id)
    bad = len(missing) + len(mismatched) + len(misplaced)
    return dg.AssetCheckResult(
        passed=bad == 0,
        metadata={
            "ok_rows": len(rows),
            "files_missing": len(missing),
            "hash_mismatches": len(mismatched),
            "path_not_content_addressed": len(misplaced),
            "examples": dg.MetadataValue.json({"missing": missing[:10], "mismatched": mismatched[:10], "misplaced": misplaced[:10]}),
        },
    )


defs = dg.Definitions(assets=[item_images], asset_checks=[item_images_ok_share, item_images_files_intact])
