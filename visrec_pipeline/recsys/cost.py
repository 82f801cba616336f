"""What a model's training will cost, said before it starts; a stop when that is past a limit.

A model that can be expensive implements ``estimate_epoch_cost(data, inputs) -> CostEstimate``
(measured on this machine: e.g. a few timed batches scaled by the batches of an epoch);
:func:`check_before_fit` logs it and raises :class:`CostTooHighError` — with the estimate and the
ways on — when one epoch would take longer than the model config's ``max_estimated_epoch_minutes``
(0 or absent: no limit). Models without the method are not checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from visrec_pipeline.recsys.base import FitInputs, Recommender
from visrec_pipeline.recsys.data import RecData

_LOG = logging.getLogger("visrec.cost")


@dataclass(frozen=True)
class CostEstimate:
    """One epoch's estimated wall time on ``device`` and how it was obtained."""

    model: str
    device: str
    epoch_seconds: float  # one training epoch (its validation pass included)
    setup_seconds: float = 0.0  # once before the first epoch (e.g. loading every image)
    basis: str = ""  # what was measured and how it was scaled
    options: tuple[str, ...] = ()  # ways on when the estimate is too high, one sentence each
    details: dict = field(default_factory=dict)

    @property
    def epoch_minutes(self) -> float:
        return self.epoch_seconds / 60.0

    def describe(self) -> str:
        setup = f" (+ {_duration(self.setup_seconds)} once)" if self.setup_seconds >= 1 else ""
        return f"{self.model}: one epoch estimated at {_duration(self.epoch_seconds)}{setup} on {self.device}; {self.basis}"

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "epoch_seconds": round(self.epoch_seconds, 1),
            "setup_seconds": round(self.setup_seconds, 1),
            "basis": self.basis,
            **self.details,
        }


class CostTooHighError(RuntimeError):
    """Training was not started: its estimated epoch time is past the configured limit."""

    def __init__(self, estimate: CostEstimate, limit_minutes: float):
        self.estimate = estimate
        self.limit_minutes = float(limit_minutes)
        ways = "".join(f"\n  - {o}" for o in estimate.options)
        super().__init__(
            f"{estimate.describe()}. That is more than max_estimated_epoch_minutes={limit_minutes:g}, so training "
            f"was not started. To proceed:{ways}"
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_cost(model: Recommender, data: RecData, inputs: FitInputs) -> CostEstimate | None:
    """The model's own estimate, or None for a model that has none (a cheap one)."""
    estimate = getattr(model, "estimate_epoch_cost", None)
    return None if estimate is None else estimate(data, inputs)


def check_before_fit(
    model: Recommender,
    data: RecData,
    inputs: FitInputs,
    *,
    log: logging.Logger | None = None,
    estimator: Callable[[Recommender, RecData, FitInputs], CostEstimate | None] = estimate_cost,
) -> CostEstimate | None:
    """Log the model's estimate; :class:`CostTooHighError` when it is past ``max_estimated_epoch_minutes``.
    ``estimator``: where it is measured (default here; a cluster measures on a worker that will train)."""
    estimate = estimator(model, data, inputs)
    if estimate is None:
        return None
    (log or _LOG).info("%s", estimate.describe())
    limit = float(getattr(model.config, "max_estimated_epoch_minutes", 0) or 0)
    if limit > 0 and estimate.epoch_minutes > limit:
        raise CostTooHighError(estimate, limit)
    return estimate
