"""Evaluation sharded by users over Ray tasks (no Dagster import): :class:`ShardedEvaluator` is a
``pipeline.evaluation.SeedEvaluator``.

The driver checks the checkpoint (its hash, and that it was trained on the data the database holds
now), loads the split and the scoring inputs once and puts them in Ray's object store; each task
restores the model from the checkpoint's path (shared storage) and scores its shard of the holdout
rows in batches with ``recsys.evaluate.evaluate``. A shard is a run of whole batches of the order a
local evaluation scores rows in (``recsys.evaluate.batch_order``), so every row is scored in the same
batch as locally, and ``recsys.evaluate.merge_results`` gives the same rows and means exactly.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from visrec_pipeline import db
from visrec_pipeline.distributed.cluster import ComputeSettings, ray_session
from visrec_pipeline.distributed.training import quiet_read_only_arrays
from visrec_pipeline.model_io import build_inputs
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline.evaluation import SeedEvaluator, evaluate_checkpoint
from visrec_pipeline.pipeline.trained import read_checkpoint, require_fresh, restore_model, scoring_needs
from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.data import Holdout, RecData
from visrec_pipeline.recsys.evaluate import EvalResult, batch_order, evaluate, merge_results

Progress = Callable[[str], None]


def user_shards(holdout: Holdout, batch_size: int, shards: int) -> list[np.ndarray]:
    """Holdout rows in at most ``shards`` shards of whole evaluation batches (see module docstring),
    as even in batches as they divide."""
    if batch_size < 1 or shards < 1:
        raise ValueError(f"batch_size and shards must be >= 1, got {batch_size} and {shards}")
    order = batch_order(holdout)
    n_batches = -(-order.size // batch_size)
    bounds = np.linspace(0, n_batches, min(shards, max(n_batches, 1)) + 1).round().astype(np.int64) * batch_size
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _evaluate_shard(
    name: str, path: str, data: RecData, inputs: FitInputs, rows: np.ndarray, cold: np.ndarray,
    ks: Sequence[int], protocol: str, batch_size: int, threads: int,
) -> EvalResult:
    quiet_read_only_arrays()
    torch.set_num_threads(threads)
    # read here, not shipped: each task holds one copy of the weights (the hash is checked again)
    model = restore_model(name, read_checkpoint(name, Path(path)), data, inputs)
    return evaluate(
        model.score, data.holdout, len(data.items), ks=tuple(ks), protocol=protocol, batch_size=batch_size,
        cold_items=cold if cold.size else None, rows=rows,
    )


@dataclass
class ShardedEvaluator:
    """Scores one checkpoint over the holdout in Ray tasks on the cluster this process is connected to
    (``cluster.ray_session``): ``shards_per_worker`` shards per worker the cluster fits, so a slow shard
    does not hold the others back; ``progress`` hears users done/total and the rate as shards finish."""

    settings: ComputeSettings
    progress: Progress | None = None
    shards_per_worker: int = 2

    def __call__(
        self, ws: Workspace, name: str, path: Path, data: RecData, cold: np.ndarray, *,
        ks: Sequence[int], protocol: str, batch_size: int, log=None,
    ) -> tuple[EvalResult, float, dict]:
        import ray

        ckpt = read_checkpoint(name, path)
        with db.connect(ws.db_path) as conn:
            require_fresh(conn, name, path, ckpt)
        meta = {k: ckpt.get(k, {}) for k in ("data_versions", "extra")}
        del ckpt  # the tasks read the weights themselves
        needs = scoring_needs(name)
        inputs = build_inputs(ws, needs, data) if needs else FitInputs()

        resources = ray.cluster_resources()
        workers = self.settings.worker_count(resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        shards = user_shards(data.holdout, batch_size, workers * max(1, self.shards_per_worker))
        task = ray.remote(_evaluate_shard).options(
            num_cpus=self.settings.cpus_per_worker, num_gpus=self.settings.gpus_per_worker
        )
        started = time.perf_counter()
        data_ref, inputs_ref = ray.put(data), ray.put(inputs)
        threads = max(1, int(self.settings.cpus_per_worker))
        sizes = {
            task.remote(name, str(path), data_ref, inputs_ref, rows, cold, tuple(ks), protocol, batch_size, threads): rows.size
            for rows in shards
        }
        total, done, parts, pending = len(data.holdout), 0, [], list(sizes)
        if self.progress is not None:
            self.progress(f"{name}: evaluating {total} users in {len(shards)} shard(s) on {workers} Ray worker(s)")
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            parts.extend(ray.get(ready))
            done += sum(sizes[r] for r in ready)
            if self.progress is not None:
                rate = done / max(time.perf_counter() - started, 1e-9)
                self.progress(f"{name}: {done}/{total} users evaluated ({rate:.0f} users/s)")
        return merge_results(parts), time.perf_counter() - started, meta


@contextmanager
def evaluator_for(settings: ComputeSettings, progress: Progress | None = None) -> Iterator[SeedEvaluator]:
    """The evaluator the compute settings ask for: here (``local``), or a :class:`ShardedEvaluator`
    connected to the cluster for the duration of the block (``ray``)."""
    if not settings.distributed:
        yield evaluate_checkpoint
        return
    with ray_session(settings):
        yield ShardedEvaluator(settings, progress)
