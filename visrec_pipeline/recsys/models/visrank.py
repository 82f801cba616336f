"""VisRank: content-based, no training. ``score(u, i) = agg_{j in P_u} cos(f_i, f_j)``.

``agg`` is ``max`` (default), ``mean`` or ``topk_mean`` (mean of the ``top_t`` largest
similarities). Features are L2-normalised so a dot product is a cosine; with
``center=True`` the mean feature (over items with an image) is subtracted first.
Scores are batched matrix products: the profile is processed in blocks of positions
whose ``[rows, block, n_items]`` similarity tensor stays under ``max_block_elements``,
folding each block into a running max / top-t (rows whose profile has ended leave the
later blocks); ``mean`` is a single product with the mean profile vector. No loop
runs over items.

The profile comes from the ``ScoreBatch``, so any profile is scored, also of a user
unknown to training. An empty profile, or one without any item with features,
scores 0 everywhere. The features are inputs, not state: ``attach_inputs`` (called by
``fit`` and by the pipeline before ``load_state_dict``) gives them to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.model_spec import ModelSpec, register
from visrec_pipeline.recsys.models.features import normalise, pooled_features

AGGREGATIONS = ("max", "mean", "topk_mean")


@dataclass
class VisRankConfig:
    agg: str = "max"  # "max" | "mean" | "topk_mean"
    top_t: int = 3  # for agg="topk_mean"
    # subtract the mean feature before normalising. Off by default: the tutorial's VisRank uses the raw
    # cosine, and on planted synthetic data centring changed AUC by < 0.01 either way (slightly worse for
    # max); switch it on when validation says so for a given backbone.
    center: bool = False
    max_block_elements: int = 1 << 25  # bound on the [b, block, n_items] similarity block
    seed: int = 0  # unused (deterministic); every model config carries one
    device: str = "auto"


class VisRank(Recommender):
    name = "visrank"

    def __init__(self, config: VisRankConfig | None = None, **kw):
        super().__init__(config or VisRankConfig(), **kw)
        if self.config.agg not in AGGREGATIONS:
            raise ValueError(f"VisRankConfig.agg must be one of {AGGREGATIONS}, got {self.config.agg!r}")
        if self.config.agg == "topk_mean" and self.config.top_t < 1:
            raise ValueError(f"VisRankConfig.top_t must be >= 1, got {self.config.top_t}")
        self.features: torch.Tensor | None = None  # L2-normalised [n_items, d]
        self.has_features: torch.Tensor | None = None

    def attach_inputs(self, data: RecData, inputs: FitInputs) -> None:
        feats, mask = pooled_features(inputs, data.n_items, model="VisRank")
        self.features = normalise(feats, mask, center=self.config.center, l2=True)
        self.has_features = mask

    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        self.attach_inputs(data, inputs)
        return TrainHistory(notes={"trained": False, "items_with_features": int(self.has_features.sum())})

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("VisRank: call fit() or attach_inputs() before score()")
        device = resolve_device(self.config.device)
        if self.features.device != device:
            self.features = self.features.to(device)
            self.has_features = self.has_features.to(device)
        F = self.features
        items = batch.profile_items.to(device).long()
        mask = batch.profile_mask.to(device) & self.has_features[items]
        b, L = items.shape
        n = F.shape[0]
        agg = self.config.agg
        counts = mask.sum(1, keepdim=True)
        if agg == "mean":
            # mean of cosines = cosine-weighted sum with the mean profile vector: one product
            r, c = torch.nonzero(mask, as_tuple=True)  # only real profile entries, no padded [b, L, d]
            prof = torch.zeros((b, F.shape[1]), dtype=F.dtype, device=device).index_add_(0, r, F[items[r, c]])
            prof = prof / counts.clamp(min=1)
            return (prof @ F.T).float()
        t = min(self.config.top_t, L)
        if agg == "max":
            acc = torch.full((b, n), -torch.inf, device=device)
        else:
            acc = torch.full((b, n, t), -torch.inf, device=device)
        # the last used position of each row: rows whose profile ended drop out of later blocks, so the
        # work follows the real profile lengths, not the longest one in the batch
        pos = torch.arange(L, device=device)
        last = torch.where(mask, pos, -1).amax(1) if L else torch.full((b,), -1, device=device)
        start = 0
        while start < L:
            rows = torch.nonzero(last >= start).squeeze(1)
            if rows.numel() == 0:
                break
            block = max(1, min(L - start, self.config.max_block_elements // max(rows.numel() * n, 1)))
            sl = slice(start, start + block)
            sims = torch.einsum("bld,nd->bln", F[items[rows, sl]], F)  # blocks of profile positions
            sims = sims.masked_fill(~mask[rows, sl].unsqueeze(2), -torch.inf)
            if agg == "max":
                acc[rows] = torch.maximum(acc[rows], sims.amax(1))
            else:
                merged = torch.cat([acc[rows], sims.transpose(1, 2)], dim=2)
                acc[rows] = merged.topk(t, dim=2).values
            start += block
        if agg == "max":
            out = acc
        else:
            # mean over the available top similarities (fewer than t when the profile is short)
            valid = torch.isfinite(acc)
            out = torch.where(valid, acc, 0.0).sum(2) / valid.sum(2).clamp(min=1)
        return torch.where(counts > 0, out, 0.0).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        # features are inputs (re-attached from the feature store); keep what checks they match
        if self.features is None:
            raise RuntimeError("VisRank: nothing to save before fit()")
        return {"n_items": torch.tensor(self.features.shape[0]), "feature_dim": torch.tensor(self.features.shape[1])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.features is None:
            raise RuntimeError("VisRank: call attach_inputs(data, inputs) before load_state_dict()")
        expected = (int(state["n_items"]), int(state["feature_dim"]))
        if tuple(self.features.shape) != expected:
            raise ValueError(
                f"VisRank: attached features have shape {tuple(self.features.shape)}, checkpoint expects {expected}"
            )


register(
    ModelSpec(
        "visrank", VisRank, VisRankConfig, frozenset({f"features:{FEATURE_BACKBONE}"}),
        "VisRank: content-based, each item scored by its cosine similarity to the user's profile items.",
    )
)
