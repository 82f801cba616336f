"""Draw an item's latent look (palette, texture, shape, brightness) into an RGB image.

Whole-array numpy drawing: a texture field ``T`` in [0, 1] blends the two
palette colours, a neutral shape is stamped on top. Everything random comes
from the item's own ``render_seed``, so an image depends on nothing else.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

from visrec_pipeline.demo.catalog import BRIGHTNESS, PALETTE_HUES, SHAPES, TEXTURES

JPEG_QUALITY = 82
PNG_COMPRESS_LEVEL = 6

# (value low, value high, saturation low, saturation high) per brightness level.
_TONE = {"dark": (0.28, 0.45, 0.65, 0.95), "mid": (0.55, 0.72, 0.6, 0.9), "light": (0.84, 0.98, 0.35, 0.6)}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _texture(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, w: int, h: int) -> np.ndarray:
    """A [h, w] float32 field in [0, 1]; ``x`` is [1, w], ``y`` is [h, 1], unit = the short side."""
    angle = rng.uniform(0, np.pi)
    along = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
    if kind == "stripes":
        t = np.sin(np.float32(2 * np.pi * rng.uniform(5, 10)) * along)
        return np.clip(t * np.float32(1.25) + np.float32(0.5), 0, 1)  # crisper than a sine
    if kind == "dots":
        step = 1.0 / rng.uniform(5, 9)
        radius = step * rng.uniform(0.25, 0.4)
        u, v = np.mod(x, step) - step / 2, np.mod(y, step) - step / 2
        return (u * u + v * v < radius * radius).astype(np.float32)
    if kind == "checker":
        step = 1.0 / rng.uniform(3.5, 7)
        # Parity of (column cell + row cell) = xor of the two parities, computed on 1-D arrays.
        px = (np.floor(x / step).astype(np.int64) & 1).astype(np.uint8)
        py = (np.floor(y / step).astype(np.int64) & 1).astype(np.uint8)
        return (px ^ py).astype(np.float32)
    if kind == "noise":
        # Smooth value noise: a coarse random grid, upsampled bicubically.
        gx = int(rng.integers(4, 9))
        gy = max(2, round(gx * h / w)) if w >= h else gx
        gx = gx if w >= h else max(2, round(gy * w / h))
        coarse = rng.random((gy, gx)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        lo, hi = float(field.min()), float(field.max())
        return (field - lo) / max(hi - lo, 1e-6)
    if kind == "gradient":
        return np.clip(np.float32(0.5) + along * np.float32(rng.uniform(0.6, 1.0)), 0, 1)
    if kind == "rings":
        cx, cy = rng.uniform(-0.3, 0.3, size=2).astype(np.float32)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return np.float32(0.5) + np.float32(0.5) * np.sin(np.float32(2 * np.pi * rng.uniform(4, 8)) * r)
    raise ValueError(f"unknown texture {kind!r}")


def _shape_mask(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Near the centre, so the 224 centre crop of the feature extractor keeps it.
    cx, cy = rng.uniform(-0.15, 0.15, size=2).astype(np.float32)
    radius = np.float32(rng.uniform(0.18, 0.3))
    dx, dy = x - cx, y - cy
    if kind == "disc":
        return dx * dx + dy * dy < radius * radius
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) < radius * 0.85
    if kind == "triangle":
        return (dy <= 0.7 * radius) & (dy >= -radius + 1.7 * np.abs(dx))
    if kind == "ring":
        r2 = dx * dx + dy * dy
        return (r2 < radius * radius) & (r2 > (0.6 * radius) ** 2)
    if kind == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax < 0.3 * radius) & (ay < radius)) | ((ay < 0.3 * radius) & (ax < radius))
    raise ValueError(f"unknown shape {kind!r}")


def render_image(palette: int, texture: int, shape: int, brightness: int, width: int, height: int, seed: int) -> Image.Image:
    """The ``width`` x ``height`` RGB image of one item."""
    rng = np.random.default_rng(int(seed))
    short = float(min(width, height))
    x = ((np.arange(width, dtype=np.float32) - width / 2) / short)[None, :]
    y = ((np.arange(height, dtype=np.float32) - height / 2) / short)[:, None]

    v_lo, v_hi, s_lo, s_hi = _TONE[BRIGHTNESS[brightness]]
    hue = PALETTE_HUES[palette] + rng.normal(0, 0.012)
    value, sat = rng.uniform(v_lo, v_hi), rng.uniform(s_lo, s_hi)
    first = _hsv(hue, sat, value)
    second = _hsv(hue + rng.uniform(-0.035, 0.035), min(1.0, sat * rng.uniform(0.75, 1.1)), value * rng.uniform(0.55, 0.75))
    # The shape keeps the palette's hue (a tint or a shade), so it adds form, not a new colour.
    light = BRIGHTNESS[brightness] == "light"
    stamp = _hsv(hue, sat * (1.0 if light else 0.45), value * 0.45 if light else min(1.0, value + 0.35))

    # Blend through a 256-entry palette: Pillow maps the quantised field to RGB in C.
    t = _texture(TEXTURES[texture], rng, x, y, width, height)
    levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    table = (np.clip(first * (1.0 - levels) + second * levels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    index = (t * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
    img = Image.frombytes("P", (width, height), np.ascontiguousarray(index).tobytes())
    img.putpalette(table.tobytes())
    img = img.convert("RGB")
    mask = _shape_mask(SHAPES[shape], rng, x, y)
    stamp_rgb = tuple(int(c) for c in (np.clip(stamp, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    img.paste(stamp_rgb, mask=Image.fromarray(np.ascontiguousarray(mask)))
    return img


def render_item(palette: int, texture: int, shape: int, brightness: int, width: int, height: int, seed: int) -> np.ndarray:
    """The [height, width, 3] uint8 RGB array of one item."""
    return np.asarray(render_image(palette, texture, shape, brightness, width, height, seed))


def encode_image(image: Image.Image | np.ndarray, is_png: bool) -> bytes:
    """JPEG bytes, or PNG (RGBA, opaque) bytes; fixed encoder settings so bytes are reproducible."""
    rgb = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8), mode="RGB")
    buf = io.BytesIO()
    if is_png:
        rgba = rgb.copy()
        rgba.putalpha(255)
        rgba.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()
