"""Evaluate one trained model on the workspace's holdout and store the metrics (no dagster)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from visrec_pipeline import db
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import results_store
from visrec_pipeline.pipeline.trained import load_trained
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.evaluate import EvalResult, evaluate
from visrec_pipeline.recsys.metrics import Protocol

DEFAULT_KS = (20, 100)
DEFAULT_PROTOCOL: Protocol = "standard"
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class ModelEvaluation:
    name: str
    result: EvalResult  # per-row metrics and their means
    eval_seconds: float  # ranking and metrics only
    train_seconds: float  # from the checkpoint (0.0 when it has none)
    trained_on: dict  # the checkpoint's data_versions
    lineage: dict  # the checkpoint's training lineage

    @property
    def n_rows(self) -> int:
        return len(self.result.per_row)


def cold_items(data: RecData) -> np.ndarray:
    """Indices of the catalogue items no training row mentions."""
    seen = np.zeros(len(data.items), bool)
    seen[data.train.indices] = True
    return np.flatnonzero(~seen)


def evaluate_model(
    ws: Workspace,
    name: str,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    protocol: Protocol = DEFAULT_PROTOCOL,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log: logging.Logger | None = None,
) -> ModelEvaluation:
    """Full-ranking metrics of trained model ``name`` over the holdout, written to ``evaluation_rows``
    and ``evaluation_summary`` (replacing this model's rows under ``protocol``)."""
    model, data, _inputs, ckpt = load_trained(ws, name, log=log)
    cold = cold_items(data)
    started = time.perf_counter()
    result = evaluate(
        model.score,
        data.holdout,
        len(data.items),
        ks=tuple(ks),
        protocol=protocol,
        batch_size=batch_size,
        cold_items=cold if cold.size else None,
    )
    eval_seconds = time.perf_counter() - started
    extra = ckpt.get("extra", {})
    train_seconds = float(extra.get("train_seconds", 0.0))
    with db.connect(ws.db_path) as conn:
        results_store.write_evaluation(conn, name, result, train_seconds=train_seconds)
    return ModelEvaluation(
        name=name,
        result=result,
        eval_seconds=eval_seconds,
        train_seconds=train_seconds,
        trained_on=ckpt.get("data_versions", {}),
        lineage=extra.get("lineage", {}),
    )
