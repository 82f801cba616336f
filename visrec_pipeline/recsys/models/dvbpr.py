"""DVBPR (Kang et al., ICDM 2017): BPR with a CNN trained end-to-end from the item images.

``x_ui = gamma_u . gamma_i + theta_u . phi(X_i)``, ``phi`` a CNN over the image ``X_i``, applied
with shared weights to the positive and the negative image of each triple (a siamese pair),
trained with the BPR loss, L2 on ``theta`` and ``gamma`` (per triple) and weight decay on the CNN.
``gamma_dim = 0`` gives the paper's purely visual form; the tutorial kept the latent factors.

Architectures (:func:`cnn_spec`): ``cnnf``, the paper's CNN-F (conv 64 11x11/4, LRN, pool;
conv 256 5x5, LRN, pool; 3 x conv 256 3x3, pool; fc 4096, fc 4096 with dropout; fc K), with
a width multiplier and a configurable fc width; and ``alexnet``, the tutorial's AlexNet shape.
Two presets: :meth:`DVBPRConfig` defaults (CNN-F at 224 px, for real data on a GPU) and
:meth:`DVBPRConfig.demo` (the same layout at 64 px, 1/4 width, no LRN: CPU-sized).

Images come from ``FitInputs.images(item_idx) -> uint8 [b, 3, H, W]`` and are resized in torch
once. At inference ``phi(X_i)`` of every item is computed once, in item-index order (row ``r``
of the cache is the image of item ``r``), and scores are matrix products. On CUDA the trainer
runs the loss under autocast (bf16, or fp16 with a GradScaler) and the CNN uses channels_last.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.cost import CostEstimate
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.model_spec import ModelSpec, register
from visrec_pipeline.recsys.trainer import TrainConfig
from visrec_pipeline.recsys.triple_model import TripleTrainedConfig, TripleTrainedModel, train_defaults

_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: a neutral, conventional input scaling
_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- CNN


@dataclass(frozen=True)
class CNNSpec:
    conv: tuple[tuple[int, int, int, int, bool], ...]  # (channels, kernel, stride, padding, max-pool after)
    fc: tuple[int, ...]  # hidden fully connected widths (each: Linear, ReLU, Dropout)
    lrn_after: tuple[int, ...] = ()  # conv layers followed by local response normalisation
    dropout: float = 0.5
    adaptive_pool: tuple[int, int] | None = None  # AlexNet's average pool to 6x6 before the fc layers
    pool_ceil: bool = True


def cnn_spec(
    architecture: str,
    *,
    width_mult: float = 1.0,
    fc_dim: int | None = None,
    lrn: bool | None = None,
    dropout: float = 0.5,
) -> CNNSpec:
    """The layer plan of ``cnnf`` (CNN-F, Chatfield et al. 2014, as in DVBPR) or ``alexnet``."""

    def w(c: int) -> int:
        return max(1, int(round(c * width_mult)))

    if architecture == "cnnf":
        conv = (
            (w(64), 11, 4, 0, True),
            (w(256), 5, 1, 2, True),
            (w(256), 3, 1, 1, False),
            (w(256), 3, 1, 1, False),
            (w(256), 3, 1, 1, True),
        )
        fc = fc_dim or 4096
        return CNNSpec(conv, (fc, fc), (0, 1) if lrn in (None, True) else (), dropout, None, True)
    if architecture == "alexnet":
        conv = (
            (w(64), 11, 4, 2, True),
            (w(192), 5, 1, 2, True),
            (w(384), 3, 1, 1, False),
            (w(256), 3, 1, 1, False),
            (w(256), 3, 1, 1, True),
        )
        fc = fc_dim or 4096
        return CNNSpec(conv, (fc, fc), (0, 1) if lrn else (), dropout, (6, 6), False)
    raise ValueError(f"unknown DVBPR architecture {architecture!r}; expected 'cnnf' or 'alexnet'")


class ImageCNN(nn.Module):
    """``phi``: uint8 images ``[b, 3, S, S]`` -> ``[b, K]``."""

    def __init__(self, spec: CNNSpec, input_size: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for i, (ch, k, s, p, pool) in enumerate(spec.conv):
            layers += [nn.Conv2d(c, ch, k, s, p), nn.ReLU(inplace=True)]
            if i in spec.lrn_after:
                layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
            if pool:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=spec.pool_ceil))
            c = ch
        if spec.adaptive_pool is not None:
            layers.append(nn.AdaptiveAvgPool2d(spec.adaptive_pool))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            try:
                flat = self.features(torch.zeros(1, 3, input_size, input_size)).numel()
            except RuntimeError as exc:
                raise ValueError(f"input_size={input_size} is too small for this CNN ({exc})") from exc
        head: list[nn.Module] = []
        d = flat
        for h in spec.fc:
            head += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(spec.dropout)]
            d = h
        head.append(nn.Linear(d, out_dim))
        self.head = nn.Sequential(*head)
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(torch.flatten(self.features(x), 1))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[b, 3, H, W]`` -> uint8 ``[b, 3, size, size]`` (antialiased bilinear; the store's
    thumbnails are square already)."""
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def load_images(image_fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, size: int) -> torch.Tensor:
    """Images of item indices ``idx`` through ``FitInputs.images``, checked and resized to ``size``."""
    imgs = image_fn(idx.cpu())
    if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.ndim != 4 or imgs.shape[1] != 3:
        got = f"{type(imgs).__name__} {getattr(imgs, 'dtype', '')} {tuple(getattr(imgs, 'shape', ()))}"
        raise ValueError(f"FitInputs.images must return a uint8 tensor [b, 3, H, W]; got {got}")
    if imgs.shape[0] != idx.shape[0]:
        raise ValueError(f"FitInputs.images returned {imgs.shape[0]} images for {idx.shape[0]} item indices")
    return resize_images(imgs, size)


def _time_cnn(cnn: ImageCNN, device: torch.device, n_images: int) -> tuple[float, float]:
    """Seconds per image of ``cnn``'s forward+backward and of its forward alone (one warm-up pass each)."""
    images = torch.randint(0, 256, (n_images, 3, cnn.input_size, cnn.input_size), dtype=torch.uint8, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step():
        cnn.zero_grad(set_to_none=True)
        cnn(images).float().sum().backward()

    def infer_step():
        with torch.no_grad():
            cnn(images)

    timings = []
    for step in (train_step, infer_step):
        step()
        sync()
        started = time.perf_counter()
        step()
        sync()
        timings.append((time.perf_counter() - started) / n_images)
    return timings[0], timings[1]


def _epoch_estimate(cfg: "DVBPRConfig", data: RecData, inputs: FitInputs, device: torch.device) -> dict:
    spec = cnn_spec(cfg.architecture, width_mult=cfg.width_mult, fc_dim=cfg.fc_dim, lrn=cfg.lrn, dropout=cfg.dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cnn = ImageCNN(spec, cfg.input_size, cfg.k).to(device)
    n_images = 2 if device.type == "cpu" else 64
    train_s, infer_s = _time_cnn(cnn, device, n_images)
    while train_s * n_images < 0.2 and n_images < 128:  # a cheap CNN: time it on batches closer to training's
        n_images *= 4
        train_s, infer_s = _time_cnn(cnn, device, n_images)
    del cnn
    n_items = max(data.n_items, 1)
    decode_s = 0.0
    if inputs.images is not None and data.n_items:
        idx = torch.arange(min(8, data.n_items))
        started = time.perf_counter()
        load_images(inputs.images, idx, cfg.input_size)
        decode_s = (time.perf_counter() - started) / idx.numel()
    b = cfg.train.batch_size
    batches = math.ceil(data.train.nnz / b)
    if cfg.train.max_batches_per_epoch is not None:
        batches = min(batches, cfg.train.max_batches_per_epoch)
    # distinct items among 2b uniform draws (popular items repeat more: an upper bound)
    distinct = n_items * (1.0 - math.exp(-2.0 * b / n_items))
    in_memory = data.n_items * 3 * cfg.input_size**2 / 2**20 <= cfg.image_cache_mb
    per_batch = distinct * (train_s + (0.0 if in_memory else decode_s))
    validation = data.n_items * (infer_s + (0.0 if in_memory else decode_s))
    if inputs.validation is None or len(inputs.validation) == 0:
        validation = data.n_items * infer_s  # the inference cache is built after training all the same
    return {
        "epoch_seconds": batches * per_batch + validation,
        "setup_seconds": data.n_items * decode_s if in_memory else 0.0,
        "batches": int(batches),
        "distinct_images_per_batch": int(round(distinct)),
        "train_s_per_image": train_s,
        "infer_s_per_image": infer_s,
        "decode_s_per_image": decode_s,
        "images_in_memory": bool(in_memory),
    }


# --------------------------------------------------------------------------------------------- module


class DVBPRModule(nn.Module):
    def __init__(self, n_users: int, n_items: int, cnn: ImageCNN, k: int, gamma_dim: int):
        super().__init__()
        self.cnn = cnn
        self.theta = nn.Embedding(n_users, k)
        self.gamma_user = nn.Embedding(n_users, gamma_dim)
        self.gamma_item = nn.Embedding(n_items, gamma_dim)
        for emb in (self.theta, self.gamma_user, self.gamma_item):
            nn.init.normal_(emb.weight, std=0.1)
        # the resized images of every item, in item-index order (absent when they do not fit)
        self.register_buffer("images", None, persistent=False)
        self.image_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def item_images(self, idx: torch.Tensor) -> torch.Tensor:
        if self.images is not None:
            return self.images[idx]
        if self.image_fn is None:
            raise RuntimeError("DVBPR: no images to train or cache with")
        return load_images(self.image_fn, idx, self.cnn.input_size).to(idx.device)

    def loss(self, batch: dict[str, torch.Tensor], *, reg: float = 0.0) -> torch.Tensor:
        user, pos, neg = batch["user"], batch["pos"], batch["neg"]
        b = pos.shape[0]
        # each distinct image of the batch goes through the CNN once (same gradients as twice)
        uniq, inv = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        phi = self.cnn(self.item_images(uniq)).float()
        theta, g_u = self.theta(user), self.gamma_user(user)
        g_i, g_j = self.gamma_item(pos), self.gamma_item(neg)
        x_uij = (theta * (phi[inv[:b]] - phi[inv[b:]])).sum(1) + (g_u * (g_i - g_j)).sum(1)
        l2 = (theta**2).sum(1) + (g_u**2).sum(1) + (g_i**2).sum(1) + (g_j**2).sum(1)
        return -F.logsigmoid(x_uij).mean() + reg * l2.mean()


# --------------------------------------------------------------------------------------------- model


# the CPU-sized preset as plain config values (e.g. a Dagster run config for the demo dataset)
DEMO_OVERRIDES: dict = {
    "train": {"epochs": 8, "batch_size": 4096, "lr": 1e-2, "weight_decay": 1e-5},
    "reg": 1e-4,
    "input_size": 64,
    "width_mult": 0.25,
    "fc_dim": 256,
    "lrn": False,
    "dropout": 0.2,
}


# ``preset: cpu``: the demo's CPU-sized CNN and training settings, and at most this many batches
# (x 4096 triples) per epoch, so an epoch costs the same on any catalogue (see README, DVBPR on a CPU)
CPU_PRESET_MAX_BATCHES = 24
CPU_PRESET: dict = {
    **{k: v for k, v in DEMO_OVERRIDES.items() if k != "train"},
    "train": {**{k: v for k, v in DEMO_OVERRIDES["train"].items() if k != "epochs"},
              "max_batches_per_epoch": CPU_PRESET_MAX_BATCHES},
}
PRESETS = ("paper", "cpu")


@dataclass
class DVBPRConfig(TripleTrainedConfig):
    """Defaults: the paper's CNN-F at 224 px with K = 50 (real data, GPU). See :meth:`demo`."""

    # train.weight_decay: Adam L2 on the CNN weights (not on the embeddings: ``reg`` covers those)
    # data_parallel: the CNN's forward/backward is the cost, and DDP over the cluster's workers divides it
    train: TrainConfig = train_defaults(epochs=10, batch_size=128, lr=1e-4, weight_decay=1e-4, data_parallel=True)
    reg: float = 1e-3  # L2 on theta_u, gamma_u, gamma_i, gamma_j of each triple
    k: int = 50  # visual factors (phi's output size)
    gamma_dim: int = 50  # latent (non-visual) factors; 0 = the paper's purely visual form
    architecture: str = "cnnf"  # "cnnf" (paper) or "alexnet" (tutorial)
    input_size: int = 224
    width_mult: float = 1.0
    fc_dim: int = 4096
    lrn: bool = True
    dropout: float = 0.5
    image_cache_mb: int = 8192  # keep all resized images in memory when they fit in this budget
    cache_batch_size: int = 256  # images per CNN pass when building the inference cache
    # "paper": the settings as given; "cpu": keys left at their paper defaults take CPU_PRESET's values
    preset: str = "paper"
    # training stops before it starts when one epoch is estimated longer than this (0 = no limit)
    max_estimated_epoch_minutes: float = 60.0

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"DVBPRConfig.preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "cpu":
            self._apply_cpu_preset()
        super().__post_init__()
        if self.k < 1 or self.gamma_dim < 0:
            raise ValueError(f"DVBPRConfig: k must be >= 1 and gamma_dim >= 0 (got {self.k}, {self.gamma_dim})")
        if self.input_size < 16:
            raise ValueError(f"DVBPRConfig.input_size must be >= 16, got {self.input_size}")
        cnn_spec(self.architecture)  # validates the name

    def _apply_cpu_preset(self) -> None:
        """Every key still at its paper default takes the CPU preset's value; keys given stay."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for key, value in CPU_PRESET.items():
            if key != "train" and getattr(self, key) == defaults[key]:
                setattr(self, key, value)
        preset_train = CPU_PRESET["train"]
        if isinstance(self.train, dict):
            self.train = {**preset_train, **self.train}
        else:
            paper = type(self)._default_train()
            self.train = replace(
                self.train, **{k: v for k, v in preset_train.items() if getattr(self.train, k) == getattr(paper, k)}
            )

    @classmethod
    def demo(cls, **overrides) -> "DVBPRConfig":
        """CPU-sized: CNN-F's layout at 64 px, 1/4 of the channels, fc 256, no LRN (LRN costs more
        than the convolutions at this width); large batches, since a batch of 2 x 4096 images of a
        1,500-item catalogue holds each distinct image once. A ``train`` dict in ``overrides`` is
        read over the preset's training settings."""
        base = cls(**DEMO_OVERRIDES)
        train = overrides.pop("train", base.train)
        if isinstance(train, dict):
            train = replace(base.train, **train)
        return replace(base, train=train, **overrides)


class DVBPR(TripleTrainedModel):
    name = "dvbpr"
    config_cls = DVBPRConfig

    def __init__(self, config: DVBPRConfig | None = None, **kw):
        super().__init__(config or DVBPRConfig(), **kw)
        self.phi_cache: torch.Tensor | None = None  # [n_items, K], row r = phi(image of item r)

    def _build(self, n_users: int, n_items: int) -> DVBPRModule:
        cfg = self.config
        spec = cnn_spec(
            cfg.architecture, width_mult=cfg.width_mult, fc_dim=cfg.fc_dim, lrn=cfg.lrn, dropout=cfg.dropout
        )
        return DVBPRModule(n_users, n_items, ImageCNN(spec, cfg.input_size, cfg.k), cfg.k, cfg.gamma_dim)

    @staticmethod
    def _preload(image_fn, n_items: int, size: int, device, chunk: int = 256) -> torch.Tensor:
        out = torch.empty((n_items, 3, size, size), dtype=torch.uint8)
        for s in range(0, n_items, chunk):
            idx = torch.arange(s, min(s + chunk, n_items), dtype=torch.long)
            out[s : s + idx.numel()] = load_images(image_fn, idx, size)
        return out.to(device)

    # ------------------------------------------------------------------ training hooks
    def build_module(self, data: RecData, inputs: FitInputs, device: torch.device) -> tuple[nn.Module, dict]:
        cfg = self.config
        if inputs.images is None:
            raise ValueError(f"{self.name} needs the item images (FitInputs.images) but none were given")
        module = self.seeded(lambda: self._build(data.n_users, data.n_items))
        if device.type == "cuda":
            module.cnn.to(memory_format=torch.channels_last)
        table_mb = data.n_items * 3 * cfg.input_size**2 / 2**20
        if table_mb <= cfg.image_cache_mb:
            module.images = self._preload(inputs.images, data.n_items, cfg.input_size, device)
        else:  # decode per batch (slow; raise image_cache_mb if memory allows)
            module.image_fn = inputs.images
        notes = {
            "images": {
                "input_size": cfg.input_size,
                "in_memory": module.images is not None,
                "table_mb": round(table_mb, 1),
            },
            "cnn_parameters": int(sum(p.numel() for p in module.cnn.parameters())),
        }
        return module, notes

    def loss_options(self) -> dict:
        return {"reg": self.config.reg}

    # ------------------------------------------------------------------ cost
    def estimate_epoch_cost(self, data: RecData, inputs: FitInputs) -> CostEstimate:
        """One epoch's wall time here: the CNN's forward+backward timed on a few images (and the image
        loader on a few items), scaled by the distinct images of an epoch's batches and the inference
        pass of each validation. Costs seconds (it builds the CNN, not the embeddings)."""
        cfg = self.config
        device = resolve_device(cfg.train.device)
        est = _epoch_estimate(cfg, data, inputs, device)
        options = []
        if device.type != "cuda":
            options.append("train on a GPU: set train.device to 'cuda' (or keep 'auto' on a machine with one)")
        if cfg.preset != "cpu":
            preset = _epoch_estimate(DVBPRConfig(preset="cpu", train={"device": cfg.train.device}), data, inputs, device)
            options.append(
                f"use the CPU preset: set preset: cpu in model_dvbpr's config (CNN-F layout at 64 px, 1/4 width, at "
                f"most {CPU_PRESET_MAX_BATCHES} x 4096 triples per epoch): estimated {preset['epoch_seconds']:.0f} s "
                "per epoch here"
            )
        options.append(
            "skip DVBPR: leave model_dvbpr and evaluation_dvbpr out of the assets you materialize (the report "
            "lists the models that ran)"
        )
        options.append("train anyway: raise max_estimated_epoch_minutes (0 = no limit)")
        return CostEstimate(
            model=self.name,
            device=str(device),
            epoch_seconds=est["epoch_seconds"],
            setup_seconds=est["setup_seconds"],
            basis=(
                f"{est['batches']} batches x ~{est['distinct_images_per_batch']} distinct images of "
                f"{cfg.input_size} px at {est['train_s_per_image'] * 1e3:.1f} ms per image (forward+backward, "
                f"measured), + {data.n_items} images at {est['infer_s_per_image'] * 1e3:.1f} ms for validation"
            ),
            options=tuple(options),
            details={k: v for k, v in est.items() if k not in ("epoch_seconds", "setup_seconds")},
        )

    def optimizer(self, module: DVBPRModule) -> torch.optim.Optimizer:
        """Adam with weight decay on the CNN only (the embeddings' L2 is ``reg``, in the loss)."""
        cfg = self.config.train
        emb_params = [module.theta.weight, module.gamma_user.weight, module.gamma_item.weight]
        return torch.optim.Adam(
            [
                {"params": list(module.cnn.parameters()), "weight_decay": cfg.weight_decay},
                {"params": emb_params, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )

    def invalidate_cache(self) -> None:
        self.phi_cache = None

    def build_cache(self) -> None:
        self.item_cache()

    # ------------------------------------------------------------------ inference
    def _autocast(self, device: torch.device):
        """The training's mixed precision for the cache pass too (CUDA only; ``amp="off"`` disables)."""
        amp = self.config.train.amp
        if device.type != "cuda" or amp == "off":
            return torch.autocast(device_type="cpu", enabled=False)
        bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if bf16 else torch.float16)

    @torch.no_grad()
    def item_cache(self) -> torch.Tensor:
        """``phi(X_i)`` of every item in item-index order, built once per CNN weights."""
        module = self.trained_module()
        if self.phi_cache is None:
            was = module.training
            module.eval()
            device = module.theta.weight.device
            n = module.gamma_item.num_embeddings
            step = max(1, self.config.cache_batch_size)
            parts = []
            for s in range(0, n, step):
                idx = torch.arange(s, min(s + step, n), device=device)
                with self._autocast(device):
                    parts.append(module.cnn(module.item_images(idx)).float())
            module.train(was)
            self.phi_cache = torch.cat(parts)
        return self.phi_cache

    @torch.no_grad()
    def score(self, batch: ScoreBatch) -> torch.Tensor:
        """``gamma_u . gamma_i + theta_u . phi_i`` for every item; users unknown to training get 0."""
        module = self.trained_module()
        phi = self.item_cache()
        device = phi.device
        user = batch.user_idx.to(device).long()
        known = (user >= 0).unsqueeze(1)
        u = user.clamp(min=0)
        left = torch.cat([module.theta(u), module.gamma_user(u)], 1)
        right = torch.cat([phi, module.gamma_item.weight], 1)
        return torch.where(known, left @ right.T, torch.zeros((), device=device))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        module = self.trained_module()
        state = {f"module.{k}": v for k, v in module.state_dict().items()}
        state["phi_cache"] = self.item_cache()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "module.theta.weight" not in state or "phi_cache" not in state:
            raise KeyError(f"{self.name}: state lacks the embeddings or the phi cache")
        n_users = state["module.theta.weight"].shape[0]
        n_items = state["module.gamma_item.weight"].shape[0]
        module = self._build(n_users, n_items)
        module.load_state_dict({k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")})
        device = resolve_device(self.config.train.device)
        self.module = module.to(device).eval()
        self.phi_cache = state["phi_cache"].float().to(device)


register(
    ModelSpec(
        "dvbpr",
        DVBPR,
        DVBPRConfig,
        frozenset({"images", "triples_random"}),
        "DVBPR (Kang et al. 2017): BPR with a CNN (CNN-F) trained end-to-end from the item images.",
    )
)
