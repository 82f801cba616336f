"""Training on a Ray cluster (no Dagster import): :class:`RayFitter` is a ``pipeline.training.Fitter``.

A model whose config says ``train.data_parallel`` (DVBPR by default) trains with Ray Train's
``TorchTrainer`` and DistributedDataParallel (gloo on CPU, NCCL on GPU): every worker runs
``TripleTrainedModel.fit`` with :class:`TorchDDP`, samples the same seeded epoch and keeps its own
disjoint share of every batch (``train.batch_size`` stays the global batch), DDP averages the
gradients, rank 0 alone validates and broadcasts the AUC (so early stopping decides the same on
every worker), and rank 0 hands the final state back through a Ray Train checkpoint under
``storage`` (shared storage: every node writes there). Every other model trains as one Ray task
with the CPUs/GPUs of the compute settings and returns its state. The driver writes the model's
checkpoint as a local training does (``pipeline.training.train_model``).

Inputs travel from the driver through Ray's object store; the images of DVBPR stay in the image
store and are read by path on the workers (``model_io.thumbnail_loader``), so the data folder must be
mounted at the same path on every node.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from visrec_pipeline.distributed.cluster import ComputeSettings, ray_session
from visrec_pipeline.pipeline.training import Fitter, fit_here
from visrec_pipeline.recsys.base import FitInputs, Recommender, TrainHistory
from visrec_pipeline.recsys.cost import CostEstimate, estimate_cost
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.trainer import TrainConfig
from visrec_pipeline.recsys.triple_model import Batches, LossFn, TripleTrainedModel

Progress = Callable[[str], None]
STATE_FILE = "state.pt"


def wants_data_parallel(model: Recommender) -> bool:
    """Whether ``model`` trains with DDP on a cluster: a triple-trained model whose ``train.data_parallel`` is set."""
    train = getattr(model.config, "train", None)
    return isinstance(model, TripleTrainedModel) and bool(getattr(train, "data_parallel", False))


# ------------------------------------------------------------------------------------------ DDP worker


class _LossOf(nn.Module):
    """The loss as the forward pass: DDP averages the gradients of what its forward computed."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.inner, batch)


def _call(module: nn.Module, batch: dict) -> torch.Tensor:
    return module(batch)


def batch_share(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor] | None:
    """Worker ``rank``'s share of ``batch`` (consecutive rows, sizes within one of each other), or None
    when the batch has fewer rows than workers (every worker then skips it alike)."""
    sizes = {k: int(v.shape[0]) for k, v in batch.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"data-parallel training splits batches by row; these tensors differ in rows: {sizes}")
    if n < world:
        return None
    return {k: torch.tensor_split(v, world)[rank] for k, v in batch.items()}


class TorchDDP:
    """:class:`~visrec_pipeline.recsys.triple_model.DataParallel` over the default torch.distributed
    process group (the one Ray Train's TorchTrainer starts)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = int(rank), int(world), torch.device(device)

    def shard(self, batches: Batches) -> Batches:
        def share(epoch: int):
            for batch in batches(epoch):
                part = batch_share(batch, self.rank, self.world)
                if part is not None:
                    yield part

        return share

    def wrap(self, module: nn.Module, loss_fn: LossFn) -> tuple[nn.Module, LossFn]:
        wrapper = _LossOf(module, loss_fn)
        # non-persistent buffers are derived (DVBPR's table of resized images, the input scaling): each
        # worker builds its own; syncing them would copy the image table to every worker
        persistent = set(wrapper.state_dict())
        derived = [name for name, _ in wrapper.named_buffers() if name not in persistent]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, derived)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(wrapper, device_ids=ids, forward_sync_buffers=False), _call

    def validator(self, validate: Callable[[], float] | None) -> Callable[[], float] | None:
        if validate is None:
            return None

        def once() -> float:
            value = torch.zeros(1, dtype=torch.float64, device=self.device)
            if self.rank == 0:
                value[0] = float(validate())
            dist.broadcast(value, src=0)
            return float(value[0])

        return once

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        # the sampler and the validation keep the config's seed; dropout draws differ per worker
        return dataclasses.replace(cfg, seed=cfg.seed + self.rank)

    def clock(self) -> float:
        # rank 0's clock for all: each worker's own would stop them at different batches of the
        # max_minutes budget, and the others would wait in DDP forever
        value = torch.tensor([time.perf_counter() if self.rank == 0 else 0.0], dtype=torch.float64, device=self.device)
        dist.broadcast(value, src=0)
        return float(value[0])

    def finish(self, history: TrainHistory) -> None:
        losses = torch.tensor(history.loss, dtype=torch.float64, device=self.device)
        dist.all_reduce(losses)  # each worker's mean over its (equal) share: their mean is the batch's
        history.loss = (losses / self.world).tolist()
        history.notes["data_parallel"] = {"workers": self.world, "backend": dist.get_backend(), "device": str(self.device)}


class _QueueHandler(logging.Handler):
    """Log records of a remote worker, formatted, into a Ray queue the driver reads."""

    def __init__(self, queue):
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put(self.format(record), block=False)
        except Exception:  # progress is best effort: a full or gone queue never fails training
            pass


def quiet_read_only_arrays() -> None:
    # the inputs come from Ray's object store as read-only numpy arrays; torch.as_tensor warns that it
    # cannot mark them read-only, and nothing here writes to them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _remote_logger(queue, name: str) -> logging.Logger:
    log = logging.Logger(f"visrec.remote.{name}", logging.INFO)  # not registered: one per worker run
    log.propagate = False
    if queue is not None:
        handler = _QueueHandler(queue)
        handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
        log.addHandler(handler)
    return log


def _ddp_worker(config: dict) -> None:
    """Ray Train's loop on each worker: fit with :class:`TorchDDP`; rank 0 reports the state and history."""
    import ray
    import ray.train
    import ray.train.torch

    quiet_read_only_arrays()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    model, data, inputs = ray.get(config["payload"])
    device = ray.train.torch.get_device() if config["gpu"] else torch.device("cpu")
    model.config.train = dataclasses.replace(model.config.train, device=str(device))
    model.log = _remote_logger(config["progress"] if rank == 0 else None, f"{model.name} rank {rank}")
    history = model.fit(data, inputs, parallel=TorchDDP(rank, world, device))
    metrics = {"epochs": len(history.loss)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(tmp) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            metrics["history"] = dataclasses.asdict(history)
        ray.train.report(metrics, checkpoint=checkpoint)  # a barrier: every worker reports once


# ------------------------------------------------------------------------------------------ driver


def _progress_queue():
    from ray.util.queue import Queue

    # no CPU: the workers hold every CPU of a small cluster
    return Queue(maxsize=10_000, actor_options={"num_cpus": 0})


def _forward_progress(queue, progress: Progress | None, timeout: float) -> None:
    from ray.util.queue import Empty

    try:
        message = queue.get(timeout=timeout) if timeout > 0 else queue.get_nowait()
    except Empty:
        return
    while True:
        if progress is not None:
            progress(message)
        try:
            message = queue.get_nowait()
        except Empty:
            return


def _while_forwarding(run: Callable[[], object], queue, progress: Progress | None):
    """``run()`` in a thread while the worker's log lines go to ``progress`` here."""
    with ThreadPoolExecutor(1, thread_name_prefix="ray-fit") as pool:
        future = pool.submit(run)
        while not future.done():
            _forward_progress(queue, progress, timeout=0.5)
        _forward_progress(queue, progress, timeout=0)
        return future.result()


def _cluster_workers(settings: ComputeSettings) -> int:
    import ray

    resources = ray.cluster_resources()
    return settings.worker_count(resources.get("CPU", 0.0), resources.get("GPU", 0.0))


def _shippable(model: Recommender) -> Recommender:
    # the driver's logger (e.g. Dagster's) does not travel; the worker gets its own
    shipped = copy.copy(model)
    shipped.log = logging.getLogger(f"visrec.{model.name}")
    return shipped


@dataclass
class RayFitter:
    """A ``pipeline.training.Fitter`` on the Ray cluster this process is connected to (see
    ``cluster.ray_session``): DDP for a model with ``train.data_parallel``, one Ray task otherwise.
    ``storage``: a folder on shared storage for Ray Train's run (removed after each fit);
    ``progress`` receives the remote training's log lines (epoch, loss, validation AUC)."""

    settings: ComputeSettings
    storage: Path
    progress: Progress | None = None

    def __call__(self, model: Recommender, data: RecData, inputs: FitInputs) -> tuple[TrainHistory, dict[str, torch.Tensor]]:
        if wants_data_parallel(model):
            return self.fit_data_parallel(model, data, inputs)
        return self.fit_in_task(model, data, inputs)

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def fit_data_parallel(self, model: Recommender, data: RecData, inputs: FitInputs):
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        _cpus, gpus = task_resources(model, self.settings)
        workers = _cluster_workers(dataclasses.replace(self.settings, gpus_per_worker=gpus))
        resources = {"CPU": self.settings.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})}
        queue = _progress_queue()
        run_name = f"{model.name}-{uuid.uuid4().hex[:8]}"
        self.storage.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            _ddp_worker,
            train_loop_config={
                "payload": ray.put((_shippable(model), data, inputs)),
                "progress": queue,
                "threads": max(1, int(self.settings.cpus_per_worker)),
                "gpu": gpus > 0,
            },
            torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=str(self.storage)),
        )
        self._say(f"{model.name}: data-parallel training (DDP) on {workers} Ray worker(s) of {resources}")
        started = time.perf_counter()
        try:
            result = _while_forwarding(trainer.fit, queue, self.progress)
            if result.checkpoint is None:
                raise RuntimeError(f"{model.name}: the data-parallel training returned no checkpoint")
            with result.checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
            history = TrainHistory(**result.metrics["history"])
        finally:
            shutil.rmtree(self.storage / run_name, ignore_errors=True)
            queue.shutdown(force=True)
        history.notes["distributed"] = {"engine": "ray", "mode": "ddp", "workers": workers, "wall_seconds": round(time.perf_counter() - started, 2)}
        return history, state

    def estimate_cost(self, model: Recommender, data: RecData, inputs: FitInputs) -> CostEstimate | None:
        """The model's epoch cost measured in a task with a training worker's resources (e.g. on a GPU
        of the cluster, not on the machine of the step). Under DDP it is one worker's figure: each
        worker trains on its share of every batch, so an epoch takes less."""
        import ray

        if not hasattr(model, "estimate_epoch_cost"):
            return None  # a cheap model: nothing to measure
        cpus, gpus = task_resources(model, self.settings)
        task = ray.remote(_estimate_task).options(num_cpus=cpus, num_gpus=gpus)
        return ray.get(task.remote(_shippable(model), data, inputs, max(1, int(cpus))))

    def fit_in_task(self, model: Recommender, data: RecData, inputs: FitInputs):
        import ray

        cpus, gpus = task_resources(model, self.settings)
        queue = _progress_queue()
        task = ray.remote(_fit_task).options(num_cpus=cpus, num_gpus=gpus)
        self._say(f"{model.name}: training as one Ray task ({cpus:g} CPU, {gpus:g} GPU)")
        started = time.perf_counter()
        try:
            ref = task.remote(_shippable(model), data, inputs, queue, max(1, int(cpus)))
            history, state = _while_forwarding(lambda: ray.get(ref), queue, self.progress)
        finally:
            queue.shutdown(force=True)
        history.notes["distributed"] = {"engine": "ray", "mode": "task", "cpus": cpus, "gpus": gpus, "wall_seconds": round(time.perf_counter() - started, 2)}
        return history, state


def task_resources(model: Recommender, settings: ComputeSettings) -> tuple[float, float]:
    """CPUs and GPUs of a model's training task: the settings', and one GPU at least for a model whose
    config asks for CUDA."""
    device = str(getattr(getattr(model.config, "train", model.config), "device", "auto"))
    gpus = settings.gpus_per_worker
    if device.startswith("cuda") and gpus == 0:
        gpus = 1.0
    return settings.cpus_per_worker, gpus


def _estimate_task(model: Recommender, data: RecData, inputs: FitInputs, threads: int) -> CostEstimate | None:
    quiet_read_only_arrays()
    torch.set_num_threads(threads)
    return estimate_cost(model, data, inputs)


def _fit_task(model: Recommender, data: RecData, inputs: FitInputs, queue, threads: int):
    quiet_read_only_arrays()
    torch.set_num_threads(threads)
    model.log = _remote_logger(queue, model.name)
    history = model.fit(data, inputs)
    return history, {k: v.detach().cpu() for k, v in model.state_dict().items()}


@contextmanager
def fitter_for(settings: ComputeSettings, storage: Path, progress: Progress | None = None) -> Iterator[Fitter]:
    """The fitter the compute settings ask for: here (``local``), or a :class:`RayFitter` connected to
    the cluster for the duration of the block (``ray``; ``local:N`` starts a private one)."""
    if not settings.distributed:
        yield fit_here
        return
    with ray_session(settings):
        yield RayFitter(settings, storage, progress)
