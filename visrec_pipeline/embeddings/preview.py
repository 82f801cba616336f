"""PNG previews of features: query images with their cosine nearest neighbours, samples per cluster.

Previews are re-rendered on every materialization, most often unchanged (an incremental refresh
adds a few items): :class:`GridCache` keeps the last few PNGs keyed by what they show, and
:func:`stable_sample` picks the same query images run after run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.embeddings.similarity import cosine_neighbours
from visrec_pipeline.embeddings.store import FeatureSnapshot
from visrec_pipeline.reporting.grids import image_grid_png

TILE = 96
_RENDER_VERSION = 1  # bump when the look of a grid changes: cached PNGs are then re-rendered
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_tile(path: Path | None, size: int = TILE) -> Image.Image:
    """The thumbnail at ``path`` scaled to ``size``; a grey tile when it cannot be read."""
    if path is not None:
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4... scale, 2-3x faster than full size
                return im.convert("RGB").resize((size, size))
        except (OSError, ValueError):
            pass
    return Image.new("RGB", (size, size), (127, 127, 127))


def stable_sample(ids: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``ids`` (sorted), chosen by a fixed hash of each id rather than by position: the same
    ones are chosen run after run, and a new id joins only when its hash is among the ``n`` smallest."""
    ids = np.asarray(ids, np.int64)
    if n >= ids.size:
        return np.sort(ids)
    with np.errstate(over="ignore"):  # Fibonacci hashing: the product is meant to wrap around
        h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(29)
    return np.sort(ids[np.argsort(h, kind="stable")[:n]])


class GridCache:
    """The last ``keep`` grid PNGs in ``folder``, keyed by their tiles (path, size and mtime of each
    file), captions, outlines and layout; ``folder=None`` renders every time."""

    def __init__(self, folder: Path | None, keep: int = 4):
        self.folder, self.keep = folder, keep

    def png(
        self, paths: Sequence[Path | None], captions: Sequence[str], cols: int, outline: Sequence | None = None
    ) -> bytes:
        if self.folder is None:
            return _render(paths, captions, cols, outline)
        key = hashlib.sha256(
            json.dumps([_RENDER_VERSION, TILE, cols, [_file_key(p) for p in paths], list(captions), outline]).encode()
        ).hexdigest()[:24]
        cached = self.folder / f"{key}.png"
        try:
            png = cached.read_bytes()
            if png.startswith(_PNG_SIGNATURE):
                os.utime(cached)  # most recently used: kept by the pruning below (never re-creates it)
                return png
        except OSError:  # absent, or pruned by another run meanwhile
            pass
        png = _render(paths, captions, cols, outline)
        try:
            with atomic_path(cached) as tmp:
                tmp.write_bytes(png)
            self._prune()
        except OSError:  # read-only or full disk: a preview is not worth failing a step for
            pass
        return png

    def _prune(self) -> None:
        files = sorted(self.folder.glob("*.png"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in files[self.keep :]:
            old.unlink(missing_ok=True)


def _file_key(path: Path | None) -> list | None:
    if path is None:
        return None
    try:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def _render(paths: Sequence[Path | None], captions: Sequence[str], cols: int, outline: Sequence | None) -> bytes:
    return image_grid_png([load_tile(p) for p in paths], captions=captions, cols=cols, outline=outline, tile=TILE)


def neighbours_png(
    paths: dict[int, Path], query_ids: Sequence[int], neighbour_ids, neighbour_sims, cache: GridCache | None = None
) -> bytes:
    """One row per query: the query (outlined) then its neighbours captioned with cosine similarity."""
    tiles, captions, outline = [], [], []
    k = neighbour_ids.shape[1] if len(query_ids) else 0
    for q, ids, sims in zip(query_ids, neighbour_ids, neighbour_sims):
        tiles.append(paths.get(int(q)))
        captions.append(f"query {int(q)}")
        outline.append("red")
        for i, s in zip(ids.tolist(), sims.tolist()):
            tiles.append(paths.get(i) if i >= 0 else None)
            captions.append(f"{i} cos {s:.3f}" if i >= 0 else "")
            outline.append(None)
    return (cache or GridCache(None)).png(tiles, captions, cols=k + 1, outline=outline)


def cluster_samples_png(
    paths: dict[int, Path], ids: np.ndarray, labels: np.ndarray, n_clusters: int, per_cluster: int,
    cache: GridCache | None = None,
) -> bytes:
    """One row per cluster (the first ``n_clusters``): up to ``per_cluster`` members, lowest ids first."""
    tiles, captions = [], []
    for c in range(n_clusters):
        members = ids[labels == c][:per_cluster]
        for m in range(per_cluster):
            tiles.append(paths.get(int(members[m])) if m < len(members) else None)
            captions.append(f"cluster {c}" if m == 0 else (str(int(members[m])) if m < len(members) else ""))
    return (cache or GridCache(None)).png(tiles, captions, cols=per_cluster)


def neighbour_grid(
    snap: FeatureSnapshot, paths: Mapping[int, Path | None], n_queries: int, k: int, cache: GridCache
) -> bytes | None:
    """:func:`neighbours_png` of ``n_queries`` served items (the same ones refresh after refresh) and
    their ``k`` cosine nearest neighbours; None when there is nothing to show."""
    ids = snap.item_ids
    if len(ids) < 2 or n_queries == 0:
        return None
    query_ids = stable_sample(ids, n_queries)
    qf, _ = snap.pooled(query_ids)
    nn_ids, nn_sims = cosine_neighbours(query_ids, qf, snap.iter_pooled(), k)
    return neighbours_png(paths, query_ids.tolist(), nn_ids, nn_sims, cache)
