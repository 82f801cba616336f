"""VisRank: content-based, no training. ``score(u, i) = agg_{j in P_u} cos(f_i, f_j)``.

``agg`` is ``max`` (default), ``mean`` or ``topk_mean`` (mean of the ``top_t`` largest
similarities). Features are L2-normalised so a dot product is a cosine; with
``center=True`` the mean feature (over items with an image) is subtracted first.
Scores are batched matrix products: the profile is processed in blocks of positions
whose ``[b, block, n_items]`` similarity tensor stays under ``max_block_elements``,
folding each block into a running max / sum / top-t; no loop runs over items.

The profile comes from the ``ScoreBatch``, so any profile is scored, also of a user
unknown to training. An empty profile, or one without any item with features,
scores 0 everywhere. The features are inputs, not state: ``attach_inputs`` (called by
``fit`` and by the pipeline before ``load_state_dict``) gives them to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory, resolve_device
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.models.features import normalise, pooled_features

AGGREGATIONS = ("max", "mean", "topk_mean")


@dataclass
class VisRankConfig:
    agg: str = "max"  # "max" | "mean" | "topk_mean"
    top_t: int = 3  # for agg="topk_mean"
    center: bool = True  # subtract the mean feature before normalising (see docs for why)
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
            prof = (F[items] * mask.unsqueeze(2)).sum(1) / counts.clamp(min=1)
            return (prof @ F.T).float()
        block = max(1, min(L, self.config.max_block_elements // max(b * n, 1)))
        t = min(self.config.top_t, L)
        if agg == "max":
            acc = torch.full((b, n), -torch.inf, device=device)
        else:
            acc = torch.full((b, n, t), -torch.inf, device=device)
        for start in range(0, L, block):  # blocks of profile positions, not items
            sl = slice(start, min(start + block, L))
            sims = torch.einsum("bld,nd->bln", F[items[:, sl]], F)
            sims = sims.masked_fill(~mask[:, sl].unsqueeze(2), -torch.inf)
            if agg == "max":
                acc = torch.maximum(acc, sims.amax(1))
            else:
                merged = torch.cat([acc, sims.transpose(1, 2)], dim=2)
                acc = merged.topk(t, dim=2).values
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
