"""Evaluate one trained model on the workspace's holdout and store the metrics (no dagster)."""

from __future__ import annotations

import logging
import time
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from visrec_pipeline import db
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import results_store
from visrec_pipeline.pipeline.seeds import trained_seeds
from visrec_pipeline.pipeline.trained import load_scoring_data, load_trained
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
    seed_means: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> its means (seed 0 included)

    @property
    def n_rows(self) -> int:
        return len(self.result.per_row)


def cold_items(data: RecData) -> np.ndarray:
    """Indices of the catalogue items no training row mentions."""
    seen = np.zeros(len(data.items), bool)
    seen[data.train.indices] = True
    return np.flatnonzero(~seen)


def evaluate_checkpoint(
    ws: Workspace,
    name: str,
    path: Path,
    data: RecData,
    cold: np.ndarray,
    *,
    ks: Sequence[int],
    protocol: Protocol,
    batch_size: int,
    log: logging.Logger | None = None,
) -> tuple[EvalResult, float, dict]:
    """Metrics of the checkpoint of model ``name`` at ``path`` over ``data``'s holdout, in this process:
    ``(result, seconds of ranking and metrics, the checkpoint's data_versions and extra)``.
    :class:`SeedEvaluator`'s local form (``visrec_pipeline.distributed.evaluation`` has the sharded one)."""
    model, _data, _inputs, ckpt = load_trained(ws, name, log=log, data=data, path=path)
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
    return result, time.perf_counter() - started, {k: ckpt.get(k, {}) for k in ("data_versions", "extra")}


# evaluate_checkpoint's signature: how one seed's checkpoint is scored (here, or sharded on a cluster)
SeedEvaluator = Callable[..., tuple[EvalResult, float, dict]]


def evaluate_model(
    ws: Workspace,
    name: str,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    protocol: Protocol = DEFAULT_PROTOCOL,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log: logging.Logger | None = None,
    evaluator: SeedEvaluator = evaluate_checkpoint,
) -> ModelEvaluation:
    """Full-ranking metrics of trained model ``name`` over the holdout, written to ``evaluation_rows``
    (seed 0) and ``evaluation_summary`` (every seed trained with it, :func:`~visrec_pipeline.pipeline.seeds.trained_seeds`),
    replacing this model's rows under ``protocol``. Seeds are restored and scored one at a time
    against one load of the split, each by ``evaluator`` (default: in this process)."""
    data = load_scoring_data(ws)
    cold = cold_items(data)
    results: list[tuple[int, EvalResult, float]] = []
    first: tuple[EvalResult, float, dict] | None = None
    for seed, path in trained_seeds(ws, name):
        result, seconds, ckpt = evaluator(
            ws, name, path, data, cold, ks=tuple(ks), protocol=protocol, batch_size=batch_size, log=log
        )
        extra = ckpt.get("extra", {})
        results.append((seed, result, float(extra.get("train_seconds", 0.0))))
        if first is None:
            first = (result, seconds, ckpt)
        gc.collect()  # one model's weights in memory at a time
        if log is not None and seed > 0:
            log.info(f"{name}: seed {seed} evaluated (AUC {result.means.get('auc', float('nan')):.5f})")
    assert first is not None  # trained_seeds always lists seed 0
    result, eval_seconds, ckpt = first
    train_seconds = results[0][2]
    with db.connect(ws.db_path) as conn:
        results_store.write_evaluation(conn, name, result, train_seconds=train_seconds, other_seeds=results[1:])
    extra = ckpt.get("extra", {})
    return ModelEvaluation(
        name=name,
        result=result,
        eval_seconds=eval_seconds,
        train_seconds=train_seconds,
        trained_on=ckpt.get("data_versions", {}),
        lineage=extra.get("lineage", {}),
        seed_means={seed: dict(res.means) for seed, res, _ in results},
    )
