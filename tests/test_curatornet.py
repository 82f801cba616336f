"""CuratorNet: user-free scoring, exact leave-one-out pooling, training on guided and random triples,
ad-hoc profiles and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.checkpoint import load_checkpoint, save_checkpoint
from visrec_pipeline.recsys.data import CSR, UnknownIdError
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.guided_sampler import GuidedSamplerConfig, GuidedTripleBatches, build_guided_triples
from visrec_pipeline.recsys.models.curatornet import (
    CuratorNet,
    CuratorNetConfig,
    CuratorNetModule,
    CuratorNetRandom,
    CuratorNetRandomConfig,
    recommend_for_profile,
)
from visrec_pipeline.recsys.registry import MODEL_SPECS, build_model
from visrec_pipeline.recsys.synthetic import planted_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def syn():
    # 97 users: no model dimension equals it, so a per-user tensor would stand out in the state
    return planted_dataset(n_users=97, n_items=180, n_clusters=6, dim=24, per_user=(6, 20), seed=11)


def _small(cls=CuratorNetConfig, train: dict | None = None, **kw):
    base = dict(item_dims=(32, 32), profile_dims=(48, 32))
    base.update(kw)
    return cls(train={"epochs": 4, "batch_size": 128, "lr": 3e-3, "device": "cpu", **(train or {})}, **base)


def _batch(holdout, rows=None):
    rows = np.arange(len(holdout)) if rows is None else np.asarray(rows)
    items, mask = holdout.profile.padded(rows)
    return ScoreBatch(torch.as_tensor(holdout.user_idx[rows]), items, mask)


@pytest.fixture(scope="module")
def trained(syn):
    model = CuratorNet(_small())
    fit, validation = syn.data.validation_split()
    inputs = syn.inputs()
    inputs.validation = validation
    history = model.fit(fit, inputs)
    return model, history


def test_registered_with_its_needs():
    assert MODEL_SPECS["curatornet"].needs == frozenset({"features:resnet50", "triples_guided"})
    assert MODEL_SPECS["curatornet_random"].needs == frozenset({"features:resnet50", "triples_random"})
    assert isinstance(build_model("curatornet_random"), CuratorNetRandom)
    assert build_model("curatornet_random").config.sampler == "random"
    assert build_model("curatornet", {"guided": {"margin": 0.2}}).config.guided.margin == 0.2
    with pytest.raises(ValueError, match="sampler"):
        CuratorNetConfig(sampler="uniform")
    with pytest.raises(ValueError, match="profile tower"):
        CuratorNetConfig(profile_dims=(300, 100))


def test_paper_sizes():
    m = CuratorNetModule(2048)
    assert [(layer.in_features, layer.out_features) for layer in m.item_layers] == [(2048, 200), (200, 200)]
    sizes = [(layer.in_features, layer.out_features) for layer in m.profile_layers]
    assert sizes == [(400, 300), (300, 300), (300, 200)]


def test_guided_training_lowers_the_loss_and_beats_chance(syn, trained):
    model, history = trained
    assert history.loss[-1] < history.loss[0]
    notes = history.notes["sampler"]
    assert notes["sampler"] == "guided" and notes["total"] > 1000
    assert all(notes[k] > 0 for k in notes if k[:1].isdigit())  # every guideline fed the training
    result = evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,))
    assert result.means["auc"] > 0.75


def test_no_user_parameters_and_new_profiles_score_like_known_users(syn, trained):
    model, _ = trained
    state = model.state_dict()
    assert all(t.shape[0] != syn.data.n_users for t in state.values() if t.ndim)
    holdout = syn.data.holdout
    known = _batch(holdout, range(10))
    unknown = ScoreBatch(torch.full((10,), -1, dtype=torch.long), known.profile_items, known.profile_mask)
    assert torch.equal(model.score(known), model.score(unknown))
    other_user = ScoreBatch(known.user_idx.flip(0), known.profile_items, known.profile_mask)
    assert torch.equal(model.score(known), model.score(other_user))  # the user index plays no part


def test_pooling_without_a_member_is_exact():
    torch.manual_seed(0)
    # profiles: a tie at the top in some dimension, a single-item profile, an empty one
    lengths = torch.tensor([4, 1, 3, 0])
    h = torch.randn(int(lengths.sum()), 5)
    h[1, 2] = h[0, 2] = h[:4, 2].max() + 1.0  # rows 0 and 1 tie for the max of dim 2
    offsets = torch.zeros(5, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    triple_profile = torch.tensor([0, 0, 1, 2, 2, 3, 0])
    member_row = torch.tensor([0, 1, 4, 5, 7, -1, 2])  # row of h that is dropped (-1: none)
    drop = member_row >= 0
    h_drop = torch.where(drop.unsqueeze(1), h[member_row.clamp(min=0)], torch.zeros(5))
    got = CuratorNetModule.pool_flat_without(h, offsets, triple_profile, drop, h_drop)
    for t in range(triple_profile.numel()):
        p = int(triple_profile[t])
        rows = [r for r in range(int(offsets[p]), int(offsets[p + 1])) if r != int(member_row[t])]
        ref = CuratorNetModule.pool_flat(h[rows], torch.tensor([0, len(rows)]))[0]
        assert torch.allclose(got[t], ref, atol=1e-6), t
    # without dropping, it is the plain pooling, and padded pooling agrees
    plain = CuratorNetModule.pool_flat(h, offsets)
    no_drop = torch.zeros(4, dtype=torch.bool)
    none = CuratorNetModule.pool_flat_without(h, offsets, torch.arange(4), no_drop, torch.zeros(4, 5))
    assert torch.allclose(plain, none)
    padded = torch.zeros(4, 4, 5)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for p in range(4):
        n = int(lengths[p])
        padded[p, :n] = h[int(offsets[p]) : int(offsets[p]) + n]
        mask[p, :n] = True
    assert torch.allclose(CuratorNetModule.pool_padded(padded, mask), plain, atol=1e-6)


def test_random_ablation_masks_the_positive_and_trains(syn):
    model = CuratorNetRandom(_small(CuratorNetRandomConfig))
    history = model.fit(syn.data, syn.inputs())
    assert history.loss[-1] < history.loss[0]
    assert history.notes["sampler"]["sampler"] == "random"
    assert history.notes["sampler"]["positive_masked_in_profile"] is True
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.75
    # the loss a batch reports equals the loss on explicit per-triple profiles without the positive
    module = model.module
    module.train(False)
    from visrec_pipeline.recsys.models.curatornet import RandomProfileBatches
    from visrec_pipeline.recsys.samplers import RandomTripleSampler

    sampler = RandomTripleSampler(syn.data.train, batch_size=32)
    batch = next(iter(RandomProfileBatches(syn.data.train, sampler, mask_positive=True, device="cpu").epoch(0)))
    users = sampler.sample_epoch(0)["user"][:32]
    assert batch["profile_offsets"].shape[0] - 1 == np.unique(users.numpy()).size  # one profile per distinct user
    lists = [[i for i in syn.data.train.row(int(users[k])).tolist() if i != int(batch["pos"][k])] for k in range(32)]
    explicit = CSR.from_lists(lists, syn.data.n_items)
    ref = {
        "profile_items": torch.as_tensor(explicit.indices),
        "profile_offsets": torch.as_tensor(explicit.indptr),
        "triple_profile": torch.arange(len(lists)),
        "pos": batch["pos"],
        "neg": batch["neg"],
    }
    with torch.no_grad():
        assert torch.allclose(module.loss(batch), module.loss(ref), atol=1e-5)


def test_precomputed_guided_triples_are_used(syn):
    fit, _ = syn.data.validation_split()
    triples = build_guided_triples(
        fit.train, fit.train_ts, syn.features, clusters=syn.clusters, config=GuidedSamplerConfig(seed=3)
    )
    inputs = syn.inputs()
    inputs.extra["triples_guided"] = triples.to_arrays()
    model = CuratorNet(_small(train={"epochs": 1}))
    history = model.fit(fit, inputs)
    assert history.notes["sampler"]["total"] == len(triples)


def test_resampled_guided_triples_start_from_the_given_set_then_change_each_epoch(syn):
    fit, _ = syn.data.validation_split()
    triples = build_guided_triples(
        fit.train, fit.train_ts, syn.features, clusters=syn.clusters, config=GuidedSamplerConfig(seed=3)
    )
    inputs = syn.inputs()
    inputs.extra["triples_guided"] = triples
    model = CuratorNet(_small(resample_guided=True))
    epoch, notes = model.batch_source(fit, inputs, torch.device("cpu"))
    assert notes["resampled_each_epoch"] is True

    def drawn(e):
        batches = list(epoch(e))
        pairs = np.stack([torch.cat([b[k] for b in batches]).numpy() for k in ("pos", "neg")], 1)
        return pairs[np.lexsort(pairs.T[::-1])]

    given = np.stack([triples.pos, triples.neg], 1)
    np.testing.assert_array_equal(drawn(0), given[np.lexsort(given.T[::-1])])
    first, second = drawn(1), drawn(2)
    assert not np.array_equal(first, drawn(0)) and not np.array_equal(first, second)
    np.testing.assert_array_equal(first, drawn(1))  # deterministic in (seeds, epoch)


def test_guided_batches_grouped_by_profile_or_plainly_shuffled(syn):
    fit, _ = syn.data.validation_split()
    triples = build_guided_triples(fit.train, fit.train_ts, syn.features, clusters=syn.clusters)
    inputs = syn.inputs()
    inputs.extra["triples_guided"] = triples
    orders = {}
    for grouped in (True, False):
        model = CuratorNet(_small(guided_batches_by_profile=grouped))
        epoch, _ = model.batch_source(fit, inputs, torch.device("cpu"))
        pos = torch.cat([b["pos"] for b in epoch(0)]).numpy()
        ref = GuidedTripleBatches(triples, batch_size=128, seed=0, group_by_profile=grouped)
        np.testing.assert_array_equal(pos, triples.pos[ref.order(0)])
        orders[grouped] = pos
    assert not np.array_equal(orders[True], orders[False])


def test_recommend_for_profile(syn, trained):
    model, _ = trained
    items = syn.data.items
    profile_ids = items.ids[[3, 50, 77]].tolist()
    recs = recommend_for_profile(model, profile_ids, items, k=10)
    assert len(recs) == 10
    rec_ids = [i for i, _ in recs]
    assert not set(rec_ids) & set(profile_ids)
    scores = [s for _, s in recs]
    assert scores == sorted(scores, reverse=True)
    # the same as scoring the profile directly
    adhoc = ScoreBatch(torch.tensor([-1]), torch.tensor([[3, 50, 77]]), torch.ones(1, 3, dtype=torch.bool))
    full = model.score(adhoc)[0]
    full[[3, 50, 77]] = -float("inf")
    assert rec_ids[0] == int(items.ids[int(full.argmax())])
    with pytest.raises(UnknownIdError):
        recommend_for_profile(model, [999_999], items)
    with pytest.raises(ValueError, match="empty"):
        recommend_for_profile(model, [], items)


def test_checkpoint_round_trip_reproduces_scores(syn, trained, tmp_path):
    model, history = trained
    path = save_checkpoint(
        tmp_path / "cn.pt",
        model_name="curatornet",
        config=model.config,
        state=model.state_dict(),
        data_versions={},
        history=history,
    )
    ckpt = load_checkpoint(path)
    fresh = build_model("curatornet", ckpt["config"])
    fresh.load_state_dict(ckpt["state"])
    batch = _batch(syn.data.holdout)
    assert torch.equal(fresh.score(batch), model.score(batch))
    with pytest.raises(RuntimeError, match="fit"):
        CuratorNet(_small()).score(batch)


def test_missing_features_are_reported(syn):
    with pytest.raises(ValueError, match="features"):
        CuratorNet(_small()).fit(syn.data, FitInputs())


def test_tower_input_is_standardised_so_a_large_common_component_does_not_saturate_it(syn):
    # CNN features share a large common component (random-init ResNet-50: norms ~1000, mean cosine
    # 0.998); raw, they saturate the SELU tower (the first demo runs started at a loss of ~190).
    inputs = syn.inputs()
    inputs.features = syn.features * 40.0 + 500.0
    fit, validation = syn.data.validation_split()
    inputs.validation = validation
    model = CuratorNet(_small(train={"epochs": 3}, sampler="random"))
    history = model.fit(fit, inputs)
    f = model.module.features
    assert torch.allclose(f.mean(0), torch.zeros(f.shape[1]), atol=1e-4)
    assert torch.allclose(f.std(0, unbiased=False), torch.ones(f.shape[1]), atol=1e-3)
    assert history.loss[0] < 5.0
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.75
    with pytest.raises(ValueError, match="feature_scale"):
        CuratorNetConfig(feature_scale="minmax")


def test_recent_rows_keeps_each_users_most_recent_items_in_item_order():
    from visrec_pipeline.recsys.models.curatornet import recent_rows

    train = CSR.from_lists([[1, 4, 6, 9], [2], [0, 3, 5]], 10)
    # timestamps aligned with the CSR entries (item order): row 0 newest are 1 and 9, row 2 ties at 7
    ts = np.array([50, 10, 20, 40, 5, 7, 7, 1])
    cut = recent_rows(train, ts, 2)
    assert [cut.row(r).tolist() for r in range(3)] == [[1, 9], [2], [0, 3]]  # tie: larger index later
    assert recent_rows(train, ts, 0) is train and recent_rows(train, ts, 4) is train
    long_rows = CSR.from_lists([list(range(300))], 300)
    rng = np.random.default_rng(0)
    ts2 = rng.permutation(300)
    kept = recent_rows(long_rows, ts2, 256).row(0)
    assert kept.size == 256 and np.all(np.diff(kept) > 0) and set(kept) == set(np.argsort(ts2)[-256:])


def test_random_ablation_profiles_are_capped_in_training(syn):
    cfg = _small(CuratorNetRandomConfig)
    cfg.train_profile_items = 3
    model = CuratorNetRandom(cfg)
    epoch, notes = model.batch_source(syn.data, syn.inputs(), torch.device("cpu"))
    lengths = [np.diff(b["profile_offsets"].numpy()) for b in epoch(0)]
    assert max(x.max() for x in lengths) == 3  # every batch pools at most 3 items per profile
    assert notes["train_profile_items"] == 3
    assert notes["profiles_cut"] == int((syn.data.train.lengths() > 3).sum()) > 0
    with pytest.raises(ValueError, match="train_profile_items"):
        CuratorNetConfig(train_profile_items=-1)


def test_packed_batch_bounds_keep_groups_whole_and_split_only_groups_larger_than_a_batch():
    from visrec_pipeline.recsys.models.curatornet import packed_batch_bounds

    # groups of 3, 2, 15, 2, 8 rows in batches of 8: the 15 fills two batches, its first one whole
    np.testing.assert_array_equal(packed_batch_bounds(np.array([0, 3, 5, 20, 22]), 30, 8), [0, 5, 13, 20, 22, 30])
    rng = np.random.default_rng(0)
    for batch_size in (1, 5, 16):
        sizes = rng.integers(1, 40, 60)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        bounds = packed_batch_bounds(starts, int(sizes.sum()), batch_size)
        assert bounds[0] == 0 and bounds[-1] == sizes.sum() and np.all(np.diff(bounds) >= 1)
        assert np.diff(bounds).max() <= batch_size
        group = np.repeat(np.arange(sizes.size), sizes)
        batch = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
        batches_per_group = np.array([np.unique(batch[group == g]).size for g in range(sizes.size)])
        np.testing.assert_array_equal(batches_per_group, -(-sizes // batch_size))  # as few as possible
    with pytest.raises(ValueError, match="batch_size"):
        packed_batch_bounds(np.array([0]), 3, 0)


def _user_batches(syn, batch_size):
    from visrec_pipeline.recsys.models.curatornet import RandomProfileBatches
    from visrec_pipeline.recsys.samplers import RandomTripleSampler

    sampler = RandomTripleSampler(syn.data.train, batch_size=batch_size, seed=5)
    return RandomProfileBatches(syn.data.train, sampler, mask_positive=True, device="cpu", by_user=True), sampler


def test_random_batches_by_user_cover_the_epoch_once_with_each_user_in_as_few_batches_as_possible(syn):
    batch_size = 16  # below the heaviest users' counts: some users are split
    source, sampler = _user_batches(syn, batch_size)
    order, bounds, triples = source.user_order(0)
    np.testing.assert_array_equal(np.sort(order), np.arange(sampler.triples_per_epoch))  # each triple once
    sampled = sampler.sample_epoch(0)
    np.testing.assert_array_equal(triples["user"], sampled["user"].numpy())
    batches = list(source.epoch(0))
    assert len(batches) == bounds.size - 1
    for k in ("pos", "neg"):
        np.testing.assert_array_equal(torch.cat([b[k] for b in batches]).numpy(), triples[k][order])
    user = triples["user"][order]
    batch_of = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    counts = np.bincount(user, minlength=syn.data.n_users)
    spans = np.array([np.unique(batch_of[user == u]).size for u in range(syn.data.n_users)])
    np.testing.assert_array_equal(spans, -(-counts // batch_size))
    assert (counts > batch_size).any() and (spans > 1).any()  # the split path ran
    # one profile per distinct user of a batch, as in the shuffled batches
    assert [b["profile_offsets"].shape[0] - 1 for b in batches] == [
        np.unique(user[s:e]).size for s, e in zip(bounds[:-1], bounds[1:])
    ]
    # the order of users is drawn afresh each epoch, deterministically
    def user_sequence(e):
        o, _, t = source.user_order(e)
        u = t["user"][o]
        return u[np.r_[True, u[1:] != u[:-1]]]

    assert np.unique(user_sequence(0)).size == user_sequence(0).size  # each user's triples are contiguous
    np.testing.assert_array_equal(user_sequence(0), user_sequence(0))
    assert not np.array_equal(user_sequence(0), user_sequence(1))


def test_random_batches_by_user_give_the_loss_of_explicit_per_triple_profiles(syn):
    torch.manual_seed(0)
    features = torch.as_tensor(syn.features, dtype=torch.float32)
    module = CuratorNetModule(features.shape[1], (32, 32), (48, 32), features / features.norm(dim=1, keepdim=True))
    source, sampler = _user_batches(syn, 64)
    order, _, triples = source.user_order(0)
    with torch.no_grad():
        total = sum(float(module.loss(b)) * b["pos"].shape[0] for b in source.epoch(0))
        user, pos, neg = (triples[k][order] for k in ("user", "pos", "neg"))
        lists = [[i for i in syn.data.train.row(int(u)).tolist() if i != int(p)] for u, p in zip(user, pos)]
        explicit = CSR.from_lists(lists, syn.data.n_items)
        ref = module.loss({
            "profile_items": torch.as_tensor(explicit.indices),
            "profile_offsets": torch.as_tensor(explicit.indptr),
            "triple_profile": torch.arange(len(lists)),
            "pos": torch.as_tensor(pos),
            "neg": torch.as_tensor(neg),
        })
    assert total / len(lists) == pytest.approx(float(ref), abs=1e-5)


def test_random_ablation_learns_with_batches_by_user(syn):
    model = CuratorNetRandom(_small(CuratorNetRandomConfig, random_batches_by_user=True))
    history = model.fit(syn.data, syn.inputs())
    assert history.notes["sampler"]["batches_by_user"] is True
    assert history.loss[-1] < history.loss[0]
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.75


def test_random_batches_of_user_chunks_cover_the_epoch_once_and_bound_the_profiles_per_batch(syn):
    from visrec_pipeline.recsys.models.curatornet import RandomProfileBatches
    from visrec_pipeline.recsys.samplers import RandomTripleSampler

    batch_size, chunk = 32, 4
    sampler = RandomTripleSampler(syn.data.train, batch_size=batch_size, seed=5, user_chunk=chunk)
    source = RandomProfileBatches(syn.data.train, sampler, mask_positive=True, device="cpu")
    user = sampler.sample_epoch(0)["user"].numpy()
    assert user.size == sampler.triples_per_epoch  # each triple once (same triples as unchunked: sampler tests)
    bounds = np.r_[np.arange(0, user.size, batch_size), user.size]
    # runs of one user are chunks of at most `chunk` triples (two chunks of a user may meet by chance)
    run_starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    runs = np.diff(np.r_[run_starts, user.size])
    assert runs.max() <= 2 * chunk and np.median(runs) <= chunk
    batches = list(source.epoch(0))
    assert all(b["pos"].shape[0] == batch_size for b in batches[:-1])
    profiles = [b["profile_offsets"].shape[0] - 1 for b in batches]
    # chunks (partial ones included: a user's last chunk, light users) bound the profiles a batch pools
    chunks_per_batch = [np.unique(user[s:e][np.r_[True, user[s:e][1:] != user[s:e][:-1]]]).size
                        for s, e in zip(bounds[:-1], bounds[1:])]
    assert profiles == chunks_per_batch or all(p <= c for p, c in zip(profiles, chunks_per_batch))
    assert max(profiles) <= batch_size // 2  # not ~batch_size
    plain_sampler = RandomTripleSampler(syn.data.train, batch_size=batch_size, seed=5)
    plain = [b["profile_offsets"].shape[0] - 1 for b in RandomProfileBatches(
        syn.data.train, plain_sampler, mask_positive=True, device="cpu").epoch(0)]
    assert np.mean(profiles) < np.mean(plain) / 2
    # a fresh, deterministic order each epoch
    np.testing.assert_array_equal(sampler.sample_epoch(1)["user"], sampler.sample_epoch(1)["user"])
    assert not np.array_equal(sampler.sample_epoch(0)["user"], sampler.sample_epoch(1)["user"])


def test_random_ablation_learns_with_user_chunks_the_default(syn):
    assert CuratorNetRandomConfig().random_user_chunk == 4
    model = CuratorNetRandom(_small(CuratorNetRandomConfig))
    history = model.fit(syn.data, syn.inputs())
    assert history.notes["sampler"]["user_chunk"] == 4
    assert history.notes["sampler"]["profile_rows_per_triple"] == 16  # heavy users' chunks grow
    assert history.loss[-1] < history.loss[0]
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.75
    with pytest.raises(ValueError, match="random_user_chunk"):
        CuratorNetRandomConfig(random_user_chunk=0)
    with pytest.raises(ValueError, match="random_profile_rows_per_triple"):
        CuratorNetRandomConfig(random_profile_rows_per_triple=-1)
