"""Top-k items per holdout user for trained models, stored in ``recommendations`` (no dagster)."""

from __future__ import annotations

import gc
import logging
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import results_store
from visrec_pipeline.pipeline.trained import LoadedModel, load_scoring_data, load_trained
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


class RecommendationsRun(NamedTuple):
    recommendations: pd.DataFrame  # model, user_id, rank, item_id, score of every model that succeeded
    failures: dict[str, str]  # model -> why it could not recommend


class NoRecommendationsError(RuntimeError):
    """Not one of the models asked for could recommend."""


def recommend_each(
    ws: Workspace, names: Sequence[str], k: int, *, log: logging.Logger | None = None
) -> RecommendationsRun:
    """The top-``k`` of every model in ``names``, restored and scored one at a time against one load
    of the split; replaces ``recommendations`` with them and ``recommendation_failures`` with the
    models that failed (missing or damaged checkpoint, stale checkpoint, error while scoring), which
    do not stop the others. Raises :class:`NoRecommendationsError` (from the first error) when every model failed."""
    data = load_scoring_data(ws)
    frames, failures, first_error = [], {}, None
    for name in names:
        try:
            frames.append(recommendations_of(name, load_trained(ws, name, data=data), k))
        except Exception as exc:  # noqa: BLE001  one model's failure is reported, the others go on
            failures[name] = f"{type(exc).__name__}: {exc}"
            first_error = first_error or exc
            if log is not None:
                log.warning(f"recommendations: {name} failed: {failures[name]}")
        gc.collect()  # the model is gone: one model's weights in memory at a time
    if not frames and names:
        raise NoRecommendationsError(
            "no model could recommend: " + "; ".join(f"{n}: {why}" for n, why in failures.items())
        ) from first_error
    recs = pd.concat(frames, ignore_index=True) if frames else _empty_recommendations()
    with db.connect(ws.db_path) as conn:
        results_store.replace_recommendations(conn, recs, failures)
    return RecommendationsRun(recs, failures)


def recommend_all(ws: Workspace, names: Sequence[str], k: int) -> pd.DataFrame:
    """The recommendations of :func:`recommend_each` (the models that failed are in ``recommendation_failures``)."""
    return recommend_each(ws, names, k).recommendations


def _empty_recommendations() -> pd.DataFrame:
    return pd.DataFrame(
        {"model": pd.Series(dtype=str), "user_id": pd.Series(dtype=np.int64), "rank": pd.Series(dtype=np.int64),
         "item_id": pd.Series(dtype=np.int64), "score": pd.Series(dtype=np.float64)}
    )
