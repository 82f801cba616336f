"""ACF's attentions as a picture: which profile items, and which regions of them, drove a recommendation.

One row per user: the top-1 recommended item (plain thumbnail, outlined), then the user's
profile items ranked by ACF's item-level attention ``a_l`` (weight in the caption). Each
profile thumbnail carries its own component attention ``b_lm``: the softmax over the
``h x w`` regions of the CNN feature map *of that profile image* (ResNet-50 ``layer4``: 7 x 7),
upsampled and blended over it. The recommended item gets no heat map: ACF attends over the
profile's regions, never over the candidate's.

:func:`explain_rows` turns a trained ACF and holdout rows into :class:`AttentionRow`\\ s;
:func:`attention_panel_png` renders them (with :func:`~visrec_pipeline.reporting.grids.image_grid_png`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from visrec_pipeline.reporting.grids import image_grid_png

ImageLike = Image.Image | np.ndarray


@dataclass
class AttentionRow:
    """What one user's row shows (item indices; ``regions[k]`` belongs to ``profile[k]``)."""

    user_label: str
    top_item: int
    top_hit: bool  # the recommendation is one of the user's held-out items
    profile: list[int]  # ranked by item attention, best first
    item_attention: list[float]
    regions: np.ndarray  # float [len(profile), R]: component attention over each profile image's regions
    profile_size: int  # the whole profile (more than ``profile`` when truncated)


def region_grid(n_regions: int) -> tuple[int, int]:
    """``(h, w)`` of a square region grid (49 -> 7 x 7); the layer4 map is square for square inputs."""
    side = math.isqrt(n_regions)
    if side * side != n_regions:
        raise ValueError(f"{n_regions} regions do not form a square grid")
    return side, side


def overlay_heatmap(
    image: ImageLike, weights: np.ndarray, *, size: int = 224, crop_fraction: float = 1.0, alpha: float = 0.55
) -> Image.Image:
    """``image`` resized to ``size`` with ``weights`` (``[R]``, row-major over the region grid) upsampled
    bilinearly and blended over the central ``crop_fraction`` of it (the part the CNN saw).

    The map is min-max scaled per image: colours compare regions within one image (a uniform map
    is all blue: no region stands out); :func:`peak_ratio` says how strongly the hottest one stands out.
    """
    from matplotlib import colormaps

    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    w = np.asarray(weights, np.float32).reshape(region_grid(np.asarray(weights).size))
    base = _rgb(image).resize((size, size), Image.Resampling.BILINEAR)
    side = max(1, round(size * crop_fraction))
    span = float(w.max() - w.min())
    norm = (w - w.min()) / span if span > 1e-12 else np.zeros_like(w)
    heat = Image.fromarray(norm, mode="F").resize((side, side), Image.Resampling.BILINEAR)
    rgb = (colormaps["jet"](np.clip(np.asarray(heat), 0.0, 1.0))[..., :3] * 255).astype(np.uint8)
    off = (size - side) // 2
    region = base.crop((off, off, off + side, off + side))
    base.paste(Image.blend(region, Image.fromarray(rgb), alpha), (off, off))
    return base


def peak_ratio(weights: np.ndarray) -> float:
    """The hottest region's weight over the uniform weight ``1 / R`` (1.0: no region stands out)."""
    w = np.asarray(weights, np.float64).reshape(-1)
    return float(w.max() * w.size / max(w.sum(), 1e-12))


def _rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def attention_panel_png(
    rows: Sequence[AttentionRow],
    image_of: Callable[[int], ImageLike],
    *,
    item_label: Callable[[int], str] = str,
    max_profile: int = 7,
    tile: int = 160,
    crop_fraction: float = 1.0,
) -> bytes:
    """The panel: ``len(rows)`` rows of ``1 + max_profile`` tiles (blank where a profile is shorter)."""
    if not rows:
        raise ValueError("attention_panel_png: no rows to draw")
    cols = 1 + max_profile
    blank = Image.new("RGB", (tile, tile), (255, 255, 255))
    images: list[ImageLike] = []
    captions: list[str | None] = []
    outline: list[str | None] = []
    for row in rows:
        images.append(_rgb(image_of(row.top_item)).resize((tile, tile), Image.Resampling.BILINEAR))
        captions.append(f"{row.user_label} top-1 {item_label(row.top_item)}")
        outline.append("green" if row.top_hit else "blue")
        shown = min(max_profile, len(row.profile))
        for k in range(shown):
            item = row.profile[k]
            images.append(
                overlay_heatmap(image_of(item), row.regions[k], size=tile, crop_fraction=crop_fraction)
            )
            captions.append(f"a={row.item_attention[k]:.2f} x{peak_ratio(row.regions[k]):.1f} {item_label(item)}")
            outline.append(None)
        images.extend([blank] * (max_profile - shown))
        captions.extend([None] * (max_profile - shown))
        outline.extend([None] * (max_profile - shown))
    return image_grid_png(images, captions=captions, cols=cols, outline=outline, tile=tile)


@torch.no_grad()
def explain_rows(
    model,
    holdout,
    rows: Sequence[int],
    *,
    max_profile: int = 7,
    user_labels: Sequence[str] | None = None,
) -> list[AttentionRow]:
    """Top-1 recommendation (profile excluded, ties by item index) and both attentions of ``model``
    (an :class:`~visrec_pipeline.recsys.models.acf.ACF`) for the holdout ``rows``."""
    from visrec_pipeline.recsys.base import ScoreBatch

    rows = np.asarray(rows, np.int64)
    items, mask = holdout.profile.padded(rows)
    batch = ScoreBatch(torch.as_tensor(holdout.user_idx[rows]), items, mask)
    scores = model.score(batch).float().cpu()
    n_items = scores.shape[1]
    # consumed items are never recommended; ties go to the lower item index (as in evaluation)
    scores[torch.arange(len(rows)).unsqueeze(1).expand_as(items)[mask], items[mask]] = -math.inf
    top = torch.argmax(scores, dim=1)  # argmax returns the first maximum: the lowest index
    item_att, comp_att = (t.float().cpu() for t in model.explain(batch))
    order = torch.argsort(-item_att, dim=1, stable=True)
    out = []
    for r in range(len(rows)):  # a handful of report rows; every tensor op above is batched
        # attended slots (the most recent ``max_profile_len``) carry a region distribution, even where a
        # saturated item softmax underflows to exactly 0; padding and older slots carry none
        attended = comp_att[r, order[r]].sum(-1) > 0
        keep = order[r][attended][:max_profile]
        predict = set(holdout.predict.row(int(rows[r])).tolist())
        t = int(top[r])
        if not 0 <= t < n_items or not torch.isfinite(scores[r, t]):
            continue  # nothing left to recommend
        out.append(
            AttentionRow(
                user_label=user_labels[r] if user_labels is not None else f"row {int(rows[r])}",
                top_item=t,
                top_hit=t in predict,
                profile=items[r, keep].tolist(),
                item_attention=item_att[r, keep].tolist(),
                regions=comp_att[r, keep].numpy(),
                profile_size=int(mask[r].sum()),
            )
        )
    return out
