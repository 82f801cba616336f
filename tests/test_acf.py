"""ACF: masked attentions, the user vector, recency of the profile, training, PCA reduction, checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.checkpoint import load_checkpoint, save_checkpoint
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.acf import ACF, ACFConfig, ACFModule, masked_softmax, normalised_entropy
from visrec_pipeline.recsys.registry import MODEL_SPECS, build_model
from visrec_pipeline.recsys.synthetic import planted_dataset

REGIONS, CHANNELS = 4, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def syn():
    return planted_dataset(n_users=100, n_items=200, n_clusters=6, dim=CHANNELS, per_user=(6, 30), seed=5)


def _spatial(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """Regions that carry the item's (cluster-structured) features with per-region weights."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.0, (1, REGIONS, 1))
    noise = rng.normal(0, 0.3, (features.shape[0], REGIONS, features.shape[1]))
    return (features[:, None, :] * w + noise).astype(np.float16)


def _config(train: dict | None = None, **kw):
    base = dict(dim=16, attention_dim=16, max_profile_len=8)
    base.update(kw)
    return ACFConfig(train={"epochs": 6, "batch_size": 512, "lr": 1e-2, "device": "cpu", **(train or {})}, **base)


def _batch(holdout, rows=None):
    rows = np.arange(len(holdout)) if rows is None else np.asarray(rows)
    items, mask = holdout.profile.padded(rows)
    return ScoreBatch(torch.as_tensor(holdout.user_idx[rows]), items, mask)


@pytest.fixture(scope="module")
def trained(syn):
    fit, validation = syn.data.validation_split()
    inputs = FitInputs(spatial=_spatial(syn.features), validation=validation)
    model = ACF(_config())
    history = model.fit(fit, inputs)
    return model, history, fit


def test_registered_with_its_needs():
    assert MODEL_SPECS["acf"].needs == frozenset({"spatial:resnet50", "triples_random"})
    assert isinstance(build_model("acf"), ACF)


def test_masked_softmax_sums_to_one_and_zeroes_masked_slots():
    logits = torch.tensor([[1.0, 5.0, -2.0, 0.0], [3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, True]])
    a = masked_softmax(logits, mask)
    assert torch.allclose(a.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.all(a[~mask] == 0)  # exactly zero, not just small
    assert torch.allclose(a[2], torch.softmax(logits[2], 0))
    (a * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[~mask] == 0)


def test_normalised_entropy_is_one_when_uniform_and_zero_on_one_slot():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, False, True, False], [True, False, False, False]])
    h, has_choice = normalised_entropy(w, mask)
    assert has_choice.tolist() == [True, True, True, False]  # one slot: nothing to spread over
    assert torch.allclose(h, torch.tensor([1.0, 0.0, 1.0, 0.0]), atol=1e-6)


def test_the_item_entropy_term_adds_its_weight_times_one_minus_the_entropy():
    torch.manual_seed(0)
    module = ACFModule(n_users=4, n_items=8, region_dim=CHANNELS, dim=8, attention_dim=8)
    module.regions = torch.randn(8, REGIONS, CHANNELS).half()
    module.train_items = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0], [1, 7, 3]])
    module.train_mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True] * 3])
    batch = {"user": torch.tensor([0, 1, 2, 3]), "pos": torch.tensor([1, 4, 6, 5]), "neg": torch.tensor([0, 7, 2, 2])}
    plain = module.loss(batch, item_entropy_weight=0.0)
    with torch.no_grad():
        logits, _ = module.profile_logits(module.user.weight, module.train_items, module.regions)
    # the positive is masked out of its own profile: user 1 keeps item 5 only, user 2 nothing
    mask = module.train_mask & (module.train_items != batch["pos"].unsqueeze(1))
    a = masked_softmax(logits, mask)
    h = [-(a[r][mask[r]] * a[r][mask[r]].log()).sum() / np.log(int(mask[r].sum())) for r in (0, 3)]
    expected = plain + 0.5 * (1 - torch.stack(h)).mean()
    assert torch.allclose(module.loss(batch, item_entropy_weight=0.5), expected, atol=1e-5)
    with pytest.raises(ValueError, match="item_attention_entropy_weight"):
        ACFConfig(item_attention_entropy_weight=-0.1)


def test_regions_are_centred_per_position_before_the_attention(syn):
    fit, _ = syn.data.validation_split()
    spatial = _spatial(syn.features).astype(np.float32)
    spatial += 20.0 * np.arange(REGIONS, dtype=np.float32)[None, :, None]  # each position's own offset
    inputs = FitInputs(spatial=spatial.astype(np.float16))
    centred = ACF(_config({"epochs": 1}))
    centred.fit(fit, inputs)
    raw = ACF(_config({"epochs": 1}, center_regions_by_position=False))
    raw.fit(fit, inputs)
    for model, position_share in ((centred, (0.0, 0.01)), (raw, (0.9, 1.0))):
        table = model.module.regions.float()  # [items, R, C] as the attention sees them (before reduction)
        by_position = table.mean(0).pow(2).sum(1).mean()
        total = table.pow(2).sum(2).mean()
        assert position_share[0] <= float(by_position / total) <= position_share[1]


def test_attention_summary_of_the_validation_users_is_in_the_history(syn, trained):
    model, history, fit = trained
    _, validation = syn.data.validation_split()
    summary = history.notes["attention"]
    assert summary == model.attention_summary(validation)
    item_att, comp_att = model.explain(_batch(validation))
    kept = item_att > 0
    n = kept.sum(1)
    rows = n > 1
    h = [-(a[a > 0] * a[a > 0].log()).sum() / np.log(int(k)) for a, k in zip(item_att[rows], n[rows])]
    assert summary["item_rows"] == int(rows.sum())
    assert summary["item_entropy"] == pytest.approx(float(torch.stack(h).mean()), abs=1e-4)
    assert summary["item_max_share"] == pytest.approx(float(item_att[rows].max(1).values.mean()), abs=1e-4)
    regions = comp_att[kept]
    assert summary["component_images"] == regions.shape[0]
    assert summary["component_max_share"] == pytest.approx(float(regions.max(1).values.mean()), abs=1e-4)
    top = torch.bincount(regions.argmax(1)).max() / regions.shape[0]
    assert summary["component_top_region_share"] == pytest.approx(float(top), abs=1e-4)
    assert 0.0 <= summary["component_entropy"] <= 1.0


def test_training_lowers_the_loss_and_learns_the_planted_structure(syn, trained):
    model, history, _ = trained
    assert history.loss[-1] < history.loss[0]
    notes = history.notes["region_table"]
    assert {k: notes[k] for k in ("regions", "channels_in", "pca_dim")} == {
        "regions": REGIONS, "channels_in": CHANNELS, "pca_dim": None
    }
    assert notes["rms_divided_by"] > 0
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.7


def test_explain_attentions_sum_to_one_and_padding_gets_zero(syn, trained):
    model, _, _ = trained
    batch = _batch(syn.data.holdout, range(30))
    item_att, comp_att = model.explain(batch)
    b, width = batch.profile_items.shape
    assert item_att.shape == (b, width) and comp_att.shape == (b, width, REGIONS)
    kept = item_att > 0
    assert torch.allclose(item_att.sum(1), torch.ones(b), atol=1e-5)
    assert torch.all(item_att[~batch.profile_mask] == 0) and torch.all(comp_att[~batch.profile_mask] == 0)
    assert torch.allclose(comp_att[kept].sum(1), torch.ones(int(kept.sum())), atol=1e-5)
    assert torch.all(kept.sum(1) <= model.config.max_profile_len)


def test_only_the_most_recent_items_are_attended(syn, trained):
    model, _, fit = trained
    batch = _batch(syn.data.holdout, range(40))
    item_att, _ = model.explain(batch)
    order = np.lexsort((fit.train.indices, fit.train_ts, fit.train.row_ids()))
    rows, cols, times = fit.train.row_ids()[order], fit.train.indices[order], fit.train_ts[order]
    ts_of = {(int(u), int(i)): int(t) for u, i, t in zip(rows, cols, times)}
    for r in range(40):
        u = int(batch.user_idx[r])
        items = batch.profile_items[r][batch.profile_mask[r]].tolist()
        # items outside the fit rows (the validation row) are the newest; then by time, then by index
        key = sorted(items, key=lambda i: (ts_of.get((u, i), np.iinfo(np.int64).max), i))
        expected = set(key[-model.config.max_profile_len :])
        attended = {int(batch.profile_items[r][s]) for s in torch.nonzero(item_att[r] > 0).flatten().tolist()}
        assert attended == expected, r


def test_scores_are_the_attentive_user_vector_times_item_embeddings(syn, trained):
    model, _, _ = trained
    batch = _batch(syn.data.holdout, range(12))
    item_att, _ = model.explain(batch)
    module = model.module
    u = module.user(batch.user_idx.clamp(min=0))
    u_prime = u + (item_att.unsqueeze(2) * module.aux(batch.profile_items)).sum(1)
    assert torch.allclose(model.score(batch), u_prime @ module.item.weight.T, atol=1e-4)
    # a user unknown to training: u = 0, the profile's attention alone
    unknown = ScoreBatch(torch.full((12,), -1), batch.profile_items, batch.profile_mask)
    att_unknown, _ = model.explain(unknown)
    expected = (att_unknown.unsqueeze(2) * module.aux(batch.profile_items)).sum(1) @ module.item.weight.T
    assert torch.allclose(model.score(unknown), expected, atol=1e-4)


def test_the_positive_gets_no_attention_in_training():
    torch.manual_seed(0)
    module = ACFModule(n_users=3, n_items=6, region_dim=CHANNELS, dim=8, attention_dim=8)
    module.regions = torch.randn(6, REGIONS, CHANNELS).half()
    # every user's profile holds only item 2, which is also the positive: u' must be u alone
    module.train_items = torch.full((3, 1), 2)
    module.train_mask = torch.ones(3, 1, dtype=torch.bool)
    batch = {"user": torch.tensor([0, 1, 2]), "pos": torch.tensor([2, 2, 2]), "neg": torch.tensor([4, 5, 0])}
    u, v = module.user.weight, module.item.weight
    x = (u * (v[2] - v[batch["neg"]])).sum(1)
    expected = -torch.nn.functional.logsigmoid(x).mean()
    assert torch.allclose(module.loss(batch, mask_positive=True), expected, atol=1e-6)
    assert not torch.allclose(module.loss(batch, mask_positive=False), expected, atol=1e-6)


def test_pca_reduction_and_checkpoint_round_trip(syn, tmp_path):
    fit, _ = syn.data.validation_split()
    inputs = FitInputs(spatial=_spatial(syn.features), feature_mask=np.ones(syn.data.n_items, bool))
    model = ACF(_config({"epochs": 2}, region_pca_dim=6, pca_sample_regions=500))
    history = model.fit(fit, inputs)
    assert history.notes["region_table"]["pca_dim"] == 6 and model.module.reduce.in_features == 6
    again = ACF(_config({"epochs": 2}, region_pca_dim=6, pca_sample_regions=500))
    again.fit(fit, inputs)
    batch = _batch(syn.data.holdout)
    assert torch.equal(model.score(batch), again.score(batch))  # seeded end to end
    path = save_checkpoint(
        tmp_path / "acf.pt",
        model_name="acf",
        config=model.config,
        state=model.state_dict(),
        data_versions={},
        history=history,
    )
    ckpt = load_checkpoint(path)
    fresh = build_model("acf", ckpt["config"])
    fresh.load_state_dict(ckpt["state"])  # no spatial features needed to score
    assert set(ckpt["state"]) >= {"region_cache", "trained_rows"} and "ui_keys" not in ckpt["state"]
    with pytest.raises(RuntimeError, match="attach_inputs"):  # long profiles need the training rows' times
        fresh.score(batch)
    fresh.attach_inputs(syn.data, FitInputs())  # the split it was fitted on minus validation: found
    assert torch.equal(fresh.score(batch), model.score(batch))
    assert torch.equal(fresh.explain(batch)[1], model.explain(batch)[1])


def test_bad_spatial_inputs_are_named(syn):
    fit, _ = syn.data.validation_split()
    with pytest.raises(ValueError, match="FitInputs.spatial"):
        ACF(_config()).fit(fit, FitInputs())
    with pytest.raises(ValueError, match=r"expected \[n_items=200"):
        ACF(_config()).fit(fit, FitInputs(spatial=_spatial(syn.features)[:-1]))
    bad = _spatial(syn.features)
    bad[9, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\[9\]"):
        ACF(_config()).fit(fit, FitInputs(spatial=bad))


def test_a_tiny_dataset_with_one_user():
    frame = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [10, 11, 12], "ts": [3, 1, 2]})
    data = RecData.from_frames(frame, [10, 11, 12, 13])
    model = ACF(_config({"epochs": 1}, max_profile_len=2))
    model.fit(data, FitInputs(spatial=np.ones((4, REGIONS, CHANNELS), np.float16)))
    scores = model.score(ScoreBatch(torch.tensor([0]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)))
    assert scores.shape == (1, 4) and torch.isfinite(scores).all()
    att, _ = model.explain(ScoreBatch(torch.tensor([0]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)))
    assert att[0, 1] == 0 and att[0, 0] > 0 and att[0, 2] > 0  # item 11 (ts 1) is the oldest


def test_a_checkpoint_refuses_data_it_was_not_fitted_on(syn):
    fit, _ = syn.data.validation_split()
    model = ACF(_config({"epochs": 1}, region_pca_dim=6, pca_sample_regions=500))
    model.fit(fit, FitInputs(spatial=_spatial(syn.features), feature_mask=np.ones(syn.data.n_items, bool)))
    state = model.state_dict()
    assert int(state["trained_rows"]) == fit.train.nnz  # a count, not the rows
    fresh = ACF(model.config)
    fresh.load_state_dict(state)
    fewer, _ = fit.validation_split()  # neither it nor its own fit part is what the model saw
    with pytest.raises(ValueError, match=f"fitted on {fit.train.nnz} training rows"):
        fresh.attach_inputs(fewer, FitInputs())
