"""The random BPR triple sampler: validity, determinism, counts, uniformity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.data import CSR
from visrec_pipeline.recsys.samplers import RandomTripleSampler


@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine is shared: one intra-op thread avoids oversubscription stalls
    torch.set_num_threads(1)


def random_csr(n_users=60, n_items=40, seed=0, max_len=35) -> CSR:
    rng = np.random.default_rng(seed)
    lists = [rng.choice(n_items, size=rng.integers(1, max_len + 1), replace=False) for _ in range(n_users)]
    return CSR.from_lists(lists, n_items)


def member(train: CSR, users: torch.Tensor, items: torch.Tensor) -> np.ndarray:
    dense = train.to_dense(dtype=torch.bool)
    return dense[users, items].numpy()


def concat(batches) -> dict[str, torch.Tensor]:
    out = {}
    for b in batches:
        for k, v in b.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def test_positives_in_profile_negatives_never():
    train = random_csr()
    sampler = RandomTripleSampler(train, seed=3, batch_size=64)
    for e in range(5):
        t = concat(sampler.epoch(e))
        assert member(train, t["user"], t["pos"]).all()
        assert not member(train, t["user"], t["neg"]).any()
        assert sampler.contains(t["user"], t["pos"]).all() and not sampler.contains(t["user"], t["neg"]).any()
        assert t["neg"].min() >= 0 and t["neg"].max() < train.n_cols


def test_dense_profiles_still_get_valid_negatives():
    # users who consumed all but one or two items: rejection sampling would need many rounds
    n_items = 50
    lists = [np.delete(np.arange(n_items), [k, (k + 7) % n_items]) for k in range(20)] + [np.arange(49)]
    train = CSR.from_lists(lists, n_items)
    t = RandomTripleSampler(train, seed=0, batch_size=1000).sample_epoch(0)
    assert not member(train, t["user"], t["neg"]).any()
    last = t["user"] == 20
    assert (t["neg"][last] == 49).all()


def test_user_with_every_item_is_skipped():
    train = CSR.from_lists([np.arange(5), np.array([1, 2])], 5)
    s = RandomTripleSampler(train, seed=0, batch_size=8)
    t = s.sample_epoch(0)
    assert (t["user"] == 1).all() and s.summary()["skipped_users_without_negatives"] == 1
    assert set(t["neg"].tolist()) <= {0, 3, 4}


def test_each_positive_once_per_epoch_and_count():
    train = random_csr()
    s = RandomTripleSampler(train, seed=1, batch_size=100)
    t = concat(s.epoch(0))
    assert t["user"].numel() == train.nnz == s.triples_per_epoch
    keys = (t["user"] * train.n_cols + t["pos"]).sort().values
    assert torch.equal(keys, s.keys)  # a permutation of the training entries
    assert len(list(s.epoch(0))) == len(s) == -(-train.nnz // 100)
    sizes = [b["user"].numel() for b in s.epoch(0)]
    assert all(x == 100 for x in sizes[:-1]) and sum(sizes) == train.nnz


def test_triples_per_epoch_override():
    train = random_csr()
    s = RandomTripleSampler(train, seed=1, batch_size=128, triples_per_epoch=2 * train.nnz + 5)
    t = s.sample_epoch(0)
    assert t["user"].numel() == 2 * train.nnz + 5
    assert s.summary()["triples_per_epoch"] == 2 * train.nnz + 5
    assert not member(train, t["user"], t["neg"]).any()


def test_deterministic_per_seed_and_epoch():
    train = random_csr()
    a = RandomTripleSampler(train, seed=7, batch_size=50)
    b = RandomTripleSampler(train, seed=7, batch_size=50)
    for e in (0, 3):
        ta, tb = concat(a.epoch(e)), concat(b.epoch(e))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(concat(a.epoch(0))["neg"], concat(a.epoch(1))["neg"])
    c = RandomTripleSampler(train, seed=8, batch_size=50)
    assert not torch.equal(concat(a.epoch(0))["pos"], concat(c.epoch(0))["pos"])
    # the epoch does not depend on the batch size or on what was drawn before
    d = RandomTripleSampler(train, seed=7, batch_size=999)
    list(d.epoch(0))
    assert torch.equal(concat(d.epoch(3))["neg"], concat(a.epoch(3))["neg"])


def test_negatives_uniform_over_complement():
    # one user, profile {0, 2, 5}, 8 items: negatives uniform over {1, 3, 4, 6, 7}
    train = CSR.from_lists([np.array([0, 2, 5])], 8)
    s = RandomTripleSampler(train, seed=0, batch_size=10, triples_per_epoch=60_000)
    neg = s.sample_epoch(0)["neg"]
    counts = torch.bincount(neg, minlength=8).numpy()
    assert counts[[0, 2, 5]].sum() == 0
    share = counts[[1, 3, 4, 6, 7]] / neg.numel()
    assert np.allclose(share, 0.2, atol=0.01)


def test_summary_and_bad_arguments():
    train = random_csr()
    s = RandomTripleSampler(train, seed=2, batch_size=32)
    summ = s.summary()
    assert summ["positives"] == train.nnz and summ["users"] == 60 and summ["items"] == 40
    assert summ["batches_per_epoch"] == len(s)
    with pytest.raises(ValueError, match="batch_size"):
        RandomTripleSampler(train, batch_size=0)
    with pytest.raises(ValueError, match="no training entry"):
        RandomTripleSampler(CSR.from_lists([[], []], 4))


def test_user_chunks_reorder_the_same_triples_into_few_users_per_batch():
    train = random_csr(n_users=300, n_items=200, seed=3, max_len=60)
    plain = RandomTripleSampler(train, seed=2, batch_size=64)
    chunked = RandomTripleSampler(train, seed=2, batch_size=64, user_chunk=4)
    a, b = plain.sample_epoch(1), chunked.sample_epoch(1)
    key = lambda t: sorted(zip(t["user"].tolist(), t["pos"].tolist(), t["neg"].tolist()))  # noqa: E731
    assert key(a) == key(b), "the same triples, only in another order"
    user = b["user"].numpy()
    runs = np.diff(np.r_[np.flatnonzero(np.r_[True, user[1:] != user[:-1]]), user.size])
    assert np.median(runs) <= 4 and runs.max() <= 8  # chunks of <= 4 (two of a user may meet)
    distinct = lambda s: np.mean([np.unique(x["user"].numpy()).size for x in s.epoch(1)])  # noqa: E731
    assert distinct(chunked) < distinct(plain) / 2
    assert torch.equal(chunked.sample_epoch(1)["user"], b["user"])  # deterministic
    assert not torch.equal(chunked.sample_epoch(2)["user"], b["user"])
    assert chunked.summary()["user_chunk"] == 4
    with pytest.raises(ValueError, match="user_chunk"):
        RandomTripleSampler(train, user_chunk=0)


def test_profile_chunks_grow_with_the_capped_profile():
    from visrec_pipeline.recsys.samplers import profile_chunks

    lengths = np.array([0, 1, 5, 64, 65, 300, 1000])
    np.testing.assert_array_equal(profile_chunks(lengths, 4, 256, 16), [4, 4, 4, 4, 5, 16, 16])
    np.testing.assert_array_equal(profile_chunks(lengths, 4, 0, 16), [4, 4, 4, 4, 5, 19, 63])  # no cap


def test_chunks_sized_by_profile_bound_the_pooled_rows_per_triple():
    """A batch pools each distinct user's capped profile once: with chunks grown for heavy users the
    rows pooled per triple stay under the budget, where fixed chunks of 4 cost cap / 4 for them."""
    from visrec_pipeline.recsys.samplers import user_chunk_order

    rng = np.random.default_rng(0)
    # heavy-tailed profiles: most users light, a few with hundreds of items
    lengths = np.minimum((rng.pareto(1.2, 1500) * 8 + 1).astype(np.int64), 199)
    train = CSR.from_lists([sorted(rng.choice(200, n, replace=False).tolist()) for n in lengths], 200)
    cap, budget, batch = 64, 4, 64
    capped = np.minimum(train.lengths(), cap)

    def rows_per_triple(sampler):
        user = sampler.sample_epoch(0)["user"].numpy()
        rows = sum(capped[np.unique(user[s : s + batch])].sum() for s in range(0, user.size, batch))
        return rows / user.size, user

    fixed = RandomTripleSampler(train, seed=1, batch_size=batch, user_chunk=4)
    sized = RandomTripleSampler(train, seed=1, batch_size=batch, user_chunk=4, profile_rows_per_triple=budget, profile_cap=cap)
    (r_fixed, u_fixed), (r_sized, u_sized) = rows_per_triple(fixed), rows_per_triple(sized)
    assert np.array_equal(np.sort(u_fixed), np.sort(u_sized))  # the same triples' users, reordered
    # the budget (plus partial chunks of light users) against up to cap / 4 for heavy users
    assert r_sized <= budget + 2 and r_fixed > 1.5 * (budget + 2)
    summary = sized.summary()
    assert summary["profile_rows_per_triple"] == budget and summary["largest_user_chunk"] == cap // budget
    # a heavy user's triples come in runs of its own chunk size
    heavy = int(np.argmax(train.lengths()))
    order = user_chunk_order(np.repeat([heavy, 0], [40, 40]), np.full(400, 4) + (np.arange(400) == heavy) * 6, 0, 0)
    runs = np.diff(np.flatnonzero(np.r_[True, np.diff(np.repeat([heavy, 0], [40, 40])[order]) != 0, True]))
    assert runs.max() >= 10 and sorted(order.tolist()) == list(range(80))
    with pytest.raises(ValueError, match="profile_rows_per_triple"):
        RandomTripleSampler(train, profile_rows_per_triple=-1)
