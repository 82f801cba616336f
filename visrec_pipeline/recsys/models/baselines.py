"""Non-personalised baselines: Random and MostPopular."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.model_spec import ModelSpec, register

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic)
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _srl(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (``>>`` on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def hash_uniform(keys: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in [0, 1) from int64 keys, elementwise and deterministic."""
    return _srl(splitmix64(keys), 11).double() * (1.0 / 2**53)


def hash_uniform_pairs(
    row_keys: torch.Tensor, col_keys: torch.Tensor, *, block_elements: int = 1 << 16
) -> torch.Tensor:
    """``hash_uniform(row_keys[:, None] ^ col_keys[None, :])`` as float32 ``[rows, cols]``, computed in column
    blocks of about ``block_elements`` pairs with in-place steps: the int64 temporaries of a whole
    ``[rows, cols]`` hash would leave the CPU caches at a large catalogue and make the cost per pair grow."""
    rows, cols = row_keys.shape[0], col_keys.shape[0]
    out = torch.empty((rows, cols), dtype=torch.float32, device=row_keys.device)
    width = max(1, block_elements // max(rows, 1))
    x = torch.empty((rows, min(width, cols)), dtype=torch.long, device=row_keys.device)
    t = torch.empty_like(x)
    for start in range(0, cols, width):
        stop = min(start + width, cols)
        xb, tb = x[:, : stop - start], t[:, : stop - start]
        torch.bitwise_xor(row_keys.unsqueeze(1), col_keys[start:stop].unsqueeze(0), out=xb)
        xb += _GOLDEN
        for shift, mix in ((30, _MIX1), (27, _MIX2), (31, None)):
            torch.bitwise_right_shift(xb, shift, out=tb)
            tb &= (1 << (64 - shift)) - 1  # logical shift: ``>>`` on int64 is arithmetic
            xb ^= tb
            if mix is not None:
                xb *= mix
        torch.bitwise_right_shift(xb, 11, out=tb)
        tb &= (1 << 53) - 1
        out[:, start:stop] = tb.double() * (1.0 / 2**53)
    return out


@dataclass
class RandomConfig:
    seed: int = 0
    device: str = "auto"


class RandomRecommender(Recommender):
    """Uniform scores, a pure function of (seed, user, item): the same user gets the same ranking in
    every batch and run. A user unknown to training (``user_idx == -1``) is keyed by their profile."""

    name = "random"

    def __init__(self, config: RandomConfig | None = None, **kw):
        super().__init__(config or RandomConfig(), **kw)
        self.n_items: int | None = None

    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        self.n_items = data.n_items
        return TrainHistory(notes={"trained": False})

    def _user_keys(self, batch: ScoreBatch) -> torch.Tensor:
        user = batch.user_idx.long()
        # unknown users: a key from their profile, offset so it cannot collide with a user index
        prof = torch.where(batch.profile_mask, splitmix64(batch.profile_items.long()), torch.zeros((), dtype=torch.long))
        profile_key = splitmix64(prof.sum(1)) | (1 << 62)
        return torch.where(user >= 0, user, profile_key)

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        if self.n_items is None:
            raise RuntimeError("RandomRecommender: call fit() or load_state_dict() before score()")
        device = resolve_device(self.config.device)
        users = self._user_keys(batch).to(device)
        seed_key = splitmix64(torch.tensor(int(self.config.seed), dtype=torch.long, device=device))
        user_key = splitmix64(users ^ seed_key)
        items = torch.arange(self.n_items, dtype=torch.long, device=device)
        return hash_uniform_pairs(user_key, splitmix64(items))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n_items": torch.tensor(self.n_items if self.n_items is not None else -1)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        n = int(state["n_items"])
        if n < 0:
            raise ValueError("RandomRecommender: state holds no item count (model was never fitted)")
        self.n_items = n


@dataclass
class MostPopularConfig:
    seed: int = 0  # unused (deterministic model); kept so every model config has one
    device: str = "auto"


class MostPopular(Recommender):
    """Score = number of training interactions of the item, the same for every user."""

    name = "most_popular"

    def __init__(self, config: MostPopularConfig | None = None, **kw):
        super().__init__(config or MostPopularConfig(), **kw)
        self.counts: torch.Tensor | None = None

    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        self.counts = torch.as_tensor(data.item_popularity(), dtype=torch.float32)
        return TrainHistory(notes={"trained": False, "items_with_interactions": int((self.counts > 0).sum())})

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("MostPopular: call fit() or load_state_dict() before score()")
        device = resolve_device(self.config.device)
        counts = self.counts.to(device)
        return counts.unsqueeze(0).expand(int(batch.user_idx.shape[0]), -1).clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.counts is None:
            raise RuntimeError("MostPopular: nothing to save before fit()")
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].float()


register(
    ModelSpec(
        "random", RandomRecommender, RandomConfig, frozenset(),
        "Random baseline: uniform scores from a fixed seed (deterministic per user).",
    )
)
register(
    ModelSpec(
        "most_popular", MostPopular, MostPopularConfig, frozenset(),
        "MostPopular baseline: items ranked by their number of training interactions.",
    )
)
