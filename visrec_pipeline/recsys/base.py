"""The interface every recommender implements.

``fit`` learns from ``RecData`` (plus whatever side inputs the model declares,
e.g. pooled features or images, passed in ``FitInputs``); ``score`` returns a
``[batch, n_items]`` score matrix for a batch of users given by index and by
profile, so content-based and user-free models (VisRank, CuratorNet) can also
score profiles of users unseen in training.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from visrec_pipeline.recsys.data import Holdout, RecData


@dataclass
class ScoreBatch:
    """A batch of users to score. Unknown users have ``user_idx == -1``."""

    user_idx: torch.Tensor  # long [b]
    profile_items: torch.Tensor  # long [b, L], padded with 0
    profile_mask: torch.Tensor  # bool [b, L]


@dataclass
class FitInputs:
    """Side inputs a model may need, aligned with the item index.

    ``features``: pooled CNN features ``[n_items, d]`` float32 (zeros where no image);
    ``feature_mask``: bool ``[n_items]`` True where the item has features;
    ``spatial``: ``[n_items, regions, channels]`` float16.
    From the feature store both are read-only and not in RAM: an ``np.memmap`` or a lazy
    ``FeatureRows`` (numpy indexing, ``shape``, ``dtype``); models read them block by block with
    :func:`~visrec_pipeline.recsys.row_blocks.iter_row_blocks` (a plain array works the same);
    ``images``: callable ``(item_idx LongTensor) -> uint8 tensor [b, 3, H, W]``;
    ``creators``/``clusters``: int64 ``[n_items]`` (-1 unknown);
    ``validation``: the holdout carved from training rows for early stopping.
    """

    features: Any = None  # np.ndarray | np.memmap | FeatureRows
    feature_mask: np.ndarray | None = None
    spatial: Any = None  # np.ndarray | np.memmap | FeatureRows
    images: Callable[[torch.Tensor], torch.Tensor] | None = None
    creators: np.ndarray | None = None
    clusters: np.ndarray | None = None
    validation: Holdout | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainHistory:
    """What training did, epoch by epoch, for metadata and plots."""

    loss: list[float] = field(default_factory=list)
    val_auc: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


class Recommender(abc.ABC):
    """Base class: subclasses set ``name`` and implement ``fit`` and ``score``."""

    name: str = "recommender"

    def __init__(self, config: Any, *, logger: logging.Logger | None = None):
        self.config = config
        self.log = logger or logging.getLogger(f"visrec.{self.name}")

    @abc.abstractmethod
    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory: ...

    @abc.abstractmethod
    def score(self, batch: ScoreBatch) -> torch.Tensor:
        """Scores ``[b, n_items]`` (float32) of every catalogue item for each user in ``batch``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the config and the same inputs, restore the fitted model."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def refit_overrides(self, history: TrainHistory) -> dict:
        """Config overrides that retrain this model on all training rows, without validation rows, to
        what validation chose in the fit that gave ``history`` (a number of epochs, a lambda); none by
        default (nothing is chosen on validation)."""
        return {}
