"""Top-k items per holdout user for trained models, stored in ``recommendations`` (no dagster)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import results_store
from visrec_pipeline.pipeline.trained import LoadedModel, load_trained
from visrec_pipeline.recsys.evaluate import top_k


def recommendations_of(name: str, loaded: LoadedModel, k: int) -> pd.DataFrame:
    """``model, user_id, rank, item_id, score``: the ``k`` best unconsumed items of every holdout user
    (fewer where fewer items are left)."""
    model, data = loaded.model, loaded.data
    items_idx, scores = top_k(model.score, data.holdout, len(data.items), k)
    m, width = items_idx.shape
    flat = items_idx.reshape(-1)
    valid = flat >= 0  # rows with fewer than k candidates are padded with -1
    frame = pd.DataFrame(
        {
            "model": name,
            "user_id": np.repeat(data.holdout.user_ids, width),
            "rank": np.tile(np.arange(1, width + 1), m),
            "item_id": data.items.ids[np.where(valid, flat, 0)],
            "score": scores.reshape(-1).astype(np.float64),
        }
    )
    return frame[valid]


def recommend_all(ws: Workspace, names: Sequence[str], k: int) -> pd.DataFrame:
    """The top-``k`` of every model in ``names``; replaces the ``recommendations`` table with them."""
    frames = [recommendations_of(name, load_trained(ws, name), k) for name in names]
    recs = pd.concat(frames, ignore_index=True)
    with db.connect(ws.db_path) as conn:
        results_store.replace_recommendations(conn, recs)
    return recs
