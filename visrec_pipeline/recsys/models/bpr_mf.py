"""BPR-MF (Rendle et al. 2009): ``x_ui = beta_i + gamma_u . gamma_i``, the non-visual control for VBPR.

Also holds ``FactorScores``, the inference form shared with VBPR: every score is one
matrix product ``[user_factors, 1] @ item_factors^T`` where the last item column is
the item-only part of the score (bias terms). A user unknown to training
(``user_idx == -1``) gets zero user factors, hence exactly that item-only part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.model_spec import ModelSpec, register
from visrec_pipeline.recsys.trainer import TrainConfig
from visrec_pipeline.recsys.triple_model import TripleTrainedConfig, TripleTrainedModel, train_defaults


class FactorScores:
    """Cached inference tensors: ``user_factors [n_users, k]``, ``item_factors [n_items, k + 1]``."""

    def __init__(self, user_factors: torch.Tensor, item_factors: torch.Tensor):
        if item_factors.shape[1] != user_factors.shape[1] + 1:
            raise ValueError(
                f"item_factors has {item_factors.shape[1]} columns; expected user factors ({user_factors.shape[1]}) + 1"
            )
        self.user_factors = user_factors.float().contiguous()
        self.item_factors = item_factors.float().contiguous()

    def to(self, device: torch.device) -> "FactorScores":
        if self.user_factors.device != device:
            self.user_factors = self.user_factors.to(device)
            self.item_factors = self.item_factors.to(device)
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        user_idx = user_idx.to(self.user_factors.device).long()
        n_users = self.user_factors.shape[0]
        if bool((user_idx >= n_users).any()):
            raise IndexError(f"user index out of range (model knows {n_users} users)")
        known = user_idx >= 0
        u = self.user_factors[user_idx.clamp(min=0)] * known.unsqueeze(1)
        u = torch.cat([u, torch.ones_like(u[:, :1])], dim=1)
        return u @ self.item_factors.T

    def state(self) -> dict[str, torch.Tensor]:
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}


class BPRMFModule(nn.Module):
    def __init__(self, n_users: int, n_items: int, factors: int, reg: float, init_std: float):
        super().__init__()
        self.reg = reg
        self.gamma_user = nn.Embedding(n_users, factors, sparse=True)
        self.gamma_item = nn.Embedding(n_items, factors, sparse=True)
        self.beta_item = nn.Embedding(n_items, 1, sparse=True)
        nn.init.normal_(self.gamma_user.weight, std=init_std)
        nn.init.normal_(self.gamma_item.weight, std=init_std)
        nn.init.zeros_(self.beta_item.weight)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u, i, j = batch["user"], batch["pos"], batch["neg"]
        gu, gi, gj = self.gamma_user(u), self.gamma_item(i), self.gamma_item(j)
        bi, bj = self.beta_item(i).squeeze(1), self.beta_item(j).squeeze(1)
        x_uij = bi - bj + (gu * (gi - gj)).sum(1)
        l2 = gu.square().sum(1) + gi.square().sum(1) + gj.square().sum(1) + bi.square() + bj.square()
        return -F.logsigmoid(x_uij).mean() + self.reg * l2.mean()

    def factor_scores(self) -> FactorScores:
        with torch.no_grad():
            items = torch.cat([self.gamma_item.weight, self.beta_item.weight], dim=1)
            return FactorScores(self.gamma_user.weight.detach().clone(), items.detach().clone())


@dataclass
class BPRMFConfig(TripleTrainedConfig):
    # epochs: an upper bound (early stopping on the validation split ends training); the same optimiser
    # settings as VBPR, so the two differ only by the visual terms
    train: TrainConfig = train_defaults(epochs=50, batch_size=4096, lr=3e-3)
    factors: int = 200  # the latent size of VBPR's gamma, so BPR-MF is its non-visual control
    reg: float = 1e-4  # L2 on the embeddings of each triple (per-triple BPR regularisation)
    init_std: float = 0.01
    triples_per_epoch: int = 0  # 0 = one triple per training interaction


class FactorScoreRecommender(TripleTrainedModel):
    """A model trained on uniform random triples that scores from a :class:`FactorScores` cache its
    trained ``module`` builds (``module.factor_scores()``); the cache is also what a checkpoint holds."""

    def __init__(self, config, **kw):
        super().__init__(config, **kw)
        self.cache: FactorScores | None = None

    def batch_source(self, data: RecData, inputs: FitInputs, device: torch.device):
        return self.random_triples(data, device, self.config.triples_per_epoch or None)

    def invalidate_cache(self) -> None:
        self.cache = None

    def build_cache(self) -> None:
        if self.cache is None:
            self.cache = self.module.factor_scores()

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() or load_state_dict() before score()")
        return self.cache.to(resolve_device(self.config.train.device)).score(batch.user_idx)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}: nothing to save before fit()")
        return self.cache.state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.cache = FactorScores(state["user_factors"], state["item_factors"])


class BPRMF(FactorScoreRecommender):
    name = "bpr_mf"

    def __init__(self, config: BPRMFConfig | None = None, **kw):
        super().__init__(config or BPRMFConfig(), **kw)

    def build_module(self, data: RecData, inputs: FitInputs, device: torch.device) -> tuple[nn.Module, dict]:
        c = self.config
        return self.seeded(lambda: BPRMFModule(data.n_users, data.n_items, c.factors, c.reg, c.init_std)), {}


register(
    ModelSpec(
        "bpr_mf", BPRMF, BPRMFConfig, frozenset({"triples_random"}),
        "BPR-MF: matrix factorisation with item bias trained on uniform BPR triples; VBPR's non-visual control.",
    )
)
