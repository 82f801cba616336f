"""VisRank: aggregations on a hand-made case, blocking, masks, centring, real ranking quality."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.visrank import VisRank, VisRankConfig
from visrec_pipeline.recsys.synthetic import planted_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# items 0..4 in 2-d; item 5 has no image (mask False, features ignored)
FEATS = np.array([[1, 0], [0, 1], [2, 2], [1, -1], [3, 4], [9, 9]], np.float32)
MASK = np.array([True, True, True, True, True, False])


def fitted(**cfg) -> VisRank:
    data = RecData.from_frames(pd.DataFrame({"user_id": [1], "item_id": [0], "ts": [0]}), np.arange(6))
    model = VisRank(VisRankConfig(device="cpu", center=cfg.pop("center", False), **cfg))
    model.fit(data, FitInputs(features=FEATS, feature_mask=MASK))
    return model


def profile_batch(profiles, users=None) -> ScoreBatch:
    L = max(len(p) for p in profiles)
    items = torch.zeros((len(profiles), L), dtype=torch.long)
    mask = torch.zeros((len(profiles), L), dtype=torch.bool)
    for r, p in enumerate(profiles):
        items[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = True
    users = torch.full((len(profiles),), -1) if users is None else torch.tensor(users)
    return ScoreBatch(users, items, mask)


def test_aggregations_by_hand():
    # profile {0, 1, 3}; item 4 = (0.6, 0.8): cosines 0.6, 0.8, (0.6 - 0.8)/sqrt(2)
    c3 = (0.6 - 0.8) / np.sqrt(2)
    batch = profile_batch([[0, 1, 3]])
    s_max = fitted(agg="max").score(batch)[0].numpy()
    s_mean = fitted(agg="mean").score(batch)[0].numpy()
    s_top2 = fitted(agg="topk_mean", top_t=2).score(batch)[0].numpy()
    assert s_max[4] == pytest.approx(0.8, abs=1e-6)
    assert s_mean[4] == pytest.approx((0.6 + 0.8 + c3) / 3, abs=1e-6)
    assert s_top2[4] == pytest.approx(0.7, abs=1e-6)
    # item 2 = (1, 1)/sqrt(2): cosines 0.7071, 0.7071, 0
    r = 1 / np.sqrt(2)
    assert s_max[2] == pytest.approx(r, abs=1e-6)
    assert s_mean[2] == pytest.approx(2 * r / 3, abs=1e-6)
    assert s_top2[2] == pytest.approx(r, abs=1e-6)
    # a profile item scores its own similarity 1 under max
    assert s_max[0] == pytest.approx(1.0, abs=1e-6)
    # the item without features scores 0 (zero vector)
    assert s_max[5] == 0.0 and s_mean[5] == 0.0
    # top-t with t >= profile length is the mean
    s_top9 = fitted(agg="topk_mean", top_t=9).score(batch)[0].numpy()
    np.testing.assert_allclose(s_top9, s_mean, atol=1e-6)


def test_masked_and_featureless_profile_items_are_ignored():
    m = fitted(agg="mean")
    with_missing = profile_batch([[0, 5]])  # item 5 has no features
    only = profile_batch([[0]])
    assert torch.allclose(m.score(with_missing), m.score(only))
    # padding positions (mask False) are ignored even if they point at a real item
    b = ScoreBatch(torch.tensor([-1]), torch.tensor([[0, 4]]), torch.tensor([[True, False]]))
    assert torch.allclose(fitted().score(b), fitted().score(only))
    # a profile with nothing usable scores 0 everywhere
    for agg in ("max", "mean", "topk_mean"):
        assert torch.count_nonzero(fitted(agg=agg).score(profile_batch([[5]]))) == 0


def test_blocks_give_the_same_scores():
    syn = planted_dataset(40, 120, seed=1)
    items, mask = syn.data.train.padded()
    batch = ScoreBatch(torch.arange(syn.data.n_users), items, mask)
    for agg in ("max", "topk_mean"):
        big = VisRank(VisRankConfig(agg=agg, top_t=3, device="cpu"))
        small = VisRank(VisRankConfig(agg=agg, top_t=3, max_block_elements=1, device="cpu"))
        for m in (big, small):
            m.fit(syn.data, syn.inputs())
        np.testing.assert_allclose(big.score(batch).numpy(), small.score(batch).numpy(), atol=1e-6)
        # a direct computation: the full [b, L, n] cosine tensor
        F = torch.nn.functional.normalize(torch.as_tensor(syn.features), dim=1)
        sims = torch.einsum("bld,nd->bln", F[items], F).masked_fill(~mask.unsqueeze(2), -torch.inf)
        if agg == "max":
            expected = sims.amax(1)
        else:
            top = sims.topk(3, dim=1).values
            ok = torch.isfinite(top)
            expected = torch.where(ok, top, 0.0).sum(1) / ok.sum(1)
        np.testing.assert_allclose(big.score(batch).numpy(), expected.numpy(), atol=1e-5)


def test_centering_subtracts_the_mean_of_items_with_features():
    m = fitted(center=True)
    X = FEATS[MASK] - FEATS[MASK].mean(0)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(m.features[:5].numpy(), X, atol=1e-6)
    assert torch.count_nonzero(m.features[5]) == 0


def test_visrank_recovers_planted_visual_taste():
    syn = planted_dataset(200, 300, seed=0)
    aucs = {}
    for agg in ("max", "mean", "topk_mean"):
        m = VisRank(VisRankConfig(agg=agg, device="cpu"))
        m.fit(syn.data, syn.inputs())
        aucs[agg] = evaluate(m.score, syn.data.holdout, syn.data.n_items, ks=()).means["auc"]
    assert min(aucs.values()) > 0.8, aucs


def test_state_checks_and_errors():
    m = fitted()
    state = m.state_dict()
    assert {k: int(v) for k, v in state.items()} == {"n_items": 6, "feature_dim": 2}
    fresh = VisRank(VisRankConfig(device="cpu"))
    with pytest.raises(RuntimeError, match="attach_inputs"):
        fresh.load_state_dict(state)
    data = RecData.from_frames(pd.DataFrame({"user_id": [1], "item_id": [0], "ts": [0]}), np.arange(6))
    fresh.attach_inputs(data, FitInputs(features=FEATS, feature_mask=MASK))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.score(profile_batch([[0, 1]])), m.score(profile_batch([[0, 1]])))
    with pytest.raises(ValueError, match="agg"):
        VisRank(VisRankConfig(agg="median"))
    with pytest.raises(ValueError, match="features"):
        VisRank().fit(data, FitInputs())
    with pytest.raises(ValueError, match="shape"):
        VisRank().fit(data, FitInputs(features=FEATS[:4]))
    bad = FEATS.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        VisRank().fit(data, FitInputs(features=bad))
