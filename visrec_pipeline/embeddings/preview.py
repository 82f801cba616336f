"""PNG previews of features: query images with their cosine nearest neighbours, samples per cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from visrec_pipeline.reporting.grids import image_grid_png

TILE = 96


def load_tile(path: Path | None, size: int = TILE) -> Image.Image:
    """The thumbnail at ``path`` scaled to ``size``; a grey tile when it cannot be read."""
    if path is not None:
        try:
            with Image.open(path) as im:
                return im.convert("RGB").resize((size, size))
        except (OSError, ValueError):
            pass
    return Image.new("RGB", (size, size), (127, 127, 127))


def grid_png(
    images: Sequence[Image.Image], captions: Sequence[str] | None = None, cols: int = 6, outline: Sequence | None = None
) -> bytes:
    return image_grid_png(images, captions=captions, cols=cols, outline=outline, tile=TILE)


def neighbours_png(
    paths: dict[int, Path], query_ids: Sequence[int], neighbour_ids, neighbour_sims
) -> bytes:
    """One row per query: the query (outlined) then its neighbours captioned with cosine similarity."""
    images, captions, outline = [], [], []
    k = neighbour_ids.shape[1] if len(query_ids) else 0
    for q, ids, sims in zip(query_ids, neighbour_ids, neighbour_sims):
        images.append(load_tile(paths.get(int(q))))
        captions.append(f"query {int(q)}")
        outline.append("red")
        for i, s in zip(ids.tolist(), sims.tolist()):
            images.append(load_tile(paths.get(i) if i >= 0 else None))
            captions.append(f"{i} cos {s:.3f}" if i >= 0 else "")
            outline.append(None)
    return grid_png(images, captions, cols=k + 1, outline=outline)
