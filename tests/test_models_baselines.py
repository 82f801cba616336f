"""Random and MostPopular."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.baselines import MostPopular, RandomConfig, RandomRecommender
from visrec_pipeline.recsys.synthetic import planted_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def batch(users, profiles=None, n_items=10) -> ScoreBatch:
    users = torch.as_tensor(users, dtype=torch.long)
    profiles = profiles or [[0]] * len(users)
    L = max(len(p) for p in profiles)
    items = torch.zeros((len(users), L), dtype=torch.long)
    mask = torch.zeros((len(users), L), dtype=torch.bool)
    for r, p in enumerate(profiles):
        items[r, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        mask[r, : len(p)] = True
    return ScoreBatch(users, items, mask)


def small_data() -> RecData:
    # item 30 has 3 interactions, item 10 two, item 20 one; item 40 none
    train = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "item_id": [10, 30, 30, 20, 30, 10], "ts": range(6)})
    return RecData.from_frames(train, [10, 20, 30, 40])


def test_random_is_deterministic_per_seed_and_user():
    data = planted_dataset(30, 50, seed=1).data
    a = RandomRecommender(RandomConfig(seed=5, device="cpu"))
    a.fit(data, FitInputs())
    s1 = a.score(batch([0, 1, 2, 3]))
    s2 = a.score(batch([3, 2, 1, 0]))
    assert s1.shape == (4, 50) and s1.dtype == torch.float32
    assert torch.equal(s1, s2.flip(0)), "a user's scores do not depend on the batch"
    b = RandomRecommender(RandomConfig(seed=5, device="cpu"))
    b.fit(data, FitInputs())
    assert torch.equal(s1, b.score(batch([0, 1, 2, 3])))
    c = RandomRecommender(RandomConfig(seed=6, device="cpu"))
    c.fit(data, FitInputs())
    assert not torch.equal(s1, c.score(batch([0, 1, 2, 3])))
    assert not torch.equal(s1[0], s1[1]), "users get different rankings"
    assert float(s1.min()) >= 0.0 and float(s1.max()) < 1.0


def test_random_unknown_users_keyed_by_profile():
    data = planted_dataset(30, 50, seed=1).data
    m = RandomRecommender(RandomConfig(seed=0, device="cpu"))
    m.fit(data, FitInputs())
    s = m.score(batch([-1, -1, -1], [[1, 2], [2, 1], [3]]))
    assert torch.equal(s[0], s[1]) and not torch.equal(s[0], s[2])


def test_random_auc_is_near_half_and_state_round_trip():
    syn = planted_dataset(200, 300, seed=2)
    m = RandomRecommender(RandomConfig(seed=0, device="cpu"))
    m.fit(syn.data, FitInputs())
    auc = evaluate(m.score, syn.data.holdout, syn.data.n_items, ks=()).means["auc"]
    assert 0.4 < auc < 0.6
    m2 = RandomRecommender(RandomConfig(seed=0, device="cpu"))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m.score(batch([0, 5])), m2.score(batch([0, 5])))
    with pytest.raises(RuntimeError, match="fit"):
        RandomRecommender().score(batch([0]))


def test_most_popular_orders_by_training_count():
    data = small_data()
    m = MostPopular()
    m.fit(data, FitInputs())
    s = m.score(batch([0, 2, -1], n_items=4))
    assert s.shape == (3, 4)
    assert torch.equal(s[0], torch.tensor([2.0, 1.0, 3.0, 0.0]))
    assert torch.equal(s[0], s[2]) and torch.equal(s[0], s[1])
    order = torch.argsort(s[0], descending=True, stable=True).tolist()
    assert data.items.ids[order].tolist() == [30, 10, 20, 40]
    m2 = MostPopular()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.score(batch([1], n_items=4)), s[:1])


def test_most_popular_beats_random_on_popularity_driven_data():
    syn = planted_dataset(200, 300, seed=3)
    m = MostPopular()
    m.fit(syn.data, FitInputs())
    auc = evaluate(m.score, syn.data.holdout, syn.data.n_items, ks=()).means["auc"]
    assert auc > 0.6


def test_blocked_pair_hash_equals_the_whole_matrix_hash():
    from visrec_pipeline.recsys.models.baselines import hash_uniform, hash_uniform_pairs, splitmix64

    rows = splitmix64(torch.tensor([0, 1, 7, -5, 2**40], dtype=torch.long))
    cols = splitmix64(torch.arange(1003, dtype=torch.long))
    whole = hash_uniform(rows.unsqueeze(1) ^ cols.unsqueeze(0)).float()
    for block in (1, 7, 64, 1 << 16):  # blocks of one column, ragged last blocks, one block
        assert torch.equal(hash_uniform_pairs(rows, cols, block_elements=block), whole)
    u = hash_uniform_pairs(rows, cols)
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
