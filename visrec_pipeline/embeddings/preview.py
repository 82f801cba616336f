"""PNG previews of features: query images with their cosine nearest neighbours, samples per cluster."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

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
    """The shared ``reporting.grids.image_grid_png`` when present, else a minimal local grid."""
    try:
        from visrec_pipeline.reporting.grids import image_grid_png
    except ImportError:
        return _grid_png(images, captions, cols, outline)
    return image_grid_png(images, captions=captions, cols=cols, outline=outline)


def _grid_png(images, captions=None, cols=6, outline=None, pad=4, caption_h=14) -> bytes:
    if not images:
        images = [Image.new("RGB", (TILE, TILE), (127, 127, 127))]
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, im in enumerate(images):
        x = pad + (k % cols) * (w + pad)
        y = pad + (k // cols) * (h + caption_h + pad)
        sheet.paste(im.resize((w, h)), (x, y))
        if outline is not None and outline[k]:
            draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=outline[k], width=3)
        if captions is not None and captions[k]:
            draw.text((x, y + h + 1), str(captions[k])[:18], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


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
            captions.append(f"{i} cos {s:.2f}" if i >= 0 else "")
            outline.append(None)
    return grid_png(images, captions, cols=k + 1, outline=outline)
