"""The shared training loop for every triple-trained model (BPR-MF, VBPR, DVBPR, CuratorNet, ACF).

``fit_triples`` runs epochs over ``batches(epoch)`` (dicts of tensors already on the
device), optimises ``loss_fn(module, batch)`` (default ``module.loss(batch)``), validates
every ``eval_every`` epochs, stops early after ``patience`` validations without
improvement and restores the best weights. With ``max_minutes`` it also stops on time: at the
first batch past the budget (that partial epoch is validated and counted), or before an epoch
that the mean epoch time so far says would end past it; ``history.notes["stopped_by"]`` says
which rule ended training. ``make_validator`` turns a model and the
validation holdout (carved from training rows, never the test holdout) into the
``validate`` callable: mean AUC over a fixed, seeded subset of validation users.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import Recommender, TrainHistory
from visrec_pipeline.recsys.data import Holdout

_LOG = logging.getLogger("visrec.trainer")


@dataclass
class TrainConfig:
    """The training loop's settings; each triple-trained model's config holds one as ``train``, with that
    model's defaults (``seed`` also seeds its initial weights, ``device`` is where it trains and scores)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 3
    eval_every: int = 1
    val_max_users: int = 500
    seed: int = 0
    device: str = "auto"
    max_batches_per_epoch: int | None = None
    # mixed precision on CUDA: "auto" (bf16 where supported, else fp16 + GradScaler), "bf16", "fp16", "off"
    amp: str = "auto"
    # wall-clock budget for the whole training, validations included (0: none). A first run on a large
    # dataset on a CPU ends in predictable time with the best weights validated so far.
    max_minutes: float = 0.0
    # on a Ray cluster (compute engine ray): train with DistributedDataParallel over the cluster's workers,
    # each on its share of every batch (visrec_pipeline.distributed.training); here: no effect
    data_parallel: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp != "auto":
        raise ValueError(f"TrainConfig.amp must be auto|bf16|fp16|off, got {cfg.amp!r}")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _batch_len(batch: dict) -> int:
    for key in ("user", "pos"):
        if key in batch:
            return int(batch[key].shape[0])
    first = next(iter(batch.values()))
    return int(first.shape[0])


def _default_loss(module: torch.nn.Module, batch: dict) -> torch.Tensor:
    return module.loss(batch)


class OptimizerGroup:
    """Several optimisers stepped together (e.g. Adam for dense weights, SparseAdam for sparse embeddings)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def default_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | OptimizerGroup:
    """Adam over the trainable parameters. Embeddings built with ``sparse=True`` get SparseAdam instead
    ("lazy" Adam: only the rows of a batch move), so a step costs the rows it touches, not the whole
    table; their L2 belongs in the loss, as SparseAdam has no weight decay."""
    sparse_ids = {
        id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding) and m.sparse
    }
    dense = [p for p in module.parameters() if p.requires_grad and id(p) not in sparse_ids]
    sparse = [p for p in module.parameters() if p.requires_grad and id(p) in sparse_ids]
    if not sparse:
        return torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.weight_decay:
        raise ValueError("weight_decay is not supported with sparse embeddings: put the L2 term in the loss")
    opts: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=cfg.lr)]
    if dense:
        opts.append(torch.optim.Adam(dense, lr=cfg.lr))
    return OptimizerGroup(opts)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit_triples(
    module: torch.nn.Module,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    cfg: TrainConfig,
    *,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    validate: Callable[[], float] | None = None,
    optimizer: torch.optim.Optimizer | OptimizerGroup | None = None,
    log: logging.Logger | None = None,
    batches_per_epoch: int | None = None,
    clock: Callable[[], float] | None = None,
) -> TrainHistory:
    """Train ``module`` in place; returns loss per epoch, validation AUC per validation and the best epoch.

    ``batches(epoch)`` gets the 0-based epoch index; ``history.best_epoch`` is 1-based (as in logs and plots).
    With ``validate``, the weights of the best validation AUC are restored at the end.
    ``batches_per_epoch`` (when the source knows it) lets the first epoch say early what an epoch will
    cost: after its first batches (the first, a warm-up, untimed; then at least 3, up to 5 s or 20) the
    time per batch is scaled to the epoch, logged and kept in ``history.notes["epoch_estimate"]``.
    ``clock`` (default ``time.perf_counter``) times the ``max_minutes`` budget: data-parallel workers
    pass one they all agree on, so the budget stops them at the same batch.
    """
    if cfg.epochs < 1:
        raise ValueError(f"TrainConfig.epochs must be >= 1, got {cfg.epochs}")
    if cfg.eval_every < 1:
        raise ValueError(f"TrainConfig.eval_every must be >= 1, got {cfg.eval_every}")
    if not cfg.max_minutes >= 0:
        raise ValueError(f"TrainConfig.max_minutes must be >= 0 (0: no limit), got {cfg.max_minutes}")
    log = log or _LOG
    loss_fn = loss_fn or _default_loss
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    module.to(device)
    if optimizer is None:
        optimizer = default_optimizer(module, cfg)
    steppers = optimizer.optimizers if isinstance(optimizer, OptimizerGroup) else [optimizer]
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    history = TrainHistory()
    history.notes.update({"device": str(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"})
    val_epochs: list[int] = []
    triples_per_s: list[float] = []
    best_auc, best_state, stale = -math.inf, None, 0
    now = clock or time.perf_counter
    started = now()
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes > 0 else math.inf
    stopped_by = "epochs"

    for epoch in range(cfg.epochs):
        module.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per batch
        n_seen = n_batches_done = 0
        for batch in itertools.islice(batches(epoch), cfg.max_batches_per_epoch):
            n = _batch_len(batch)
            optimizer.zero_grad(set_to_none=True)
            autocast = (
                torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
            )
            with autocast:
                loss = loss_fn(module, batch)
            if scaler is not None:
                scaler.scale(loss).backward()
                for opt in steppers:
                    scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach().double() * n
            n_seen += n
            n_batches_done += 1
            if epoch == 0 and batches_per_epoch and "epoch_estimate" not in history.notes:
                if n_batches_done == 1:  # the first batch pays one-off costs (allocations, page faults)
                    t_first = time.perf_counter()
                else:
                    _estimate_first_epoch(history, log, cfg, t_first, n_batches_done - 1, batches_per_epoch)
            if budget_s < math.inf and now() - started > budget_s:
                stopped_by = "time_budget"
                break
        if n_seen == 0:
            raise RuntimeError(f"epoch {epoch + 1}: the batch source yielded no triples")
        epoch_loss = float(loss_sum) / n_seen
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        rate = n_seen / max(seconds, 1e-9)
        triples_per_s.append(rate)
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"epoch {epoch + 1}: training loss is {epoch_loss}; lower the learning rate or check the inputs"
            )
        history.loss.append(epoch_loss)
        # the budget ends training now, or the next epoch (at the mean epoch time so far) would end past it
        elapsed = now() - started
        out_of_time = stopped_by == "time_budget" or (
            epoch + 1 < cfg.epochs and elapsed + elapsed / (epoch + 1) > budget_s
        )

        auc_msg = ""
        if validate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or out_of_time):
            module.eval()
            with torch.no_grad():
                auc = float(validate())
            history.val_auc.append(auc)
            val_epochs.append(epoch + 1)
            auc_msg = f" val_auc={auc:.5f}"
            if auc > best_auc:
                best_auc, best_state, stale = auc, _snapshot(module), 0
                history.best_epoch = epoch + 1
            else:
                stale += 1
        log.info(
            "epoch %d/%d loss=%.5f%s triples/s=%.0f (%.1fs)",
            epoch + 1, cfg.epochs, epoch_loss, auc_msg, rate, seconds,
        )
        if out_of_time:
            partial = " (this epoch cut short)" if stopped_by == "time_budget" else ""
            log.info(
                "time budget: max_minutes=%g; training stopped after %d of %d epochs%s, %.0f s in all",
                cfg.max_minutes, epoch + 1, cfg.epochs, partial, elapsed,
            )
            stopped_by = "time_budget"
            break
        if validate is not None and stale >= cfg.patience:
            log.info("early stop: no validation improvement in %d evaluations", stale)
            stopped_by = "early_stopping"
            break

    if best_state is not None:
        module.load_state_dict(best_state)
    elif history.loss:
        history.best_epoch = len(history.loss)
    module.eval()
    history.seconds = now() - started
    history.notes.update(
        {
            "val_epochs": val_epochs,
            "best_val_auc": best_auc if best_state is not None else None,
            "triples_per_s": round(float(np.mean(triples_per_s)), 1) if triples_per_s else None,
            "epochs_run": len(history.loss),
            "stopped_by": stopped_by,
        }
    )
    return history


def _estimate_first_epoch(
    history: TrainHistory, log: logging.Logger, cfg: TrainConfig, t0: float, done: int, total: int
) -> None:
    """Once enough of the first epoch ran (``done`` batches since ``t0``, the end of its first batch), scale
    the time per batch to the epoch and say it."""
    spent = time.perf_counter() - t0
    if done < 3 or (spent < 5.0 and done < 20 and done < total):
        return
    total = min(total, cfg.max_batches_per_epoch or total)
    epoch_s = spent / done * total
    within = ""
    if cfg.max_minutes > 0:
        fit = max(1, min(cfg.epochs, int(cfg.max_minutes * 60.0 // max(epoch_s, 1e-9))))
        within = f"; max_minutes={cfg.max_minutes:g} leaves room for about {fit} of {cfg.epochs} epochs"
    history.notes["epoch_estimate"] = {
        "epoch_seconds": round(epoch_s, 1), "batches": total, "measured_batches": done, "basis": "first batches"
    }
    log.info(
        "one epoch estimated at %.0f s: %d batches at %.3f s (%d batches of epoch 1 after its first, validation not counted)%s",
        epoch_s, total, spent / done, done, within,
    )


# --------------------------------------------------------------------------- validation


def make_validator(model: Recommender, validation: Holdout, n_items: int, cfg: TrainConfig) -> Callable[[], float]:
    """``validate()`` -> mean AUC (standard protocol) of ``model.score`` on a fixed, seeded subset of at most
    ``cfg.val_max_users`` rows of ``validation`` (the same rows at every call, so epochs are comparable)."""
    device = resolve_device(cfg.device)

    def validate() -> float:
        from visrec_pipeline.recsys.evaluate import evaluate  # lazy: evaluation is optional for training

        result = evaluate(
            model.score, validation, n_items, ks=(), protocol="standard",
            device=device, max_users=cfg.val_max_users, seed=cfg.seed,
        )
        return float(result.means["auc"])

    return validate
