"""Feature extraction on a Ray cluster: the distributed form of ``update.extract``.

The plan's images become ``(position, item_id, path)`` rows of a Ray Dataset cut into one block per
shard; ``map_batches`` runs them through a fixed pool of actors (one per worker, with the CPUs and
GPUs of the compute settings). Each actor loads the backbone once, from the same state dict file
as the driver (the weights are fingerprinted on both sides), decodes the thumbnails from the
content-addressed store (a path every node reads) and writes its batch's features into a new shard
of its own with :class:`~visrec_pipeline.embeddings.store.ShardWriter`; what comes back to the driver
is one small row per image (shard, row, error) and the shard's file digests. The driver alone
commits the index (``update.commit``): DuckDB keeps one writer.

A shard is written whole by one actor call, so a batch is as large as a shard: ``rows_per_shard``
bounds it, and the plan is cut into at least one batch per worker. Progress comes from a counter
actor that the extractors bump after every model batch; the driver polls it while Ray Data runs.

No Dagster import: the embeddings asset, the benchmark and the tests call this.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from visrec_pipeline.distributed.cluster import ComputeSettings
from visrec_pipeline.embeddings import int8, store, update
from visrec_pipeline.embeddings.backbones import BackboneSpec
from visrec_pipeline.embeddings.extract import (
    ExtractStats,
    ImageFileDataset,
    LoadedBackbone,
    Progress,
    _calibration_head,
    _loader,
    extract_features,
    resolve_precision,
)
from visrec_pipeline.embeddings.shard_files import FileDigest
from visrec_pipeline.embeddings.thumbnails import thumbnail_path
from visrec_pipeline.embeddings.weights import build_model, imagenet_cache_path, random_init_cache_path

# A shard is one actor call: at most this many images (ResNet-50's spatial maps: 20 GB), so a run
# over a million images leaves ~10 shards, under the store's compaction threshold.
MAX_ROWS_PER_SHARD = 100_000


@dataclass(frozen=True)
class WeightsSource:
    """How an actor rebuilds the driver's weights: a state dict file every node reads (the cached
    ImageNet file, the random-init cache or the user's file), else torchvision's seeded init."""

    file: str | None
    seed: int = 0
    fingerprint: str = ""  # of the driver's state: an actor with other weights refuses to run


def state_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor of ``model``'s state (names, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_source(backbone: LoadedBackbone, init_cache_dir: str | Path | None) -> WeightsSource:
    """Where the actors load ``backbone``'s weights from (see :class:`WeightsSource`)."""
    spec, choice = backbone.spec, backbone.weights
    if backbone.prepared or "extractor" in vars(backbone):
        # preparing folds batch norms into the model in place: its state is no longer the file's
        raise ValueError(f"{spec.name}: the weights of a backbone that already ran cannot be fingerprinted; load a fresh one")
    kind, _, rest = choice.tag.partition(":")
    fingerprint = state_fingerprint(backbone.model)
    if kind == "imagenet":
        return WeightsSource(str(imagenet_cache_path(spec.weights)), fingerprint=fingerprint)
    if kind == "file":
        return WeightsSource(str(Path(choice.setting).expanduser().resolve()), fingerprint=fingerprint)
    if kind == "random":
        seed = int(rest.partition("=")[2])
        cached = random_init_cache_path(init_cache_dir, spec, seed) if init_cache_dir is not None else None
        path = str(cached) if cached is not None and cached.is_file() else None
        return WeightsSource(path, seed, fingerprint)
    raise ValueError(f"{spec.name}: weights tag {choice.tag!r} names no source the Ray workers can load")


class _ShardExtractor:
    """A Ray Data actor: the backbone loaded once; each call extracts one batch into a new shard."""

    def __init__(
        self,
        spec: BackboneSpec,
        source: WeightsSource,
        features_dir: str,
        weights_tag: str,
        calibration: str,
        threads: int,
        options: dict,
        counter: Any,
    ):
        torch.set_num_threads(threads)
        model, choice = build_model(spec, source.file or "random", seed=source.seed)
        got = state_fingerprint(model)
        if source.fingerprint and got != source.fingerprint:
            raise RuntimeError(
                f"{spec.name}: the weights this Ray worker loaded from {source.file or 'the seeded init'} are not the "
                f"driver's (fingerprint {got} != {source.fingerprint}): is the file on shared storage and unchanged?"
            )
        self.backbone = LoadedBackbone(spec, model, spec.transforms(), choice)
        self.features_dir, self.tag, self.calibration = features_dir, weights_tag, calibration
        self.options, self.counter = options, counter
        self.ready_at = time.time()  # wall clock: the driver compares it with its own (one machine, or synced clocks)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        positions = batch["position"].to_numpy(np.int64)
        paths = [p or None for p in batch["path"]]
        reported = [0]

        def progress(done: int, _total: int, _rate: float) -> None:
            self.counter.add.remote(done - reported[0])  # fire and forget: the driver polls the total
            reported[0] = done

        spec = self.backbone.spec
        with store.ShardWriter(self.features_dir, spec.name, self.tag, batch["item_id"].to_numpy(np.int64)) as writer:
            stats = extract_features(
                self.backbone, paths, writer.write, progress=progress, progress_every=1,
                int8_calibration=self.calibration, **self.options,
            )
        errors = np.full(len(batch), "", dtype=object)
        for p, e in stats.failures:
            errors[p] = e
        good = errors == ""
        meta = {
            "digests": {k: [d.bytes, d.sha256] for k, d in writer.digests.items()},
            "device": stats.device, "precision": stats.precision, "graph": stats.graph,
            "num_workers": stats.num_workers, "seconds": stats.seconds, "prepare_seconds": stats.prepare_seconds,
            "ready_at": self.ready_at, "int8_calibration": stats.int8_calibration, "notes": stats.notes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "actor": f"{socket.gethostname()}:{os.getpid()}",
        }
        return pd.DataFrame(
            {
                "position": positions,
                "shard": writer.shard or "",
                "row": np.where(good, np.arange(len(batch)), -1),
                "error": errors.astype(str),
                # one copy per batch, on its first row
                "meta": [json.dumps(meta)] + [""] * (len(batch) - 1),
            }
        )


def _progress_counter():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressCounter:
        def __init__(self):
            self.done = 0

        def add(self, n: int) -> None:
            self.done += n

        def total(self) -> int:
            return self.done

    return ProgressCounter.remote()


@dataclass(frozen=True)
class RayExtraction:
    extraction: update.Extraction
    workers: int  # actors in the pool
    shards: int  # batches = shards written
    # from the call until the last actor had loaded the backbone (process start, imports, weights;
    # included in extraction.stats.seconds)
    setup_seconds: float
    worker_peak_rss_mb: float  # the largest actor process's peak resident memory
    actors_used: int  # actors that wrote at least one shard


def _ensure_int8_calibration(backbone: LoadedBackbone, paths: list, calibration: Path, batch_size: int) -> None:
    """Calibrate int8 on the driver, as a local run would (the first readable images of the run):
    actors calibrating on their own batches would quantize each shard differently."""
    if int8.load_calibration(calibration) is not None:
        return
    dataset = ImageFileDataset(paths, backbone.transform)
    images, _ = _calibration_head(iter(_loader(dataset, batch_size, 0, False)), int8.CALIBRATION_IMAGES)
    int8.save_calibration(calibration, int8.as_calibration(images))


def _decode_workers(num_workers: int | None, settings: ComputeSettings) -> int:
    """DataLoader workers inside an actor: as asked, else the actor's CPUs beyond the one running
    the model (the node's core count is not the actor's share)."""
    if num_workers is not None and num_workers >= 0:
        return num_workers
    cap = 8 if settings.gpus_per_worker > 0 else 2
    return min(cap, max(0, int(settings.cpus_per_worker) - 1))


def extract_on_ray(
    backbone: LoadedBackbone,
    plan: update.Plan,
    root: Path,
    features_dir: Path,
    settings: ComputeSettings,
    *,
    init_cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    progress_every_s: float = 10.0,
    rows_per_shard: int = MAX_ROWS_PER_SHARD,
    num_workers: int | None = None,
    wait_for_actors_s: float = 600.0,
    **options: Any,
) -> RayExtraction:
    """Features of ``plan.todo`` computed by actors of the connected Ray cluster (see the module doc;
    ``ray.init`` is the caller's, e.g. :func:`~visrec_pipeline.distributed.cluster.ray_session`).
    ``options``: :func:`extract_features`' device, precision, batch_size, cpu_graph, run in every
    actor. ``progress(done, total, images_per_s)`` is called on this thread every ``progress_every_s``
    and at the end. ``wait_for_actors_s``: how long the whole actor pool may take to start (an
    autoscaling cluster adds nodes first). Returns an :class:`update.Extraction` for :func:`update.commit` (one shard per
    batch), with the pool's size."""
    import ray

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    spec, tag = backbone.spec, backbone.weights.tag
    todo = plan.todo
    n = len(todo)
    t0, started_at = time.perf_counter(), time.time()
    precision = options.get("precision", "auto")
    stats = ExtractStats(n_images=n, n_ok=0, precision=precision, batch_size=int(options.get("batch_size", 32)))
    if n == 0:
        return RayExtraction(update.Extraction(stats, _empty_rows(), [], {}), 0, 0, 0.0, 0.0, 0)
    resources = ray.cluster_resources()
    workers = settings.worker_count(resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    item_ids = todo["item_id"].to_numpy(np.int64)
    paths = [thumbnail_path(root, p) for p in todo["path"]]
    calibration = store.calibration_path(features_dir, spec.name, tag, spec.revision)
    if precision == "int8":
        resolve_precision("int8", torch.device("cpu"))  # a clear error here rather than in every actor
        _ensure_int8_calibration(backbone, paths, calibration, stats.batch_size)

    # blocks of exactly `batch` rows but the last: Ray Data bundles a smaller block with the next
    # one into one actor call, which would leave another actor idle
    batch = math.ceil(n / max(min(workers, n), math.ceil(n / rows_per_shard)))
    bounds = np.append(np.arange(0, n, batch), n)
    units = len(bounds) - 1
    rows = pd.DataFrame(
        {"position": np.arange(n, dtype=np.int64), "item_id": item_ids, "path": [str(p) if p else "" for p in paths]}
    )
    blocks = [rows.iloc[lo:hi].reset_index(drop=True) for lo, hi in zip(bounds[:-1], bounds[1:])]
    counter = _progress_counter()
    actor_options = {**options, "num_workers": _decode_workers(num_workers, settings)}
    try:
        # the dataset takes a copy of the context when it is created
        with _data_context(wait_for_actors_s):
            dataset = ray.data.from_pandas(blocks).map_batches(
                _ShardExtractor,
                fn_constructor_kwargs={
                    "spec": spec, "source": weights_source(backbone, init_cache_dir), "features_dir": str(features_dir),
                    "weights_tag": tag, "calibration": str(calibration), "threads": max(1, int(settings.cpus_per_worker)),
                    "options": actor_options, "counter": counter,
                },
                batch_size=batch,
                batch_format="pandas",
                # one batch at a time per actor: a batch is a whole shard, queueing a second one on a
                # busy actor would leave another idle
                compute=ray.data.ActorPoolStrategy(size=min(workers, units), max_tasks_in_flight_per_actor=1),
                num_cpus=settings.cpus_per_worker,
                num_gpus=settings.gpus_per_worker or None,
            )
            outputs, failed = _run_and_report(dataset, counter, n, t0, progress, progress_every_s)
    finally:
        ray.kill(counter)
    if failed is not None:
        _remove_shards(features_dir, spec.name, tag, {s for out in outputs for s in out["shard"] if s})
        raise failed
    return _gather(outputs, todo, item_ids, stats, t0, started_at, workers=min(workers, units))


@contextmanager
def _data_context(wait_for_actors_s: float):
    """Ray Data settings of this run: no progress bars or banners in the step's output (the progress
    callback reports), and no batch handed out before the whole pool has started (the first actor
    up would otherwise take a second shard while another is still loading the backbone)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    keys = ("enable_progress_bars", "print_on_execution_start", "wait_for_min_actors_s")
    saved = {k: getattr(ctx, k) for k in keys}
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    ctx.wait_for_min_actors_s = max(1, math.ceil(wait_for_actors_s))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def _run_and_report(dataset, counter, total: int, t0: float, progress, every_s: float):
    """Ray Data runs while a thread drains it; this thread reports the counter's total meanwhile."""
    import ray

    outputs: list[pd.DataFrame] = []
    failed: list[BaseException] = []

    def drain() -> None:
        try:
            for out in dataset.iter_batches(batch_size=None, batch_format="pandas"):
                outputs.append(out)
        except BaseException as exc:  # re-raised on the calling thread
            failed.append(exc)

    thread = threading.Thread(target=drain, name="ray-embeddings", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=every_s)
        if progress is not None and thread.is_alive():
            done = min(int(ray.get(counter.total.remote())), total)  # a retried batch counts twice
            progress(done, total, done / max(time.perf_counter() - t0, 1e-9))
    if progress is not None and not failed:
        progress(total, total, total / max(time.perf_counter() - t0, 1e-9))
    return outputs, (failed[0] if failed else None)


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {"item_id": np.zeros(0, np.int64), "shard": np.zeros(0, str), "row": np.zeros(0, np.int64), "content_hash": []}
    )


def _gather(
    outputs: list[pd.DataFrame],
    todo: pd.DataFrame,
    item_ids: np.ndarray,
    stats: ExtractStats,
    t0: float,
    started_at: float,
    workers: int,
) -> RayExtraction:
    out = pd.concat(outputs, ignore_index=True).sort_values("position", kind="stable")
    pos = out["position"].to_numpy(np.int64)
    if len(pos) != len(todo) or not np.array_equal(pos, np.arange(len(todo))):
        raise RuntimeError(
            f"the Ray workers returned {len(pos)} results for {len(todo)} images ({len(np.unique(pos))} distinct): "
            "a batch was lost or repeated"
        )
    metas = [json.loads(m) for m in out["meta"] if m]
    shards = {
        s: {k: FileDigest(int(b), str(h)) for k, (b, h) in m["digests"].items()}
        for s, m in zip((s for s, m in zip(out["shard"], out["meta"]) if m), metas)
        if s
    }
    good = (out["error"] == "").to_numpy()
    rows = pd.DataFrame(
        {
            "item_id": item_ids[pos[good]],
            "shard": out["shard"].to_numpy()[good],
            "row": out["row"].to_numpy(np.int64)[good],
            "content_hash": todo["content_hash"].to_numpy()[pos[good]],
        }
    )
    stats.failures = [(int(p), str(e)) for p, e in zip(pos[~good], out["error"].to_numpy()[~good])]
    failures = [(int(item_ids[p]), e) for p, e in stats.failures]
    stats.n_ok = int(good.sum())
    stats.seconds = time.perf_counter() - t0
    first = metas[0]
    stats.device, stats.precision, stats.graph = first["device"], first["precision"], first["graph"]
    stats.num_workers = int(first["num_workers"])
    stats.int8_calibration = first["int8_calibration"]
    stats.prepare_seconds = max(m["prepare_seconds"] for m in metas)
    stats.notes = sorted({note for m in metas for note in m["notes"]})
    setup = max(0.0, max(m["ready_at"] for m in metas) - started_at)
    rss = max(m["peak_rss_mb"] for m in metas)
    used = len({m["actor"] for m in metas})
    return RayExtraction(update.Extraction(stats, rows, failures, shards), workers, len(metas), setup, rss, used)


def _remove_shards(features_dir: Path, backbone: str, tag: str, shards: set[str]) -> None:
    """The files of shards a failed run wrote (no index row points at them)."""
    for shard in shards:
        for kind in store.KINDS:
            store.shard_path(features_dir, backbone, tag, shard, kind).unlink(missing_ok=True)
