"""The report's ACF attention panel for a few holdout users of the trained ACF (no dagster)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from visrec_pipeline import db
from visrec_pipeline.model_io import FEATURE_BACKBONE, item_image_paths
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import StaleCheckpointError, checkpoint_path, load_trained
from visrec_pipeline.recsys.registry import MODEL_SPECS
from visrec_pipeline.reporting.attention import attention_panel_png, explain_rows

CANDIDATE_USERS = 64  # the longest profiles, among which users whose top-1 is a hit are shown first


def acf_attention_panel(ws: Workspace, n_users: int) -> tuple[str, bytes | None]:
    """(explanation, PNG) of ACF's attentions for a few holdout users; the PNG is None (and the
    explanation says why) when ACF has no trained checkpoint or one trained on older data."""
    from visrec_pipeline.embeddings.backbones import get_backbone  # torchvision: only when ACF is trained

    if "acf" not in MODEL_SPECS or not checkpoint_path(ws, "acf").exists():
        return "ACF is not trained in this workspace: no attention panel.", None
    try:
        model, data, _inputs, _ckpt = load_trained(ws, "acf")
    except StaleCheckpointError as exc:
        # the report shows what exists: the panel waits for ACF to be trained on the current data
        return f"No ACF attention panel: {exc}", None
    holdout = data.holdout
    if holdout is None or len(holdout) == 0:
        return "No holdout rows: no ACF attention panel.", None
    # candidates: the longest profiles (more items to rank by attention); users whose top-1 is a hit first
    sizes = holdout.profile.lengths()
    candidates = np.lexsort((np.arange(sizes.size), -sizes))[:CANDIDATE_USERS]
    rows = explain_rows(model, holdout, candidates, user_labels=[f"user {u}" for u in holdout.user_ids[candidates]])
    rows = sorted(rows, key=lambda r: not r.top_hit)[:n_users]
    if not rows:
        return "ACF had nothing to recommend to the sampled holdout users: no attention panel.", None
    with db.connect(ws.db_path) as conn:
        paths = item_image_paths(conn, ws, data.items)
    blank = Image.new("RGB", (256, 256), (200, 200, 200))

    def image_of(i: int):
        p = paths[i]
        return Image.open(p).convert("RGB") if p is not None else blank

    transforms = get_backbone(FEATURE_BACKBONE).transforms()
    # the CNN saw the centre crop of the resized thumbnail: the region grid covers that part only
    crop_fraction = float(transforms.crop_size[0]) / float(transforms.resize_size[0])
    png = attention_panel_png(
        rows, image_of, item_label=lambda i: str(int(data.items.ids[i])), crop_fraction=crop_fraction
    )
    note = (
        f"ACF's attentions for {len(rows)} holdout users. Each row: the top-1 recommendation (outlined: green "
        "when it is a held-out item, blue otherwise), then the user's profile items ranked by ACF's item-level "
        "attention `a` (in the caption; it sums to 1 over the most recent "
        f"{model.config.max_profile_len} profile items). The heat map on each *profile* thumbnail is ACF's "
        "component attention over the 7x7 ResNet-50 `layer4` regions of that profile image, scaled per image "
        "(red: the regions that shaped the user's vector most; `xk` in the caption: the hottest region weighs k "
        "times the uniform 1/49); the recommended item has no heat map, as ACF never attends over the "
        "candidate's regions."
    )
    spread = model.attention_summary(holdout)
    note += (
        f" Over all {spread['item_rows']} holdout users with two or more attended items, the item attention's "
        f"normalised entropy (1: uniform, 0: one item) averages {spread['item_entropy']:.2f} and its largest "
        f"weight {spread['item_max_share']:.2f}; over their profile images the component attention's averages "
        f"{spread['component_entropy']:.2f}, and the most common hottest region is the hottest in "
        f"{100 * spread['component_top_region_share']:.0f}% of them."
    )
    return note, png
