"""Synthetic interaction data with a planted visual structure, for tests and benchmarks.

Items fall into visual clusters; their features look like pooled CNN activations
(non-negative, sharing a large common component, plus a cluster direction and noise).
Each user prefers one or two clusters and consumes items from them (popular items
more often), plus a share of random items. The last interaction of each user (by
time) is the holdout, as in the pipeline's split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.data import RecData


@dataclass
class Synthetic:
    data: RecData  # training rows + test holdout (last item of each user)
    features: np.ndarray  # float32 [n_items, d]
    clusters: np.ndarray  # int64 [n_items]
    user_clusters: list[np.ndarray]

    def inputs(self) -> FitInputs:
        return FitInputs(features=self.features, feature_mask=np.ones(len(self.features), bool), clusters=self.clusters)


def planted_dataset(
    n_users: int = 200,
    n_items: int = 300,
    *,
    n_clusters: int = 10,
    dim: int = 64,
    per_user: tuple[int, int] = (8, 30),
    noise_share: float = 0.1,
    feature_noise: float = 0.6,
    seed: int = 0,
) -> Synthetic:
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, n_clusters, n_items)
    centers = rng.normal(0.0, 1.0, (n_clusters, dim))
    common = np.abs(rng.normal(2.0, 0.5, dim))  # the shared "ReLU-positive" component of CNN features
    feats = np.maximum(common + centers[clusters] + rng.normal(0.0, feature_noise, (n_items, dim)), 0.0)
    popularity = rng.zipf(1.8, n_items).astype(np.float64).clip(max=50.0)

    users, items, ts, liked = [], [], [], []
    for u in range(n_users):
        likes = rng.choice(n_clusters, size=rng.integers(1, 3), replace=False)
        liked.append(likes)
        pool = np.flatnonzero(np.isin(clusters, likes))
        n = int(min(rng.integers(per_user[0], per_user[1] + 1), max(len(pool), 1)))
        w = popularity[pool] / popularity[pool].sum()
        chosen = set(rng.choice(pool, size=n, replace=False, p=w).tolist()) if len(pool) else set()
        n_noise = rng.binomial(n, noise_share)
        chosen.update(rng.choice(n_items, size=n_noise, replace=False).tolist())
        chosen = np.array(sorted(chosen), dtype=np.int64)
        users.append(np.full(chosen.size, u))
        items.append(chosen)
        ts.append(rng.permutation(chosen.size) + 1_600_000_000)
    users_a, items_a, ts_a = np.concatenate(users), np.concatenate(items), np.concatenate(ts)

    # ids that differ from indices, so index mapping is exercised
    user_ids, item_ids = users_a * 7 + 11, items_a * 3 + 100
    frame = pd.DataFrame({"user_id": user_ids, "item_id": item_ids, "ts": ts_a})
    frame = frame.sort_values(["user_id", "ts", "item_id"])
    last = frame.groupby("user_id").tail(1)
    counts = frame.groupby("user_id")["item_id"].transform("size")
    is_eval = frame.index.isin(last.index) & (counts > 1).to_numpy()
    train = frame[~is_eval]
    evals = frame[is_eval]
    profiles = train.groupby("user_id")["item_id"].apply(list)
    holdout = pd.DataFrame(
        {
            "user_id": evals["user_id"].to_numpy(),
            "profile": [profiles.get(u, []) for u in evals["user_id"]],
            "predict": [[i] for i in evals["item_id"]],
        }
    )
    all_item_ids = np.arange(n_items) * 3 + 100
    data = RecData.from_frames(train, all_item_ids, holdout)
    return Synthetic(data, feats.astype(np.float32), clusters.astype(np.int64), liked)
