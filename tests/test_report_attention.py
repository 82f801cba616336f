"""The ACF attention panel: rows from a tiny trained ACF, heat maps over the right images, the PNG's layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.models.acf import ACF, ACFConfig
from visrec_pipeline.recsys.synthetic import planted_dataset
from visrec_pipeline.reporting.attention import (
    AttentionRow,
    attention_panel_png,
    explain_rows,
    overlay_heatmap,
    region_grid,
)

GRID = 3  # a 3 x 3 region grid keeps the model tiny; the pipeline's is 7 x 7
CHANNELS = 12


@pytest.fixture(scope="module")
def acf():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    syn = planted_dataset(n_users=40, n_items=80, n_clusters=4, dim=CHANNELS, per_user=(5, 12), seed=3)
    rng = np.random.default_rng(0)
    spatial = (syn.features[:, None, :] * rng.uniform(0.2, 1.0, (1, GRID * GRID, 1))).astype(np.float16)
    model = ACF(ACFConfig(train={"epochs": 2, "batch_size": 256, "device": "cpu"}, dim=8, attention_dim=8, max_profile_len=6))
    model.fit(syn.data, FitInputs(spatial=spatial))
    yield model, syn
    torch.set_num_threads(before)


def _image_of(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))


def test_rows_rank_profile_items_by_attention_and_exclude_the_profile(acf):
    model, syn = acf
    holdout = syn.data.holdout
    rows = explain_rows(model, holdout, [0, 1, 2, 3], max_profile=4)
    assert len(rows) == 4
    for r, row in zip(range(4), rows):
        profile = set(holdout.profile.indices[holdout.profile.indptr[r] : holdout.profile.indptr[r + 1]].tolist())
        assert row.top_item not in profile  # consumed items are never recommended
        assert set(row.profile) <= profile and 0 < len(row.profile) <= 4
        assert row.item_attention == sorted(row.item_attention, reverse=True)
        assert sum(row.item_attention) <= 1 + 1e-5
        # one component-attention map per shown profile item, a distribution over its regions
        assert row.regions.shape == (len(row.profile), GRID * GRID)
        assert np.allclose(row.regions.sum(1), 1.0, atol=1e-5)


def test_regions_belong_to_the_profile_items_they_are_drawn_on(acf):
    model, syn = acf
    holdout = syn.data.holdout
    (row,) = explain_rows(model, holdout, [5], max_profile=6)
    items, mask = holdout.profile.padded([5])
    from visrec_pipeline.recsys.base import ScoreBatch

    item_att, comp_att = model.explain(ScoreBatch(torch.as_tensor(holdout.user_idx[[5]]), items, mask))
    slot_of = {int(i): s for s, i in enumerate(items[0].tolist()) if mask[0, s]}
    for k, item in enumerate(row.profile):
        assert np.allclose(row.regions[k], comp_att[0, slot_of[item]].numpy())
        assert row.item_attention[k] == pytest.approx(float(item_att[0, slot_of[item]]))


def test_panel_png_has_one_row_per_user_and_one_column_per_shown_item(acf):
    model, syn = acf
    rows = explain_rows(model, syn.data.holdout, [0, 1, 2], max_profile=4)
    tile = 96
    png = attention_panel_png(rows, _image_of, max_profile=4, tile=tile)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    # image_grid_png cells: tile + 2 * pad wide; tile + 2 * pad + a caption line high
    pad, caption = 4, max(9, tile // 11) + 6
    assert img.size == ((1 + 4) * (tile + 2 * pad), 3 * (tile + 2 * pad + caption))


def test_overlay_puts_the_heat_where_the_attention_is():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    weights = np.zeros(49)
    weights[0] = 1.0  # top-left region of the 7 x 7 grid
    out = np.asarray(overlay_heatmap(grey, weights, size=70), np.int16)
    hot, cold = out[:10, :10], out[-10:, -10:]
    # jet: red at the maximum, dark blue at zero
    assert hot[..., 0].mean() > cold[..., 0].mean() + 40
    assert cold[..., 2].mean() > cold[..., 0].mean()
    # only the centre crop the CNN saw gets a heat map
    framed = np.asarray(overlay_heatmap(grey, weights, size=70, crop_fraction=0.8), np.int16)
    assert (framed[:6, :6] == 128).all()


def test_region_grid_and_empty_panel():
    assert region_grid(49) == (7, 7)
    with pytest.raises(ValueError, match="square"):
        region_grid(12)
    with pytest.raises(ValueError, match="no rows"):
        attention_panel_png([], _image_of)
    row = AttentionRow("u", 0, False, [1], [1.0], np.full((1, 4), 0.25), 1)
    png = attention_panel_png([row], _image_of, max_profile=2, tile=32)
    assert Image.open(io.BytesIO(png)).size[0] == 3 * (32 + 8)


def test_report_skips_the_panel_with_a_note_when_acf_is_not_trained(tmp_path):
    from visrec_pipeline.paths import Workspace
    from visrec_pipeline.reporting.acf_panel import acf_attention_panel

    note, png = acf_attention_panel(Workspace.from_settings(tmp_path, "demo"), 3)
    assert png is None and "not trained" in note
    assert not any(tmp_path.iterdir())  # nothing was created
