"""Batched feature extraction: DataLoader workers decode and preprocess, the model runs in batches.

Speed comes from: worker processes decoding JPEGs while the model computes, whole batches per
forward, no autograd bookkeeping, channels-last tensors (oneDNN / cuDNN fast paths) and reduced
precision where the hardware does it natively. On CUDA: bf16/fp16 autocast. On CPU: a copy of the
model converted to bf16 outright (CPUs with AVX512-BF16/AMX; autocast would re-cast every weight on
every call), traced and frozen with TorchScript and run by the oneDNN Graph fuser, which prepacks the
weights once and fuses each conv with its ReLU / residual add (eager mode reorders every weight per
call and makes a separate memory pass per ReLU and add). ``precision="int8"`` (CPU, opt-in) runs a
post-training quantized model instead (see embeddings/int8.py). Results go to a ``sink(positions, pooled,
spatial)`` (e.g. a :class:`~visrec_pipeline.embeddings.store.ShardWriter`), so nothing holds all
features in memory.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.embeddings import int8
from visrec_pipeline.embeddings.backbones import BackboneSpec
from visrec_pipeline.embeddings.malloc import retain_freed_memory
from visrec_pipeline.embeddings.weights import WeightsChoice, build_model

log = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)
EXTRACTION_DEVICES = ("auto", "cpu", "cuda")

Sink = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], None]
Progress = Callable[[int, int, float], None]


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: nn.Module  # the torchvision model, eval mode
    transform: nn.Module  # exactly spec.weights.transforms()
    weights: WeightsChoice
    # Models prepared for a device / precision / graph mode (see prepare_model), kept so that a
    # process extracting several times traces once.
    prepared: dict = field(default_factory=dict, repr=False)
    # Prepared once, for one extraction: a bf16 variant may then convert ``model`` in place instead of
    # copying it (a copy is what lets one backbone run at several precisions).
    single_use: bool = False

    @functools.cached_property
    def extractor(self) -> nn.Module:
        """The traced feature extractor returning ``{"pooled": ..., "spatial": ...}`` (batch norms folded
        into ``model``'s convolutions); built on first use: small jobs read ``model`` with hooks instead."""
        return self.spec.feature_extractor(self.model)


def load_backbone(
    spec: BackboneSpec,
    weights: str = "auto",
    *,
    seed: int = 0,
    download_timeout_s: float = 10.0,
    init_cache_dir: str | os.PathLike | None = None,
    single_use: bool = False,
) -> LoadedBackbone:
    model, choice = build_model(
        spec, weights, seed=seed, download_timeout_s=download_timeout_s, init_cache_dir=init_cache_dir
    )
    if choice.warning:
        log.warning(choice.warning)
    return LoadedBackbone(spec, model, spec.transforms(), choice, single_use=single_use)


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32; ``torch.int8`` stands for the quantized CPU model.

    ``auto``: bf16 on CUDA when supported (fp16 otherwise); on CPU bf16 only where the CPU does it
    natively (emulated bf16 is slower than fp32), else fp32. ``int8`` (CPU only, never picked by auto:
    its features differ a little more from fp32, see embeddings/int8.py).
    """
    if precision == "fp32":
        return None
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError("precision int8 runs on CPU (use bf16 or fp16 on CUDA)")
        reason = int8.unavailable_reason()
        if reason:
            raise RuntimeError(f"precision int8 is not available: {reason}")
        return torch.int8
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_native_bf16() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs device cuda (use bf16 or fp32 on CPU)")
        return torch.float16
    raise ValueError(f"precision must be auto|fp32|bf16|fp16|int8, got {precision!r}")


@dataclass
class PreparedModel:
    model: nn.Module  # returns {"pooled": ..., "spatial": ...}
    input_dtype: torch.dtype  # what the batches are cast to before the forward
    autocast: torch.dtype | None  # CUDA only
    graph: str  # "eager" | "jit+onednn" | "int8+onednn", reported in ExtractStats
    note: str | None = None  # why the graph mode could not be used, if it could not
    eager: nn.Module | None = None  # the same computation without the graph, should the fuser fail at run time

    def fall_back_to_eager(self, exc: Exception, name: str) -> str:
        """Switch this (cached) model to eager for good; the note says why."""
        assert self.eager is not None
        self.model, self.graph, self.eager = self.eager, "eager", None
        self.note = f"{name}: the fused TorchScript graph failed ({type(exc).__name__}: {exc}); running eager"
        log.warning(self.note)
        return self.note


def prepare_model(
    backbone: LoadedBackbone, dev: torch.device, amp: torch.dtype | None, cpu_graph: bool = True, light: bool = False
) -> PreparedModel:
    """The model as it will run (cached on ``backbone``). ``backbone.extractor`` / ``.model`` are only
    ever moved to ``dev`` (channels-last): the bf16 and traced variants are copies, so one LoadedBackbone
    can run at several precisions. ``light``: a few images, eager, outputs read by hooks where the
    spec's nodes are modules (no trace, no batch-norm folding to pay for)."""
    # The thread count is part of the key: fused oneDNN partitions keep the one they were compiled with.
    key = (str(dev), amp, cpu_graph and dev.type == "cpu" and not light, light, torch.get_num_threads())
    if key not in backbone.prepared:
        if backbone.single_use and backbone.prepared:
            raise RuntimeError(f"{backbone.spec.name} was loaded for a single use and is already prepared for one")
        prepared = _prepare_light(backbone, dev, amp) if light else None
        backbone.prepared[key] = prepared or _prepare(backbone, dev, amp, cpu_graph)
    return backbone.prepared[key]


def _prepare_light(backbone: LoadedBackbone, dev: torch.device, amp: torch.dtype | None) -> PreparedModel | None:
    if dev.type == "cpu" and amp is not None:  # converted and made channels-last in one pass
        model, dtype, autocast = _in_dtype(backbone, backbone.model.eval(), amp, channels_last=True), amp, None
    else:
        model = backbone.model.to(dev, memory_format=torch.channels_last).eval()
        dtype, autocast = torch.float32, amp if dev.type == "cuda" else None
    hooked = backbone.spec.hooked_extractor(model)
    return PreparedModel(hooked, dtype, autocast, "eager") if hooked is not None else None


def _in_dtype(backbone: LoadedBackbone, module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> nn.Module:
    """``module`` (part of ``backbone``) in ``dtype``: converted in place when the backbone is for a single
    use, else a converted copy that leaves the backbone as it is for other precisions."""
    if not backbone.single_use:
        return _converted_copy(module, dtype, channels_last)
    return module.to(dtype=dtype, memory_format=torch.channels_last) if channels_last else module.to(dtype)


def _converted_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> nn.Module:
    """A deep copy of ``module`` with its floating-point tensors in ``dtype``, converted while copying
    (one pass over the weights instead of an fp32 copy and then a conversion), in ``module``'s
    train/eval mode: a deep copy of torchvision's feature extractor comes back in training mode, which
    made AlexNet's bf16 features go through its classifier's Dropout."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if channels_last and t.dim() == 4:
            return t.detach().to(dtype, memory_format=torch.channels_last)
        return t.detach().to(dtype)

    memo: dict[int, object] = {}
    for p in module.parameters():
        if p.is_floating_point():
            memo[id(p)] = nn.Parameter(convert(p), requires_grad=p.requires_grad)
    for b in module.buffers():
        if b.is_floating_point():
            memo[id(b)] = convert(b)
    out = copy.deepcopy(module, memo).to(dtype)
    return (out.to(memory_format=torch.channels_last) if channels_last else out).train(module.training)


def _prepare(backbone: LoadedBackbone, dev: torch.device, amp: torch.dtype | None, cpu_graph: bool) -> PreparedModel:
    base = backbone.extractor.to(dev, memory_format=torch.channels_last).eval()
    if dev.type == "cuda":
        return PreparedModel(base, torch.float32, amp, "eager")
    model, dtype = base, torch.float32
    if amp is not None:
        model, dtype = _in_dtype(backbone, base, amp), amp
    if not cpu_graph:
        return PreparedModel(model, dtype, None, "eager")
    crop = int(backbone.transform.crop_size[0])
    example = torch.zeros(1, 3, crop, crop, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        # TorchScript is deprecated upstream in favour of torch.compile, which on CPU needs a C++
        # toolchain at run time and ~1 min of compilation per process; tracing takes seconds.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            # check_trace=False: the check re-runs the model; the graph has no data-dependent control flow.
            traced = torch.jit.freeze(torch.jit.trace(model, example, strict=False, check_trace=False).eval())
        # oneDNN Graph compiles on the first calls with each input shape, and it rejects some graphs
        # only then (AlexNet's classifier in bf16): the eager model stays at hand for that case.
        return PreparedModel(traced, dtype, None, "jit+onednn", eager=model)
    except Exception as exc:  # any tracing failure leaves the eager model, which computes the same thing
        note = f"{backbone.spec.name}: TorchScript tracing failed ({type(exc).__name__}: {exc}); running eager"
        log.warning(note)
        return PreparedModel(model, dtype, None, "eager", note)


def _calibration_head(batches, n_images: int) -> tuple[torch.Tensor, list]:
    """The first ``n_images`` readable images of ``batches`` and the batches read to get them (to be
    run again: they are part of the extraction)."""
    head, images, have = [], [], 0
    for batch in batches:
        head.append(batch)
        _, x, errors = batch
        good = torch.tensor([not e for e in errors], dtype=torch.bool)
        images.append(x[good])
        have += int(good.sum())
        if have >= n_images:
            break
    if not have:
        raise RuntimeError("int8 calibration needs readable images and none of these could be read")
    return torch.cat(images)[:n_images], head


def _prepare_int8(
    backbone: LoadedBackbone, batches, calibration_file: Path | None, n_images: int, batch_size: int
) -> tuple[object, PreparedModel, str]:
    """The int8 model, calibrated on the stored calibration images, or on the first ``n_images`` of this
    extraction (then stored at ``calibration_file`` for the runs to come); returns the batch iterator to
    go on with and where the calibration came from."""
    stored = int8.load_calibration(calibration_file) if calibration_file is not None else None
    source = f"{len(stored)} stored images ({calibration_file})" if stored is not None else ""
    if stored is None:
        images, head = _calibration_head(batches, n_images)
        batches = itertools.chain(head, batches)
        stored = int8.as_calibration(images)
        if calibration_file is not None:
            int8.save_calibration(calibration_file, stored)
        source = f"the first {len(stored)} images of this run" + (
            f", stored at {calibration_file}" if calibration_file is not None else " (not stored)"
        )
        log.info(f"{backbone.spec.name}: int8 calibrated on {source}")
    digest = hashlib.blake2b(stored.tobytes(), digest_size=16).hexdigest()
    graph_batch = min(batch_size, int8.GRAPH_BATCH)
    key = ("cpu", torch.int8, graph_batch, torch.get_num_threads(), digest)
    if key not in backbone.prepared:
        extractor = backbone.extractor.to(memory_format=torch.channels_last).eval()
        try:
            model = int8.quantize_extractor(extractor, stored, graph_batch)
        except Exception as exc:  # export / quantizer / lowering: a graph the toolchain cannot take
            raise RuntimeError(
                f"{backbone.spec.name}: int8 quantization failed ({type(exc).__name__}: {str(exc)[:500]}); "
                "precision auto or bf16 computes these features without it"
            ) from exc
        backbone.prepared[key] = PreparedModel(model, torch.float32, None, "int8+onednn")
    return batches, backbone.prepared[key], source


def default_num_workers(device: torch.device | None = None) -> int:
    """Decode workers: min(2, CPUs) next to a CPU model (it already uses every core; measured on 2
    cores, 0 and 2 workers run alike); min(8, CPUs) feeding a GPU, where JPEG decoding is the bottleneck."""
    cap = 8 if device is not None and device.type == "cuda" else 2
    return min(cap, os.cpu_count() or 1)


class ImageFileDataset(Dataset):
    """``(position, preprocessed image, error)``; an unreadable file gives zeros and the error text."""

    def __init__(self, paths: Sequence[Path | str | None], transform: nn.Module):
        self.paths = list(paths)
        self.transform = transform
        crop = int(transform.crop_size[0])
        self._blank_shape = (3, crop, crop)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        path = self.paths[i]
        if path is None:
            return i, torch.zeros(self._blank_shape), "no usable image path"
        try:
            with Image.open(path) as im:
                x = self.transform(im.convert("RGB"))
            return i, x, ""
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return i, torch.zeros(self._blank_shape), f"{type(exc).__name__}: {exc}"


@dataclass
class ExtractStats:
    n_images: int
    n_ok: int
    failures: list[tuple[int, str]] = field(default_factory=list)  # (position, error)
    seconds: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    num_workers: int = 0
    batch_size: int = 0
    retained_memory: bool = False
    graph: str = "eager"
    prepare_seconds: float = 0.0  # copying / tracing the model; 0 when an earlier call on the backbone did it
    int8_calibration: str = ""  # precision int8: which images the model was calibrated on
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0


_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _loader(dataset: Dataset, batch_size: int, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin,
        # Workers prefetch two batches each: decoding overlaps the forward pass.
        prefetch_factor=2 if num_workers > 0 else None,
        # Forked workers start in milliseconds. A Dagster step process is itself a forkserver child,
        # which makes "forkserver" its default start method: each worker then re-imported torch and
        # this package, 25 s before the first batch of the CPU demo.
        multiprocessing_context=_FORK if num_workers > 0 else None,
    )


def _start(loader_factory: Callable[[int], DataLoader], num_workers: int, notes: list[str]):
    """An iterator over the loader; if worker processes cannot start here (e.g. inside a daemonic
    process, or no semaphores), fall back to decoding in this process."""
    if num_workers > 0:
        try:
            return iter(loader_factory(num_workers)), num_workers
        except (AssertionError, OSError, RuntimeError) as exc:
            msg = f"DataLoader workers could not start ({type(exc).__name__}: {exc}); falling back to num_workers=0"
            log.warning(msg)
            notes.append(msg)
    return iter(loader_factory(0)), 0


# Up to this many images, tracing the graph and starting decode workers cost more than they save
# (ResNet-50 on 15 images, 2 CPUs: 0.92 s with both, 0.47 s without).
SMALL_JOB_IMAGES = 64


def extract_features(
    backbone: LoadedBackbone,
    paths: Sequence[Path | str | None],
    sink: Sink,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: Progress | None = None,
    progress_every: int = 10,
    retain_memory: bool = True,
    cpu_graph: bool = True,
    small_job: int = SMALL_JOB_IMAGES,
    int8_calibration: str | os.PathLike | None = None,
    int8_calibration_images: int = int8.CALIBRATION_IMAGES,
) -> ExtractStats:
    """Run ``backbone`` over the images at ``paths``; ``sink(positions, pooled f32 [b, d], spatial f16 [b, R, C] | None)``
    receives every successfully decoded batch (positions index ``paths``). ``retain_memory``: keep freed
    buffers in the heap meanwhile (see :mod:`visrec_pipeline.embeddings.malloc`). ``cpu_graph``: on CPU,
    run a traced, frozen TorchScript graph with oneDNN Graph fusion (False: eager, as on CUDA).
    ``small_job``: up to this many images (an incremental refresh), run eager and decode in this
    process when the workers are left to auto (``num_workers`` None or < 0); not for int8, whose
    features must come from the quantized model whatever the job size. ``int8_calibration``: the file
    holding the int8 calibration images of this feature set (read if present, else written from the
    first ``int8_calibration_images`` images of this run); None calibrates on this run only."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device, allowed=EXTRACTION_DEVICES)
    amp = resolve_precision(precision, dev)
    auto_workers = num_workers is None or num_workers < 0
    small = len(paths) <= small_job and amp != torch.int8
    workers = (0 if small else default_num_workers(dev)) if auto_workers else num_workers
    cpu_graph = cpu_graph and not small
    stats = ExtractStats(
        n_images=len(paths),
        n_ok=0,
        device=str(dev),
        precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}[amp],
        batch_size=batch_size,
    )
    if not paths:
        return stats
    dataset = ImageFileDataset(paths, backbone.transform)
    pin = dev.type == "cuda"
    t0 = time.perf_counter()  # includes preparing (copying, tracing) the model: every run pays for it
    with ExitStack() as stack:
        stats.retained_memory = stack.enter_context(retain_freed_memory(retain_memory))
        t_prep = time.perf_counter()
        batches = None
        if amp == torch.int8:
            # the workers start first: the calibration images come from them
            batches, stats.num_workers = _start(lambda w: _loader(dataset, batch_size, w, pin), workers, stats.notes)
            calibration = Path(int8_calibration) if int8_calibration is not None else None
            batches, prepared, stats.int8_calibration = _prepare_int8(
                backbone, batches, calibration, int8_calibration_images, batch_size
            )
        else:
            prepared = prepare_model(backbone, dev, amp, cpu_graph, light=small)
        stats.prepare_seconds = time.perf_counter() - t_prep
        stats.graph = prepared.graph
        if prepared.note:
            stats.notes.append(prepared.note)
        if prepared.graph == "jit+onednn":
            # oneDNN Graph fusion is a process-wide TorchScript setting: on only while this graph runs.
            stack.enter_context(torch.jit.fuser("fuser3"))
        if batches is None:
            batches, stats.num_workers = _start(lambda w: _loader(dataset, batch_size, w, pin), workers, stats.notes)
        _run(backbone, prepared, batches, sink, dev, pin, stats, progress, progress_every)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stats.seconds = time.perf_counter() - t0
    return stats


def _run(backbone, prepared: PreparedModel, batches, sink, dev, pin, stats: ExtractStats, progress, progress_every) -> None:
    n_total = stats.n_images
    t0 = time.perf_counter()
    done = 0
    model, amp = prepared.model, prepared.autocast
    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext()
    with torch.inference_mode(), autocast:
        for b, (pos, x, errors) in enumerate(batches, start=1):
            pos = pos.numpy()
            good = np.array([not e for e in errors], dtype=bool)
            stats.failures.extend((int(p), e) for p, e in zip(pos[~good], np.asarray(errors, dtype=object)[~good]))
            if good.any():
                if not good.all():
                    x, pos = x[torch.from_numpy(good)], pos[good]
                x = x.to(dev, prepared.input_dtype, non_blocking=pin, memory_format=torch.channels_last)
                # the fuser profiles and compiles anew for every input shape: a short batch (the last one,
                # or one with unreadable images) runs eager instead of paying that for a few images
                run_model = prepared.eager if prepared.eager is not None and x.shape[0] != stats.batch_size else model
                try:
                    out = run_model(x)
                except RuntimeError as exc:
                    if prepared.eager is None:
                        raise
                    stats.notes.append(prepared.fall_back_to_eager(exc, backbone.spec.name))
                    stats.graph = prepared.graph
                    model = prepared.model
                    out = model(x)
                pooled = out["pooled"].flatten(1).float()
                if not torch.isfinite(pooled).all():
                    raise FloatingPointError(
                        f"{backbone.spec.name}: non-finite features in batch {b} ({backbone.weights.used}, {stats.precision})"
                    )
                spatial = None
                if "spatial" in out:
                    s = out["spatial"]  # [b, C, H, W] -> [b, H*W, C]
                    spatial = s.flatten(2).transpose(1, 2).float().clamp_(-FP16_MAX, FP16_MAX).half().cpu().numpy()
                sink(pos, pooled.cpu().numpy(), spatial)
                stats.n_ok += int(good.sum())
            done += len(errors)
            if progress is not None and (b % progress_every == 0 or done == n_total):
                progress(done, n_total, done / max(time.perf_counter() - t0, 1e-9))
