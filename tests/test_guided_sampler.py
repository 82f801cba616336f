"""CuratorNet's guideline sampler: every guideline's invariants, the margin, dedup, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.guided_sampler import (
    GUIDELINES,
    GuidedSamplerConfig,
    GuidedTripleBatches,
    GuidedTriples,
    artist_ids,
    build_guided_triples,
)
from visrec_pipeline.recsys.synthetic import planted_dataset


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the shared CI box is oversubscribed: 2 OpenMP threads wait on each other far more than they help
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    syn = planted_dataset(n_users=100, n_items=200, n_clusters=8, dim=16, per_user=(6, 25), seed=3)
    rng = np.random.default_rng(7)
    n_items = syn.data.n_items
    creators = np.where(rng.random(n_items) < 0.5, rng.integers(0, 15, n_items), -1)
    cfg = GuidedSamplerConfig(seed=5, margin=0.02, far_negatives=True)  # the paper's filters on
    triples = build_guided_triples(
        syn.data.train, syn.data.train_ts, syn.features, creators=creators, clusters=syn.clusters, config=cfg
    )
    return syn, creators, cfg, triples


def _artist_names(creators, clusters):
    return [f"creator:{c}" if c >= 0 else f"cluster:{k}" for c, k in zip(creators, clusters)]


def _profile(triples: GuidedTriples, t: int) -> np.ndarray:
    return triples.profiles.row(int(triples.profile_id[t]))


def test_every_guideline_produces_triples_and_counts_add_up(world):
    _, _, _, triples = world
    summary = triples.summary()
    assert summary["total"] == len(triples) == sum(v for k, v in summary.items() if k != "total")
    for g, name in GUIDELINES.items():
        assert summary[f"{g}_{name}"] > 0, name
        st = triples.stats[name]
        assert st["triples"] == summary[f"{g}_{name}"]
        assert st["triples_after_margin"] - st["duplicates_dropped"] == st["triples"]
        assert st["positives_proposed"] > 0
    assert set(np.unique(triples.guideline)) == set(GUIDELINES)


def test_positives_come_from_the_right_source(world):
    syn, creators, cfg, triples = world
    train = syn.data.train
    artist = _artist_names(creators, syn.clusters)
    ts_order = np.lexsort((train.indices, syn.data.train_ts, train.row_ids()))
    by_time = train.indices[ts_order]
    for t in range(len(triples)):
        g, u, pos = int(triples.guideline[t]), int(triples.user[t]), int(triples.pos[t])
        P = set(train.row(u).tolist())
        prof = _profile(triples, t)
        profile = set(prof.tolist())
        assert len(profile) == prof.size and profile <= P  # every profile is a subset of the user's items
        if g == 1:  # remove one item, predict it
            assert pos in P and pos not in profile and profile | {pos} == P
        elif g == 2:  # predict the next item in time from the items before it
            seq = by_time[train.indptr[u] : train.indptr[u + 1]].tolist()
            cut = seq.index(pos)
            assert cut >= 1 and profile == set(seq[:cut])
        elif g == 3:  # favourite artists' items outside the profile
            assert profile == P and pos not in P
            counts: dict[str, int] = {}
            for i in P:
                counts[artist[i]] = counts.get(artist[i], 0) + 1
            ranked = sorted(counts.values(), reverse=True)
            threshold = ranked[min(cfg.favourite_artists, len(ranked)) - 1]
            assert counts.get(artist[pos], 0) >= threshold  # one of the user's top artists
        elif g == 4:  # profile items given the whole profile
            assert profile == P and pos in P
        elif g == 5:  # artificial one-item profile, predict the other profile items
            assert prof.size == 1 and pos in P and pos != prof[0]
        elif g == 6:  # artificial one-item profile, same artist
            assert prof.size == 1 and pos != prof[0] and artist[pos] == artist[prof[0]]


def test_negatives_are_outside_the_profile_and_of_another_artist_and_cluster(world):
    syn, creators, _, triples = world
    artist = _artist_names(creators, syn.clusters)
    member = set(zip(syn.data.train.row_ids().tolist(), syn.data.train.indices.tolist()))
    for t in range(len(triples)):
        u, pos, neg = int(triples.user[t]), int(triples.pos[t]), int(triples.neg[t])
        assert (u, neg) not in member
        assert neg not in set(_profile(triples, t).tolist())
        assert artist[neg] != artist[pos]
        assert syn.clusters[neg] != syn.clusters[pos]


def test_margin_holds_under_an_independent_similarity(world):
    syn, creators, cfg, triples = world
    artist = np.array(_artist_names(creators, syn.clusters))
    f = syn.features - syn.features.mean(0) if cfg.center_features else syn.features
    f = f / np.linalg.norm(f, axis=1, keepdims=True)

    def sim(profile: np.ndarray, x: int) -> float:
        visual = float(np.mean(f[profile] @ f[x]))
        share = float(np.mean(artist[profile] == artist[x]))
        return cfg.alpha * visual + (1 - cfg.alpha) * share

    rows = np.random.default_rng(0).choice(len(triples), size=min(400, len(triples)), replace=False)
    for t in rows:
        prof = _profile(triples, t)
        assert sim(prof, int(triples.pos[t])) >= sim(prof, int(triples.neg[t])) + cfg.margin - 1e-5


def test_no_duplicate_triples_and_profiles_are_distinct(world):
    _, _, _, triples = world
    keys = {
        (tuple(_profile(triples, t).tolist()), int(triples.pos[t]), int(triples.neg[t])) for t in range(len(triples))
    }
    assert len(keys) == len(triples)
    contents = {tuple(triples.profiles.row(r).tolist()) for r in range(triples.profiles.n_rows)}
    assert len(contents) == triples.profiles.n_rows
    assert np.array_equal(np.unique(triples.profile_id), np.arange(triples.profiles.n_rows))


def test_deterministic_for_a_seed_and_different_for_another(world):
    syn, creators, cfg, triples = world
    again = build_guided_triples(
        syn.data.train, syn.data.train_ts, syn.features, creators=creators, clusters=syn.clusters, config=cfg
    )
    for key, arr in triples.to_arrays().items():
        assert np.array_equal(arr, again.to_arrays()[key]), key
    other = build_guided_triples(
        syn.data.train,
        syn.data.train_ts,
        syn.features,
        creators=creators,
        clusters=syn.clusters,
        config=GuidedSamplerConfig(seed=6, margin=cfg.margin, far_negatives=True),
    )
    assert not (len(other) == len(triples) and np.array_equal(other.neg, triples.neg))


def test_arrays_round_trip_and_bad_arrays_are_refused(world):
    _, _, _, triples = world
    back = GuidedTriples.from_arrays(triples.to_arrays())
    assert back.summary() == triples.summary()
    assert np.array_equal(back.profiles.indices, triples.profiles.indices)
    arrays = triples.to_arrays()
    arrays["neg"] = arrays["neg"].copy()
    arrays["neg"][0] = 10**6
    with pytest.raises(ValueError, match="neg"):
        GuidedTriples.from_arrays(arrays)
    with pytest.raises(KeyError, match="pos"):
        GuidedTriples.from_arrays({k: v for k, v in triples.to_arrays().items() if k != "pos"})


def test_bad_inputs_are_named(world):
    syn, creators, _, _ = world
    d = syn.data
    with pytest.raises(ValueError, match="features must be"):
        build_guided_triples(d.train, d.train_ts, syn.features[:-1])
    with pytest.raises(ValueError, match="creators"):
        build_guided_triples(d.train, d.train_ts, syn.features, creators=creators[:-1])
    bad = syn.features.copy()
    bad[7, 0] = np.nan
    with pytest.raises(ValueError, match=r"\[7\]"):
        build_guided_triples(d.train, d.train_ts, bad)
    with pytest.raises(ValueError, match="alpha"):
        GuidedSamplerConfig(alpha=2.0)


def test_artist_is_creator_else_cluster_else_the_item_alone():
    a = artist_ids(5, np.array([3, -1, 3, -1, -1]), np.array([0, 0, 1, 1, -1]))
    assert a[0] == a[2]  # same creator, different clusters
    assert a[1] != a[0] and a[1] != a[3]  # cluster 0 vs creator 3 vs cluster 1
    assert len(set(a.tolist())) == 4  # item 4 knows neither: its own artist


def test_batches_cover_each_triple_once_with_its_profile(world):
    _, _, _, triples = world
    batches = GuidedTripleBatches(triples, batch_size=64, seed=1)
    seen = []
    for batch in batches.epoch(0):
        offsets = batch["profile_offsets"].numpy()
        items = batch["profile_items"].numpy()
        for k in range(batch["pos"].shape[0]):
            r = int(batch["triple_profile"][k])
            profile = tuple(items[offsets[r] : offsets[r + 1]].tolist())
            seen.append((profile, int(batch["pos"][k]), int(batch["neg"][k])))
    expected = sorted(
        (tuple(_profile(triples, t).tolist()), int(triples.pos[t]), int(triples.neg[t])) for t in range(len(triples))
    )
    assert sorted(seen) == expected
    # grouped by profile: far fewer distinct profiles per batch than triples; epochs differ; seeded
    assert np.array_equal(batches.order(0), GuidedTripleBatches(triples, batch_size=64, seed=1).order(0))
    assert not np.array_equal(batches.order(0), batches.order(1))
    first = next(iter(batches.epoch(0)))
    assert first["profile_offsets"].shape[0] - 1 < first["pos"].shape[0]


def test_pair_similarity_matches_the_dense_product_with_repeated_and_no_pairs():
    from visrec_pipeline.recsys.data import CSR
    from visrec_pipeline.recsys.guided_sampler import _row_sums, _Similarity

    rng = np.random.default_rng(1)
    n_items, d = 30, 8
    fhat = torch.from_numpy(rng.standard_normal((n_items, d)).astype(np.float32))
    rows = rng.integers(0, 6, 40)
    profiles = CSR.from_pairs(rows, rng.integers(0, n_items, 40), 6, n_items)
    artist = rng.integers(0, 4, n_items)
    sim = _Similarity(profiles, _row_sums(profiles.indptr, profiles.indices, fhat), fhat, artist, alpha=1.0)
    dense = profiles.to_dense() @ fhat / torch.from_numpy(np.maximum(profiles.lengths(), 1))[:, None].float()
    np.testing.assert_allclose(sim.centroids.numpy(), dense.numpy(), rtol=1e-5, atol=1e-6)
    dense = dense.numpy() @ fhat.numpy().T
    prof = np.array([0, 5, 5, 2, 0, 5, 3])  # repeated pairs, several orders
    items = np.array([3, 7, 7, 0, 3, 29, 11])
    np.testing.assert_allclose(sim(prof, items), dense[prof, items], rtol=1e-5, atol=1e-5)
    assert sim(np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)


def test_prefix_sums_match_summing_each_prefix():
    from visrec_pipeline.recsys.guided_sampler import _prefix_sums

    rng = np.random.default_rng(2)
    lengths = np.array([5, 1, 0, 7, 3])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    t_items = rng.integers(0, 20, lengths.sum())
    fhat = torch.from_numpy(rng.standard_normal((20, 4)).astype(np.float32))
    users = np.array([3, 0, 3, 1, 3, 0, 4, 3])  # unsorted, several cuts per user
    cuts = np.array([7, 2, 1, 1, 4, 5, 3, 2])
    got = _prefix_sums(users, cuts, t_items, starts, fhat).numpy()
    want = np.stack([fhat.numpy()[t_items[starts[u] : starts[u] + c]].sum(0) for u, c in zip(users, cuts)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert _prefix_sums(np.zeros(0, np.int64), np.zeros(0, np.int64), t_items, starts, fhat).shape == (0, 4)


def test_capped_members_takes_small_rows_whole_and_caps_big_ones():
    from visrec_pipeline.recsys.data import CSR
    from visrec_pipeline.recsys.guided_sampler import capped_members

    groups = CSR.from_lists([[0, 1, 2], list(range(3, 103)), [103]], 104)
    rows = np.array([1, 0, 1, 2])
    k, m = capped_members(groups, rows, 5, np.random.default_rng(0))
    assert np.all(np.diff(k) >= 0) and np.bincount(k, minlength=4).tolist()[0] <= 5
    assert m[k == 1].tolist() == [0, 1, 2] and m[k == 3].tolist() == [103]  # at or under the cap: whole
    for big in (0, 2):
        drawn = m[k == big]
        assert 1 <= drawn.size <= 5 and np.unique(drawn).size == drawn.size and set(drawn) <= set(range(3, 103))


def test_capped_sampler_keeps_the_guidelines_and_bounds_the_candidates(world):
    """With a cap far under the artists' sizes (clusters of ~25 items), the six guidelines' invariants
    still hold and G3/G6 rank at most cap candidates per (user, artist) / per one-item profile."""
    syn, creators, _, _ = world
    cap = 3
    cfg = GuidedSamplerConfig(seed=5, margin=0.02, far_negatives=True, candidates_per_artist=cap)
    capped = build_guided_triples(
        syn.data.train, syn.data.train_ts, syn.features, creators=creators, clusters=syn.clusters, config=cfg
    )
    uncapped = build_guided_triples(
        syn.data.train,
        syn.data.train_ts,
        syn.features,
        creators=creators,
        clusters=syn.clusters,
        config=GuidedSamplerConfig(seed=5, margin=0.02, far_negatives=True, candidates_per_artist=10**6),
    )
    n_users = syn.data.train.n_rows
    g3, g6 = capped.stats["favourite_artists"], capped.stats["single_item_same_artist"]
    assert 0 < g3["candidates_ranked"] <= n_users * cfg.favourite_artists * cap
    assert 0 < g6["candidates_ranked"] <= n_users * cfg.single_profiles_per_user * cap
    assert uncapped.stats["favourite_artists"]["candidates_ranked"] > 2 * g3["candidates_ranked"]
    assert uncapped.stats["single_item_same_artist"]["candidates_ranked"] > 2 * g6["candidates_ranked"]
    # the same invariants as the uncapped sampler, on the capped triples
    saved = world[3]
    try:
        world_capped = (syn, creators, cfg, capped)
        test_every_guideline_produces_triples_and_counts_add_up(world_capped)
        test_positives_come_from_the_right_source(world_capped)
        test_negatives_are_outside_the_profile_and_of_another_artist_and_cluster(world_capped)
        test_margin_holds_under_an_independent_similarity(world_capped)
        test_no_duplicate_triples_and_profiles_are_distinct(world_capped)
    finally:
        assert world[3] is saved


def test_default_negatives_are_any_item_outside_the_profile_without_a_margin(world):
    """The default departs from the paper (docs/curatornet_guided.md): negatives of the positive's own
    artist or cluster are allowed, and no triple is dropped by the margin."""
    syn, creators, _, _ = world
    cfg = GuidedSamplerConfig(seed=5)
    triples = build_guided_triples(
        syn.data.train, syn.data.train_ts, syn.features, creators=creators, clusters=syn.clusters, config=cfg
    )
    member = set(zip(syn.data.train.row_ids().tolist(), syn.data.train.indices.tolist()))
    assert all((int(u), int(n)) not in member for u, n in zip(triples.user, triples.neg))
    assert np.any(syn.clusters[triples.neg] == syn.clusters[triples.pos])  # near negatives occur
    wanted = {g: s["positives_proposed"] * cfg.negatives_per_positive for g, s in triples.stats.items()}
    kept = sum(s["triples_after_margin"] for s in triples.stats.values())
    assert kept >= 0.95 * sum(wanted.values())  # only a short candidate list can leave a query short
