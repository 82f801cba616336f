"""What a pool worker does with one image: validate, thumbnail, store, describe the outcome as a row.

Kept apart from ``sync`` so a process-pool worker imports only Pillow and
numpy (not pandas or DuckDB) and starts quickly. Functions here are top-level
so they pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

from visrec_pipeline.images.store import ImageStore
from visrec_pipeline.images.validate import ImageLimits, ImageResult, make_thumbnail, make_thumbnail_from_file

ROW_COLUMNS = ("item_id", "status", "reason", "content_hash", "path", "orig_width", "orig_height", "source")


@dataclass(frozen=True)
class ItemImageRow:
    """One row of ``item_images`` (``updated_at`` is set by the upsert)."""

    item_id: int
    status: str
    reason: str
    content_hash: str | None = None
    path: str | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    source: str = ""


def _stored(item_id: int, result: ImageResult, store_root: str, source: str) -> ItemImageRow:
    if not result.ok:
        return ItemImageRow(
            item_id, result.status.value, result.reason, None, None, result.orig_width, result.orig_height, source
        )
    h, rel = ImageStore(store_root).put(result.thumbnail)
    return ItemImageRow(item_id, "ok", result.reason, h, rel, result.orig_width, result.orig_height, source)


def thumbnail_file_to_store(
    item_id: int, path: str, store_root: str, limits: ImageLimits, source: str = "folder"
) -> ItemImageRow:
    """Worker: validate the file at ``path``, store its thumbnail, return the row."""
    return _stored(item_id, make_thumbnail_from_file(path, limits), store_root, source)


def thumbnail_bytes_to_store(
    item_id: int, data: bytes, store_root: str, limits: ImageLimits, source: str = "commons"
) -> ItemImageRow:
    """Worker: validate downloaded bytes, store their thumbnail, return the row."""
    return _stored(item_id, make_thumbnail(data, limits), store_root, source)
