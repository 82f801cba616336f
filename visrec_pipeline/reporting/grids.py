"""Image grids rendered to PNG bytes (thumbnail overviews, recommendation panels).

Used by ``item_images`` (a sample of stored thumbnails), the embeddings assets
and ``benchmark_report`` (consumed / recommended / ground-truth rows).
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

Color = str | tuple[int, int, int]

_BACKGROUND = (255, 255, 255)
_CAPTION_COLOR = (30, 30, 30)


def _as_image(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWx3 image array, got shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid_png(
    images: Sequence[Image.Image | np.ndarray],
    captions: Sequence[str | None] | None = None,
    cols: int = 8,
    outline: Sequence[Color | None] | None = None,
    *,
    tile: int = 128,
    pad: int = 4,
    outline_width: int = 4,
) -> bytes:
    """A PNG of ``images`` laid out ``cols`` per row, each scaled to fit a ``tile`` square.

    ``images``: PIL images or uint8/float arrays (HxW, HxWx3 or 3xHxW).
    ``captions``: optional text under each tile (shortened to fit).
    ``outline``: optional colour per tile (a name like ``"green"`` or an RGB tuple; None for none).
    An empty list gives a small blank PNG.
    """
    n = len(images)
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    if outline is not None and len(outline) != n:
        raise ValueError(f"{len(outline)} outline colours for {n} images")
    if cols <= 0 or tile <= 0:
        raise ValueError("cols and tile must be positive")
    cols = max(1, min(cols, n)) if n else 1
    rows = max(1, -(-n // cols))
    font_size = max(9, tile // 11)
    font = _font(font_size)
    caption_h = font_size + 6 if captions is not None and any(captions) else 0
    cell_w, cell_h = tile + 2 * pad, tile + 2 * pad + caption_h
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        x0, y0 = c * cell_w + pad, r * cell_h + pad
        im = _as_image(img)
        if max(im.size) != tile:  # fit the longer side to the tile (a new image: callers' images stay as they are)
            scale = tile / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        canvas.paste(im, (x0 + (tile - im.width) // 2, y0 + (tile - im.height) // 2))
        color = outline[k] if outline is not None else None
        if color is not None:
            rgb = ImageColor.getrgb(color) if isinstance(color, str) else tuple(color)
            draw.rectangle(
                (x0 - pad + 1, y0 - pad + 1, x0 + tile + pad - 2, y0 + tile + pad - 2), outline=rgb, width=outline_width
            )
        text = captions[k] if captions is not None else None
        if text:
            text = _fit_text(draw, str(text), font, tile)
            draw.text((x0, y0 + tile + 3), text, fill=_CAPTION_COLOR, font=font)
    buf = io.BytesIO()
    # zlib level 1: 4x faster than Pillow's default 6 on photo grids, about 20 % larger
    canvas.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str = "image") -> str:
    """Markdown embedding ``png`` as a base64 data URI (for ``dg.MetadataValue.md``)."""
    alt = alt.replace("]", ")").replace("[", "(")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
