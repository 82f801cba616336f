"""The base of every model trained on triples by :func:`~visrec_pipeline.recsys.trainer.fit_triples`
(BPR-MF, VBPR, DVBPR, CuratorNet, ACF) and of their configs.

:meth:`TripleTrainedModel.fit` runs the same steps for every such model, in this order:

1. :meth:`~TripleTrainedModel.build_module` reads the inputs and builds the module, its initial
   weights drawn under :meth:`~TripleTrainedModel.seeded` (``train.seed``; the global RNG is left as it was);
2. :meth:`~TripleTrainedModel.batch_source` gives the batches of each epoch (default: uniform random triples);
3. ``fit_triples`` trains with :meth:`~TripleTrainedModel.loss_options` and
   :meth:`~TripleTrainedModel.optimizer`, rebuilding the inference cache from the current weights before
   each validation (:meth:`~TripleTrainedModel.invalidate_cache`, :meth:`~TripleTrainedModel.build_cache`);
4. the cache is rebuilt from the weights training kept.

``fit_triples`` reseeds every RNG from ``train.seed`` and the samplers draw from their own seeded
generators, so a run is a function of the config and the data.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, TypeVar

import torch
from torch import nn

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, Recommender, TrainHistory
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.samplers import RandomTripleSampler
from visrec_pipeline.recsys.trainer import OptimizerGroup, TrainConfig, fit_triples, make_validator

Batches = Callable[[int], Iterable[dict[str, torch.Tensor]]]
LossFn = Callable[[nn.Module, dict], torch.Tensor]
T = TypeVar("T")

_TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def train_defaults(**values) -> dataclasses.Field:
    """The ``train`` field of a model config, with that model's training defaults."""
    return dataclasses.field(default_factory=functools.partial(TrainConfig, **values))


@dataclass
class TripleTrainedConfig:
    """Base of the configs of triple-trained models: ``train`` holds the training loop's settings.

    Subclasses redeclare ``train`` with :func:`train_defaults`. A plain dict for ``train`` (Dagster
    config, a checkpoint's JSON) is read over the model's defaults, so it may name only some keys.
    """

    train: TrainConfig

    def __post_init__(self):
        if isinstance(self.train, dict):
            unknown = sorted(set(self.train) - _TRAIN_KEYS)
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}.train: unknown config key(s) {unknown}; known: {sorted(_TRAIN_KEYS)}"
                )
            self.train = dataclasses.replace(self._default_train(), **self.train)
        elif not isinstance(self.train, TrainConfig):
            raise TypeError(
                f"{type(self).__name__}.train must be a TrainConfig or a dict, got {type(self.train).__name__}"
            )

    @classmethod
    def _default_train(cls) -> TrainConfig:
        field = next(f for f in dataclasses.fields(cls) if f.name == "train")
        if field.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise TypeError(f"{cls.__name__}.train needs its defaults: declare it with train_defaults(...)")
        return field.default_factory()  # type: ignore[misc]


def _batches_per_epoch(notes: dict, batch_size: int) -> int | None:
    """An epoch's batch count from the batch source's notes, when they give it."""
    if notes.get("batches_per_epoch"):
        return int(notes["batches_per_epoch"])
    triples = notes.get("triples_per_epoch")
    return -(-int(triples) // batch_size) if triples else None


class _ModuleLoss:
    """``loss_fn`` for the trainer: the module's loss with this model's options."""

    def __init__(self, options: dict):
        self.options = options

    def __call__(self, module: nn.Module, batch: dict) -> torch.Tensor:
        return module.loss(batch, **self.options)


class DataParallel(Protocol):
    """How :meth:`TripleTrainedModel.fit` runs as one of several data-parallel workers (e.g. DDP; see
    ``visrec_pipeline.distributed.training``): every worker runs the same fit, on its own share of
    every batch, with the gradients averaged."""

    def shard(self, batches: Batches) -> Batches:
        """This worker's share of each batch of ``batches``."""

    def wrap(self, module: nn.Module, loss_fn: LossFn) -> tuple[nn.Module, LossFn]:
        """The module to train (it averages the gradients) and the loss computed through it."""

    def validator(self, validate: Callable[[], float] | None) -> Callable[[], float] | None:
        """``validate`` run once for all workers (each gets its result)."""

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        """This worker's training settings."""

    def clock(self) -> float:
        """Seconds on a clock every worker reads alike (the ``max_minutes`` budget stops them together)."""

    def finish(self, history: TrainHistory) -> None:
        """After training: make ``history`` the whole run's (e.g. losses over every worker's share)."""


class TripleTrainedModel(Recommender):
    """A recommender whose ``module`` is trained on triple batches; subclasses implement the hooks."""

    config: TripleTrainedConfig

    def __init__(self, config: TripleTrainedConfig, **kw):
        super().__init__(config, **kw)
        self.module: nn.Module | None = None

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def build_module(self, data: RecData, inputs: FitInputs, device: torch.device) -> tuple[nn.Module, dict]:
        """The module to train (initial weights drawn with :meth:`seeded`) and notes on the inputs it took."""

    def batch_source(self, data: RecData, inputs: FitInputs, device: torch.device) -> tuple[Batches, dict]:
        """``(batches(epoch), notes)``: by default uniform random triples of ``data.train``."""
        return self.random_triples(data, device)

    def loss_options(self) -> dict:
        """Keyword arguments of ``module.loss(batch, ...)`` besides the batch."""
        return {}

    def optimizer(self, module: nn.Module) -> torch.optim.Optimizer | OptimizerGroup | None:
        """None: the trainer's default optimiser."""
        return None

    @abc.abstractmethod
    def invalidate_cache(self) -> None:
        """Forget the inference cache: the weights changed."""

    @abc.abstractmethod
    def build_cache(self) -> None:
        """Build the inference cache from the current weights (if it is not built)."""

    # ------------------------------------------------------------------ helpers for the hooks
    def seeded(self, build: Callable[[], T]) -> T:
        """``build()`` with torch's CPU RNG seeded by ``train.seed`` and restored afterwards."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            return build()

    def random_triples(
        self,
        data: RecData,
        device: torch.device | str,
        triples_per_epoch: int | None = None,
        user_chunk: int = 1,
        profile_rows_per_triple: int = 0,
        profile_cap: int = 0,
    ) -> tuple[Batches, dict]:
        """Uniform BPR triples of ``data.train`` on ``device`` and the sampler's summary (``user_chunk``,
        ``profile_rows_per_triple``, ``profile_cap``: see :class:`~visrec_pipeline.recsys.samplers.RandomTripleSampler`)."""
        cfg = self.config.train
        sampler = RandomTripleSampler(
            data.train, seed=cfg.seed, device=device, batch_size=cfg.batch_size, triples_per_epoch=triples_per_epoch,
            user_chunk=user_chunk, profile_rows_per_triple=profile_rows_per_triple, profile_cap=profile_cap,
        )
        return sampler.epoch, sampler.summary()

    def trained_module(self) -> nn.Module:
        """The module to score with; an error before ``fit()`` or ``load_state_dict()``."""
        if self.module is None:
            raise RuntimeError(f"{self.name}: call fit() or load_state_dict() before scoring")
        return self.module

    # ------------------------------------------------------------------ training
    def fit(self, data: RecData, inputs: FitInputs, *, parallel: DataParallel | None = None) -> TrainHistory:
        """Train as described in the module docstring. Validation AUC (early stopping) uses
        ``inputs.validation``; without it every epoch runs and the last weights are kept. ``parallel``:
        as one of several data-parallel workers (see :class:`DataParallel`)."""
        cfg = self.config.train
        device = resolve_device(cfg.device)
        module, input_notes = self.build_module(data, inputs, device)
        self.module = module.to(device)
        self.invalidate_cache()
        batches, sampler_notes = self.batch_source(data, inputs, device)
        validate = self._validator(data, inputs)
        options = self.loss_options()
        loss_fn: LossFn = _ModuleLoss(options)
        optimizer = self.optimizer(self.module)
        trained, train_cfg = self.module, cfg
        if parallel is not None:
            batches = parallel.shard(batches)
            trained, loss_fn = parallel.wrap(self.module, loss_fn)
            validate = parallel.validator(validate)
            train_cfg = parallel.train_config(cfg)
        history = fit_triples(
            trained,
            batches,
            train_cfg,
            loss_fn=loss_fn,
            validate=validate,
            optimizer=optimizer,
            log=self.log,
            batches_per_epoch=_batches_per_epoch(sampler_notes, cfg.batch_size),
            clock=parallel.clock if parallel is not None else None,
        )
        if parallel is not None:
            parallel.finish(history)
        self.invalidate_cache()
        self.build_cache()  # from the weights training kept
        history.notes["sampler"] = sampler_notes
        if validate is None:
            history.notes["validation"] = "none given: all epochs run, last weights kept"
        history.notes.update(input_notes)
        return history

    def refit_overrides(self, history: TrainHistory) -> dict:
        # the epoch early stopping kept, run to the end (a fit without validation keeps the last weights)
        return {"train": {"epochs": int(history.best_epoch)}} if history.best_epoch else {}

    def _validator(self, data: RecData, inputs: FitInputs | None) -> Callable[[], float] | None:
        if inputs is None or inputs.validation is None or len(inputs.validation) == 0:
            return None
        check = make_validator(self, inputs.validation, data.n_items, self.config.train)

        def validate() -> float:
            self.invalidate_cache()  # the weights changed since the cache was built
            self.build_cache()
            return check()

        return validate
