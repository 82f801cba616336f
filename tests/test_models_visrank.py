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
from visrec_pipeline.recsys.neighbours import UNREACHED, neighbour_scores, top_k_neighbours
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


def planted_batch(n_users=40, n_items=120, seed=1):
    syn = planted_dataset(n_users, n_items, seed=seed)
    items, mask = syn.data.train.padded()
    return syn, ScoreBatch(torch.arange(syn.data.n_users), items, mask)


def test_neighbour_search_is_exact():
    syn, _ = planted_batch()
    F = torch.nn.functional.normalize(torch.as_tensor(syn.features), dim=1)
    items, sims = top_k_neighbours(F, 7, max_block_elements=50)  # blocks of a single query row
    full = F @ F.T
    expected = full.sort(dim=1, descending=True).values[:, :7]
    np.testing.assert_allclose(sims.numpy(), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(full.gather(1, items.long()).numpy(), sims.numpy(), atol=1e-6)
    assert items.dtype == torch.int32 and top_k_neighbours(F, 10_000)[0].shape == (120, 120)


@pytest.mark.parametrize("agg", ["max", "topk_mean"])
def test_neighbour_scoring_with_every_item_equals_brute_force(agg):
    syn, batch = planted_batch()
    exact = VisRank(VisRankConfig(agg=agg, top_t=3, scoring="exact", device="cpu"))
    nbr = VisRank(VisRankConfig(agg=agg, top_t=3, scoring="neighbours", neighbours_k=500, device="cpu"))
    tiny = VisRank(VisRankConfig(agg=agg, top_t=3, scoring="neighbours", neighbours_k=500, max_block_elements=1, device="cpu"))
    for m in (exact, nbr, tiny):
        notes = m.fit(syn.data, syn.inputs()).notes
    assert notes["scoring"] == "neighbours" and notes["neighbours_k"] == 120
    np.testing.assert_allclose(nbr.score(batch).numpy(), exact.score(batch).numpy(), atol=1e-6)
    np.testing.assert_allclose(tiny.score(batch).numpy(), exact.score(batch).numpy(), atol=1e-6)
    # empty profiles still score 0
    empty = ScoreBatch(torch.tensor([-1]), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool))
    assert torch.count_nonzero(nbr.score(empty)) == 0


def test_small_k_keeps_the_provable_top_of_the_max_ranking():
    syn, batch = planted_batch(seed=2)
    k = 10
    exact = VisRank(VisRankConfig(scoring="exact", device="cpu"))
    nbr = VisRank(VisRankConfig(scoring="neighbours", neighbours_k=k, device="cpu"))
    for m in (exact, nbr):
        m.fit(syn.data, syn.inputs())
    want, got = exact.score(batch).numpy(), nbr.score(batch).numpy()
    sims = nbr.neighbours[1].numpy()
    items, mask = batch.profile_items.numpy(), batch.profile_mask.numpy()
    checked = 0
    for r in range(items.shape[0]):
        # T: the largest k-th neighbour similarity over the profile; above it the scores are exact
        T = sims[items[r][mask[r]], k - 1].max()
        above = got[r] > T + 1e-6
        assert above.any()
        np.testing.assert_allclose(got[r][above], want[r][above], atol=1e-6)
        n_top = int(above.sum())
        top_exact = np.argsort(-want[r], kind="stable")[:n_top]
        assert set(top_exact.tolist()) == set(np.flatnonzero(above).tolist())
        # nothing else is over-estimated: a neighbour score is a lower bound or UNREACHED
        assert (got[r] <= want[r] + 1e-6).all()
        checked += n_top
    assert checked > items.shape[0]
    assert (got == UNREACHED).any(), "with k = 10 of 120 items some items are unreached"


def test_neighbour_table_round_trips_through_the_checkpoint_state():
    syn, batch = planted_batch()
    m = VisRank(VisRankConfig(scoring="neighbours", neighbours_k=5, device="cpu"))
    m.fit(syn.data, syn.inputs())
    state = m.state_dict()
    assert state["neighbour_items"].shape == (120, 5) and state["neighbour_sims"].dtype == torch.float32
    again = VisRank(VisRankConfig(scoring="neighbours", neighbours_k=5, device="cpu"))
    again.attach_inputs(syn.data, syn.inputs())
    again.load_state_dict(state)
    assert torch.equal(again.score(batch), m.score(batch))
    wrong_k = VisRank(VisRankConfig(scoring="neighbours", neighbours_k=6, device="cpu"))
    wrong_k.attach_inputs(syn.data, syn.inputs())
    with pytest.raises(ValueError, match="neighbour table"):
        wrong_k.load_state_dict(state)
    # auto: exact for a small catalogue, neighbours above exact_max_items; mean is always exact
    assert "neighbour_items" not in fitted().state_dict()
    auto = VisRank(VisRankConfig(exact_max_items=100, neighbours_k=5, device="cpu"))
    assert auto.fit(syn.data, syn.inputs()).notes["scoring"] == "neighbours"
    mean = VisRank(VisRankConfig(agg="mean", scoring="neighbours", device="cpu"))
    assert mean.fit(syn.data, syn.inputs()).notes["scoring"] == "exact"
    with pytest.raises(ValueError, match="agg"):
        neighbour_scores(batch.profile_items, batch.profile_mask, state["neighbour_items"], state["neighbour_sims"], agg="mean")


def test_ivf_neighbour_search_keeps_the_planted_taste_and_reports_its_recall():
    syn = planted_dataset(200, 600, seed=0)
    cfg = dict(scoring="neighbours", neighbours_k=50, device="cpu")
    exact = VisRank(VisRankConfig(neighbour_search="exact", **cfg))
    ivf = VisRank(VisRankConfig(neighbour_search="ivf", ivf_list_size=30, ivf_probe=3, **cfg))
    notes = {m.config.neighbour_search: m.fit(syn.data, syn.inputs()).notes for m in (exact, ivf)}
    assert notes["exact"]["neighbour_search"] == "exact" and "neighbour_recall" not in notes["exact"]
    assert notes["ivf"]["neighbour_search"] == "ivf" and notes["ivf"]["recall_queries"] == 256
    assert 0.95 <= notes["ivf"]["neighbour_recall"] <= 1.0, notes["ivf"]
    # each item's nearest neighbours (itself aside) are items of its own planted cluster
    nearest = ivf.neighbours[0][:, 1:6].long().numpy()
    assert (syn.clusters[nearest] == syn.clusters[:, None]).mean() > 0.95
    aucs = {name: evaluate(m.score, syn.data.holdout, syn.data.n_items, ks=()).means["auc"] for name, m in (("exact", exact), ("ivf", ivf))}
    assert aucs["ivf"] > 0.8 and abs(aucs["ivf"] - aucs["exact"]) < 0.02, aucs
    # the IVF table goes through the checkpoint like the exact one
    again = VisRank(VisRankConfig(neighbour_search="ivf", ivf_list_size=30, ivf_probe=3, **cfg))
    again.attach_inputs(syn.data, syn.inputs())
    again.load_state_dict(ivf.state_dict())
    items, mask = syn.data.train.padded()
    batch = ScoreBatch(torch.arange(syn.data.n_users), items, mask)
    assert torch.equal(again.score(batch), ivf.score(batch))
    # auto: exact search up to exact_search_max_items, IVF above
    small = VisRank(VisRankConfig(**cfg))
    large = VisRank(VisRankConfig(exact_search_max_items=599, ivf_list_size=30, **cfg))
    assert small.fit(syn.data, syn.inputs()).notes["neighbour_search"] == "exact"
    assert large.fit(syn.data, syn.inputs()).notes["neighbour_search"] == "ivf"
    with pytest.raises(ValueError, match="neighbour_search"):
        VisRank(VisRankConfig(neighbour_search="hnsw"))
    with pytest.raises(ValueError, match="ivf_probe"):
        VisRank(VisRankConfig(ivf_probe=0))
