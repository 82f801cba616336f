"""ACF, Attentive Collaborative Filtering (Chen et al., SIGIR 2017), with spatial visual features.

For user ``u`` (embedding ``u``) and each profile item ``l`` (embedding ``v_l``, auxiliary
embedding ``p_l``, regions ``x_lm``: the ResNet-50 ``layer4`` map, 49 regions):

- regions are centred per position (each of the 49 positions minus its mean over the catalogue,
  see ``center_regions_by_position``) and reduced to the embedding size by a learned linear layer
  (optionally after a fixed PCA of the 2048 channels, see ``region_pca_dim``);
- component attention ``b_lm = softmax_m(w1 . ReLU(W1x x_lm + W1u u + b1))``,
  ``xbar_l = sum_m b_lm x_lm``;
- item attention ``a_l = softmax_l(w2 . ReLU(W2u u + W2v v_l + W2p p_l + W2x xbar_l + b2))`` over
  the profile slots that exist (padding gets exactly zero weight);
- ``u' = u + sum_l a_l p_l``, score ``x_ui = u' . v_i``; BPR loss with L2 on the embeddings
  of the batch (and Adam weight decay on the attention weights), plus
  ``item_attention_entropy_weight * (1 - normalised entropy of a)``.

Why the centring and the entropy term, which neither the paper nor the tutorial has: without them both softmaxes
collapse on the demo (item attention 0.98 on one profile item per user, normalised entropy 0.02;
component attention on the same top-centre region in 87% of images). A random-init ResNet-50's
``layer4`` regions differ mostly by position (70% of their variance, from the zero padding), so
uncentred regions make the component logits a position prior; and BPR rewards an item attention
that picks one profile item whose ``p_l`` then serves as a second user vector (its logits grew
from std 0.2 to 14 in 8 epochs). Centring alone makes the component attention follow the image;
the entropy term keeps the item attention spread (entropy ~0.8) and raised the demo's test AUC
(0.869 -> 0.880 at 8 epochs, seeds 0-2: +0.011 on average). :meth:`ACF.attention_summary` measures
both attentions; ``fit`` stores it for the validation users in ``history.notes["attention"]``.

The profile is the user's ``max_profile_len`` most recent training items. During training
the positive item is left out of its own profile (its slot gets zero attention): at test
time the item to predict is never in the profile, so training should not reward it.

Memory: the spatial maps (``FitInputs.spatial``, a memory map or lazy rows from the store) are read
in two streaming passes (per-position means, then projection); the PCA is fitted on
``pca_sample_regions`` regions drawn uniformly over items and positions, of which only those
regions are read. Only the projected table ``[n_items, R, region_pca_dim]`` float16 stays in RAM.
An epoch's work is bounded by its triples: each batch attends over the profiles of its own
distinct users only (at most ``batch_size x max_profile_len`` slots), and batches are made of chunks
of ``user_chunk`` (4) triples of one user, so a batch holds ~batch_size / 4 distinct users however
many users there are and an epoch is linear in interactions (demo test AUC at 8 epochs, seeds 0-2:
.877 in chunks against .878 shuffled). The checkpoint keeps the
weights, the PCA and the reduced region table, and the training-row count; the profile-recency
lookup is rebuilt from the split by :meth:`ACF.attach_inputs`.

``u'`` does not depend on the candidate item, so scoring all items is ``u' @ V^T``. A user
unknown to training gets ``u = 0`` and is represented by their profile's attention alone.
:meth:`ACF.explain` returns both attentions, aligned with the batch's profile slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.data import CSR, Holdout, RecData
from visrec_pipeline.recsys.evaluate import holdout_batches
from visrec_pipeline.recsys.model_spec import ModelSpec, register
from visrec_pipeline.recsys.row_blocks import iter_row_blocks, release_pages
from visrec_pipeline.recsys.trainer import TrainConfig
from visrec_pipeline.recsys.triple_model import TripleTrainedConfig, TripleTrainedModel, train_defaults

_BLOCK = 256  # items per block of a streaming pass over the spatial maps (25 MB of float16 at 49 x 2048)
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


@dataclass
class ACFConfig(TripleTrainedConfig):
    # large batches are nearly free: the attention is computed once per distinct user of a batch;
    # train.weight_decay: Adam L2 on every weight (attention and reduction layers)
    train: TrainConfig = train_defaults(epochs=20, batch_size=4096, lr=1e-2, weight_decay=1e-6)
    reg: float = 1e-4  # L2 on the user / item / auxiliary embeddings of each triple
    dim: int = 64  # embedding size (u, v, p and the reduced regions)
    attention_dim: int = 64
    max_profile_len: int = 20  # most recent profile items attended to
    # batches of chunks of up to this many triples of one user (samplers.user_chunk_order): a batch
    # attends over ~batch_size / user_chunk profiles instead of ~batch_size distinct users, so an epoch's
    # cost stops growing with the number of users (linear in interactions). 1: plain shuffled triples.
    user_chunk: int = 4
    # heavy users' chunks grow so a triple costs at most about this many attended profile slots
    # (samplers.profile_chunks; 0 = chunks of user_chunk for all). With chunks of 4 for all, a user with
    # a full profile costs 20 / 4 = 5 slots per triple, and an epoch attended 2.9 slots per triple at
    # bench/scale.py's 100k interactions, 4.5 at 1M (heavy users' chunks share batches less); with 2:
    # 1.6 and 2.0. Demo test AUC, 8 epochs, seeds 0-2: .8777 (.87926 / .87228 / .88160) against .8771.
    profile_rows_per_triple: int = 2
    # A fixed PCA of the region channels before the learned reduction keeps CPU training cheap
    # (2048 -> 128 keeps nearly all the variance); None applies the learned layer to raw channels.
    region_pca_dim: int | None = 128
    pca_sample_regions: int = 16384
    # divide the (projected) regions by their RMS value: raw CNN maps are large (random-init ResNet-50
    # layer4: region norms ~1000), which saturates both attention softmaxes from the first step
    scale_regions: bool = True
    # subtract each region position's mean over the catalogue before the PCA: in a CNN map a region's
    # position (zero padding at the borders) is most of its variance (random-init ResNet-50 layer4 on
    # the demo: 70%), so uncentred regions let the component attention pick the same position in every
    # image whatever it shows
    center_regions_by_position: bool = True
    # weight of (1 - normalised entropy) of the item attention in the loss. BPR alone drives the
    # attention onto one profile item per user (its p_l then acts as a second user vector: entropy 0.02
    # on the demo, lower validation AUC); 0 turns the penalty off
    item_attention_entropy_weight: float = 0.03
    mask_positive_in_profile: bool = True
    score_batch_users: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.profile_rows_per_triple < 0:
            raise ValueError(f"ACFConfig.profile_rows_per_triple must be >= 0, got {self.profile_rows_per_triple}")
        if self.user_chunk < 1:
            raise ValueError(f"ACFConfig.user_chunk must be >= 1, got {self.user_chunk}")
        if self.dim < 1 or self.attention_dim < 1 or self.max_profile_len < 1:
            raise ValueError("ACFConfig.dim, .attention_dim and .max_profile_len must be >= 1")
        if self.region_pca_dim is not None and self.region_pca_dim < 1:
            raise ValueError(f"ACFConfig.region_pca_dim must be >= 1 or None, got {self.region_pca_dim}")
        if self.item_attention_entropy_weight < 0:
            raise ValueError(
                f"ACFConfig.item_attention_entropy_weight must be >= 0, got {self.item_attention_entropy_weight}"
            )


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the entries where ``mask``; masked entries get exactly 0, an all-masked row all 0."""
    z = logits.float().masked_fill(~mask, float("-inf"))
    top = z.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(z - top)  # exp(-inf) == 0: masked entries vanish without NaN
    return e / e.sum(dim, keepdim=True).clamp(min=torch.finfo(e.dtype).tiny)


def normalised_entropy(weights: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy / log(n), has_choice)`` of each row of ``weights`` (a distribution over its ``n``
    ``mask`` slots, 0 elsewhere): 1 is uniform, 0 all weight on one slot. Rows with fewer than two
    slots have no choice to spread over: their value is 0 and ``has_choice`` False."""
    n = mask.sum(-1)
    has_choice = n > 1
    w = weights.float() * mask
    h = -(w * w.clamp_min(torch.finfo(w.dtype).tiny).log()).sum(-1)
    return torch.where(has_choice, h / n.clamp(min=2).float().log(), torch.zeros_like(h)), has_choice


# --------------------------------------------------------------------------------------------- regions


def position_means(spatial, has: np.ndarray) -> torch.Tensor:
    """``[R, C]``: the mean region vector at each of the ``R`` positions over the items with features
    (``has``), in one streaming pass over ``spatial`` (an array, memory map or lazy feature rows: one
    block in memory at a time); a ValueError names the first items whose features are not finite."""
    n, r, c = spatial.shape
    total = torch.zeros((r, c), dtype=torch.float64)
    for s, block in iter_row_blocks(spatial, _BLOCK):
        keep = np.flatnonzero(has[s : s + len(block)])
        if keep.size:
            x = torch.from_numpy(np.asarray(block[keep], dtype=np.float32))
            part = x.sum(0, dtype=torch.float64)
            if not torch.isfinite(part).all():
                bad = keep[~torch.isfinite(x).flatten(1).all(1).numpy()] + s
                raise ValueError(f"non-finite spatial features for item indices {bad[:5].tolist()} (first 5)")
            total += part
    return (total / max(int(has.sum()), 1)).float()


def fit_region_pca(
    spatial: np.ndarray,
    candidates: np.ndarray,
    dim: int,
    *,
    n_samples: int,
    seed: int,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, basis [C, dim])``: the top principal directions of ``n_samples`` region vectors
    sampled uniformly from the regions of ``candidates`` (randomised SVD, seeded; about 1 s on one
    core). Only the sampled regions are read (``spatial[items, regions]``: one 4 KB row each from a
    memory map), so the fit costs the same at 1k or 100k items.

    ``offsets`` (``[R, C]``, see :func:`position_means`) is subtracted from each region by position
    and returned as ``mean``; without it ``mean`` is the samples' mean ``[C]``.
    """
    rng = np.random.default_rng(seed)
    items = rng.choice(candidates, size=n_samples, replace=True)
    regions = rng.integers(0, spatial.shape[1], size=n_samples)
    order = np.lexsort((regions, items))  # memory-map friendly reads
    items, regions = items[order], regions[order]
    # gathered in item order, a chunk at a time, each chunk's pages released at once: a sampled read
    # faults in the kernel's readahead around it, and over a whole memory map that held most of the
    # file resident (9 GB at 50k items)
    x = torch.empty((n_samples, spatial.shape[2]), dtype=torch.float32)
    step = 1024
    for s in range(0, n_samples, step):
        rows = items[s : s + step]
        x[s : s + rows.size] = torch.from_numpy(np.asarray(spatial[rows, regions[s : s + step]], dtype=np.float32))
        upto = int(items[s + step]) if s + step < n_samples else spatial.shape[0]
        release_pages(spatial, int(rows[0]), max(upto, int(rows[-1]) + 1))
    if offsets is None:
        mean = x.mean(0)
        x = x - mean
    else:
        mean = offsets
        x = x - offsets[torch.from_numpy(regions)]
    q = min(dim + 10, *x.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(x, q=q, niter=3)
    basis = v[:, :dim]
    # a deterministic sign: the largest-magnitude loading of each component is positive
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return mean, basis * torch.where(sign == 0, torch.ones_like(sign), sign)


def project_regions(spatial, mean: torch.Tensor | None, basis: torch.Tensor | None, has: np.ndarray) -> torch.Tensor:
    """``[n_items, R, D]`` float16 table: regions minus ``mean`` (``[C]`` or ``[R, C]``; none: as they
    are), projected on ``basis`` when given; rows of items without features are zero. One streaming
    pass: only the projected table is kept (100k items x 49 x 128: 1.2 GB, the raw maps 20 GB)."""
    n, r, c = spatial.shape
    d = c if basis is None else basis.shape[1]
    out = torch.zeros((n, r, d), dtype=torch.float16)
    for s, block in iter_row_blocks(spatial, _BLOCK):
        x = torch.from_numpy(np.asarray(block, dtype=np.float32))
        if mean is not None:
            x = x - mean
        if basis is not None:
            x = x @ basis
        x = torch.where(torch.from_numpy(has[s : s + len(block)]).view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype))
        out[s : s + len(block)] = x.half()
    return out


# --------------------------------------------------------------------------------------------- module


class ACFModule(nn.Module):
    def __init__(self, n_users: int, n_items: int, region_dim: int, dim: int = 64, attention_dim: int = 64):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)  # v
        self.aux = nn.Embedding(n_items, dim)  # p
        for emb in (self.user, self.item, self.aux):
            nn.init.normal_(emb.weight, std=0.1)
        self.reduce = nn.Linear(region_dim, dim)
        self.comp_x = nn.Linear(dim, attention_dim)  # W1x (+ b1)
        self.comp_u = nn.Linear(dim, attention_dim, bias=False)  # W1u
        self.comp_w = nn.Linear(attention_dim, 1, bias=False)  # w1
        self.item_u = nn.Linear(dim, attention_dim)  # W2u (+ b2)
        self.item_v = nn.Linear(dim, attention_dim, bias=False)  # W2v
        self.item_p = nn.Linear(dim, attention_dim, bias=False)  # W2p
        self.item_x = nn.Linear(dim, attention_dim, bias=False)  # W2x
        self.item_w = nn.Linear(attention_dim, 1, bias=False)  # w2
        # non-persistent: derived from the inputs, rebuilt by fit (the state holds the weights)
        self.register_buffer("regions", None, persistent=False)  # [n_items, R, D] float16
        self.register_buffer("train_items", None, persistent=False)  # [n_users, L]
        self.register_buffer("train_mask", None, persistent=False)  # [n_users, L]

    def profile_logits(
        self, u: torch.Tensor, items: torch.Tensor, table: torch.Tensor, *, reduced: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item-attention logits ``[n, L]`` and component attention ``[n, L, R]``.

        ``u`` [n, d]; ``items`` [n, L]; ``table`` [n_items, R, D]: region rows to reduce, or already
        reduced ones (``reduced=True``). The reduction and ``W1x`` are linear, so they are applied
        once per distinct item and gathered afterwards (4-5x less work than per profile slot).
        """
        uniq, inv = torch.unique(items, return_inverse=True)
        rows = table[uniq].float()
        x = rows if reduced else self.reduce(rows)  # [m, R, d]
        kx = self.comp_x(x)  # [m, R, a]
        h = F.relu(kx[inv] + self.comp_u(u)[:, None, None, :])  # [n, L, R, a]
        beta = torch.softmax(self.comp_w(h).squeeze(-1).float(), dim=-1)  # over regions
        xbar = torch.einsum("nlr,nlrd->nld", beta.to(x.dtype), x[inv])  # [n, L, d]
        g = (
            self.item_u(u)[:, None, :]
            + self.item_v(self.item(items))
            + self.item_p(self.aux(items))
            + self.item_x(xbar)
        )
        return self.item_w(F.relu(g)).squeeze(-1), beta

    def user_vectors(self, u: torch.Tensor, items: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return u + (attention.unsqueeze(-1).to(u.dtype) * self.aux(items)).sum(1)

    def loss(
        self,
        batch: dict[str, torch.Tensor],
        *,
        reg: float = 0.0,
        mask_positive: bool = True,
        item_entropy_weight: float = 0.0,
    ) -> torch.Tensor:
        user, pos, neg = batch["user"], batch["pos"], batch["neg"]
        # the profile attention of a user is the same for all their triples: compute it once per user
        uu, inv = torch.unique(user, return_inverse=True)
        items, mask = self.train_items[uu], self.train_mask[uu]
        u_emb = self.user(uu)
        logits, _ = self.profile_logits(u_emb, items, self.regions)
        t_items, t_mask = items[inv], mask[inv]
        if mask_positive:
            t_mask = t_mask & (t_items != pos.unsqueeze(1))
        attention = masked_softmax(logits[inv], t_mask)
        u_t = self.user(user)
        u_prime = self.user_vectors(u_t, t_items, attention)
        v_pos, v_neg = self.item(pos), self.item(neg)
        x_uij = (u_prime.float() * (v_pos - v_neg).float()).sum(1)
        l2 = (u_t.float() ** 2).sum(1) + (v_pos.float() ** 2).sum(1) + (v_neg.float() ** 2).sum(1)
        loss = -F.logsigmoid(x_uij).mean() + reg * l2.mean()
        if item_entropy_weight:
            entropy, has_choice = normalised_entropy(attention, t_mask)
            if bool(has_choice.any()):
                loss = loss + item_entropy_weight * (1.0 - entropy[has_choice]).mean()
        return loss


# --------------------------------------------------------------------------------------------- model


def _recent_profiles(train: CSR, ts: np.ndarray, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's ``max_len`` most recent training items (ties: higher item index is newer)."""
    order = np.lexsort((train.indices, ts, train.row_ids()))
    by_time = CSR(train.indptr, train.indices[order], train.n_cols)
    return by_time.padded(max_len=max_len)


class ACF(TripleTrainedModel):
    name = "acf"
    config_cls = ACFConfig

    def __init__(self, config: ACFConfig | None = None, **kw):
        super().__init__(config or ACFConfig(), **kw)
        self.region_cache: torch.Tensor | None = None  # reduced regions [n_items, R, d] float16
        self.pca_mean: torch.Tensor | None = None
        self.pca_basis: torch.Tensor | None = None
        self.region_rms = 1.0  # what fit divided the projected regions by
        self.ui_keys: torch.Tensor | None = None  # sorted user * n_items + item of the training rows
        self.ui_ts: torch.Tensor | None = None
        self._attached: RecData | None = None  # data given to attach_inputs (the lookup is rebuilt from it)
        self._trained_rows: int | None = None  # training rows of a loaded checkpoint

    # ------------------------------------------------------------------ training
    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        """Train (see :class:`TripleTrainedModel`); with a validation holdout, ``history.notes["attention"]``
        is :meth:`attention_summary` over its users."""
        history = super().fit(data, inputs)
        if inputs.validation is not None and len(inputs.validation):
            history.notes["attention"] = self.attention_summary(inputs.validation)
        return history

    def _region_table(self, inputs: FitInputs, n_items: int) -> torch.Tensor:
        cfg = self.config
        if inputs.spatial is None:
            raise ValueError(f"{self.name} needs spatial visual features (FitInputs.spatial) but none were given")
        spatial = inputs.spatial
        if spatial.ndim != 3 or spatial.shape[0] != n_items:
            raise ValueError(
                f"{self.name}: FitInputs.spatial has shape {spatial.shape}; "
                f"expected [n_items={n_items}, regions, channels]"
            )
        has = np.ones(n_items, bool) if inputs.feature_mask is None else np.asarray(inputs.feature_mask, bool)
        if has.shape != (n_items,):
            raise ValueError(f"{self.name}: FitInputs.feature_mask has shape {has.shape}; expected ({n_items},)")
        c = spatial.shape[2]
        offsets = None
        if cfg.center_regions_by_position and has.any():
            try:
                offsets = position_means(spatial, has)
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None
        if cfg.region_pca_dim is None or cfg.region_pca_dim >= c:
            self.pca_mean, self.pca_basis = offsets, None
        else:
            candidates = np.flatnonzero(has)
            if candidates.size == 0:
                raise ValueError(f"{self.name}: no item has spatial features")
            self.pca_mean, self.pca_basis = fit_region_pca(
                spatial,
                candidates,
                cfg.region_pca_dim,
                n_samples=cfg.pca_sample_regions,
                seed=cfg.train.seed,
                offsets=offsets,
            )
        table = project_regions(spatial, self.pca_mean, self.pca_basis, has)
        self.region_rms = 1.0
        if cfg.scale_regions and has.any():
            rows = torch.from_numpy(np.flatnonzero(has)[: 4096])
            self.region_rms = float(table[rows].float().pow(2).mean().sqrt().clamp(min=1e-6))
            for s in range(0, table.shape[0], 1024):
                table[s : s + 1024] = (table[s : s + 1024].float() / self.region_rms).half()
        for s in range(0, table.shape[0], 1024):  # blockwise: a float32 copy of the table is 2.5 GB at 100k items
            finite = torch.isfinite(table[s : s + 1024].float().sum((1, 2)))
            if not finite.all():
                bad = (torch.nonzero(~finite).squeeze(1)[:5] + s).tolist()
                raise ValueError(f"{self.name}: non-finite spatial features for item indices {bad} (first 5)")
        return table

    def build_module(self, data: RecData, inputs: FitInputs, device: torch.device) -> tuple[nn.Module, dict]:
        cfg = self.config
        table = self._region_table(inputs, data.n_items)
        module = self.seeded(lambda: ACFModule(data.n_users, data.n_items, table.shape[2], cfg.dim, cfg.attention_dim))
        items, mask = _recent_profiles(data.train, data.train_ts, cfg.max_profile_len)
        module.regions, module.train_items, module.train_mask = table, items, mask
        self._set_training_rows(data)
        notes = {
            "region_table": {
                "regions": int(table.shape[1]),
                "channels_in": int(inputs.spatial.shape[2]),
                "pca_dim": None if self.pca_basis is None else int(self.pca_basis.shape[1]),
                "rms_divided_by": round(self.region_rms, 4),
            }
        }
        return module, notes

    def batch_source(self, data: RecData, inputs: FitInputs, device: torch.device):
        cfg = self.config
        return self.random_triples(
            data, device, user_chunk=cfg.user_chunk,
            profile_rows_per_triple=cfg.profile_rows_per_triple, profile_cap=cfg.max_profile_len,
        )

    def loss_options(self) -> dict:
        cfg = self.config
        return {
            "reg": cfg.reg,
            "mask_positive": cfg.mask_positive_in_profile,
            "item_entropy_weight": cfg.item_attention_entropy_weight,
        }

    def invalidate_cache(self) -> None:
        self.region_cache = None

    def build_cache(self) -> None:
        self._cache()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _cache(self) -> torch.Tensor:
        """Reduced regions of every item in item-index order (float16), built once per weights."""
        module = self.trained_module()
        if self.region_cache is None:
            if module.regions is None:
                raise RuntimeError(f"{self.name}: no region table and no region cache to score with")
            t = module.regions
            self.region_cache = torch.cat(
                [module.reduce(t[s : s + 1024].float()).half() for s in range(0, t.shape[0], 1024)]
            )
        return self.region_cache

    def _select_profile(self, batch: ScoreBatch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``max_profile_len`` most recent slots of each row: ``(slot [b, L'], items, mask)``.

        Recency comes from the training timestamps; a profile item unknown to training (e.g. a
        validation row) counts as the newest; ties keep the later slot (higher item index).
        """
        items = batch.profile_items.to(device).long()
        mask = batch.profile_mask.to(device).bool()
        b, width = items.shape
        keep = min(width, self.config.max_profile_len)
        if width <= keep:
            slot = torch.arange(width, device=device).expand(b, -1)
            return slot, items, mask
        if self.ui_keys is None:
            raise RuntimeError(f"{self.name}: call attach_inputs(data, inputs) after loading a checkpoint, before scoring")
        n_items = self.module.item.num_embeddings
        user = batch.user_idx.to(device).long()
        keys = self.ui_keys.to(device)
        query = user.clamp(min=0).unsqueeze(1) * n_items + items
        at = torch.searchsorted(keys, query).clamp(max=max(keys.numel() - 1, 0))
        known = (keys[at] == query) & (user >= 0).unsqueeze(1) if keys.numel() else torch.zeros_like(mask)
        ts = torch.where(known, self.ui_ts.to(device)[at], torch.full_like(at, _INT64_MAX))
        ts = torch.where(mask, ts, torch.full_like(ts, _INT64_MIN))
        order = torch.sort(ts, dim=1, stable=True).indices  # stable: equal times keep slot order
        slot = order[:, -keep:]
        return slot, items.gather(1, slot), mask.gather(1, slot)

    @torch.no_grad()
    def _attend(self, batch: ScoreBatch):
        module = self.trained_module()
        cache = self._cache()
        device = cache.device
        slot, items, mask = self._select_profile(batch, device)
        user = batch.user_idx.to(device).long()
        u = torch.where((user >= 0).unsqueeze(1), module.user(user.clamp(min=0)), torch.zeros((), device=device))
        logits, beta = module.profile_logits(u, items, cache, reduced=True)
        alpha = masked_softmax(logits, mask)
        return u, slot, items, mask, alpha, beta

    @torch.no_grad()
    def score(self, batch: ScoreBatch) -> torch.Tensor:
        module = self.trained_module()
        was = module.training
        module.eval()
        step = max(1, self.config.score_batch_users)
        out = []
        n = batch.user_idx.shape[0]
        for s in range(0, n, step):
            rows = slice(s, s + step)
            sub = ScoreBatch(batch.user_idx[rows], batch.profile_items[rows], batch.profile_mask[rows])
            u, _, items, _, alpha, _ = self._attend(sub)
            out.append(module.user_vectors(u, items, alpha).float() @ module.item.weight.float().T)
        module.train(was)
        return torch.cat(out) if out else torch.zeros((0, module.item.num_embeddings))

    @torch.no_grad()
    def explain(self, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(item_attention [b, L], component_attention [b, L, R])`` aligned with ``batch``'s
        profile slots; slots that are padding or beyond the most recent ``max_profile_len`` get 0."""
        module = self.trained_module()
        was = module.training
        module.eval()
        _, slot, _, mask, alpha, beta = self._attend(batch)
        module.train(was)
        b, width = batch.profile_items.shape
        item_att = torch.zeros((b, width), device=alpha.device)
        comp_att = torch.zeros((b, width, beta.shape[2]), device=alpha.device)
        item_att.scatter_(1, slot, alpha)
        comp_att.scatter_(1, slot.unsqueeze(2).expand(-1, -1, beta.shape[2]), beta * mask.unsqueeze(2))
        return item_att, comp_att

    @torch.no_grad()
    def attention_summary(self, holdout: Holdout, batch_size: int = 256) -> dict[str, float]:
        """How spread both attentions are over the rows of ``holdout`` (their profiles as given).

        ``item_entropy``: mean normalised entropy (1 uniform, 0 one item) of the item attention over
        the rows with at least two attended items (``item_rows``); ``item_max_share``: the mean
        largest item weight. ``component_entropy`` and ``component_max_share``: the same for the
        component attention over the regions of every attended profile image;
        ``component_top_region_share``: the share of those images whose highest-weight region is the
        most common one (1.0: the same region everywhere, whatever the image shows).
        """
        module = self.trained_module()
        was = module.training
        module.eval()
        item_h, item_max, comp_h, comp_max, comp_top = [], [], [], [], []
        for _, batch in holdout_batches(holdout, batch_size):
            _, _, _, mask, alpha, beta = self._attend(batch)
            h, has_choice = normalised_entropy(alpha, mask)
            item_h.append(h[has_choice])
            item_max.append(alpha.max(1).values[has_choice])
            regions = beta[mask]  # [attended images, R]
            full = torch.ones_like(regions, dtype=torch.bool)
            comp_h.append(normalised_entropy(regions, full)[0])
            comp_max.append(regions.max(1).values)
            comp_top.append(regions.argmax(1))
        module.train(was)
        item_h, item_max, comp_h, comp_max, comp_top = (
            torch.cat(t).float().cpu() if t else torch.zeros(0) for t in (item_h, item_max, comp_h, comp_max, comp_top)
        )

        def mean(t: torch.Tensor) -> float:
            return round(float(t.mean()), 4) if t.numel() else float("nan")

        top_share = float(torch.bincount(comp_top.long()).max()) / comp_top.numel() if comp_top.numel() else float("nan")
        return {
            "item_entropy": mean(item_h),
            "item_max_share": mean(item_max),
            "item_rows": int(item_h.numel()),
            "component_entropy": mean(comp_h),
            "component_max_share": mean(comp_max),
            "component_top_region_share": round(top_share, 4),
            "component_images": int(comp_h.numel()),
        }

    # ------------------------------------------------------------------ training rows
    def _set_training_rows(self, data: RecData) -> None:
        """The (user, item) -> time lookup of ``data``'s training rows that :meth:`_select_profile` reads."""
        keys = data.train.row_ids() * data.n_items + data.train.indices  # sorted (CSR order)
        self.ui_keys = torch.as_tensor(keys)
        self.ui_ts = torch.as_tensor(np.asarray(data.train_ts, np.int64))

    def attach_inputs(self, data: RecData, inputs: FitInputs) -> None:
        """Rebuild the training-row lookup from the data (the checkpoint does not store training rows):
        ``data`` itself if the model was fitted on all its training rows, else ``data`` minus its
        validation rows (``data.validation_split()``, what ``pipeline.train_model`` fits on). Called by
        ``pipeline.load_trained`` before :meth:`load_state_dict`; either order works."""
        self._attached = data
        if self._trained_rows is not None:
            self._resolve_training_rows()

    def _resolve_training_rows(self) -> None:
        data, want = self._attached, self._trained_rows
        for candidate in (data, None):
            fit = candidate if candidate is not None else data.validation_split()[0]
            if fit.train.nnz == want and fit.n_items == self.module.item.num_embeddings:
                self._set_training_rows(fit)
                return
        raise ValueError(
            f"{self.name}: the checkpoint was fitted on {want} training rows; the data given has "
            f"{data.train.nnz} ({data.validation_split()[0].train.nnz} without its validation rows): "
            "re-train the model on this data"
        )

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights, the reduced region table (inference's item side: [n_items, R, dim] float16) and the PCA;
        not the training rows: :meth:`attach_inputs` rebuilds their lookup from the split."""
        module = self.trained_module()
        state = {f"module.{k}": v for k, v in module.state_dict().items()}
        state["region_cache"] = self._cache()
        state["trained_rows"] = torch.tensor(int(self.ui_keys.numel()) if self.ui_keys is not None else 0)
        if self.pca_basis is not None:
            state["pca_mean"], state["pca_basis"] = self.pca_mean, self.pca_basis
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        required = ("module.user.weight", "module.reduce.weight", "region_cache", "trained_rows")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"{self.name}: state lacks {missing}")
        weights = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
        n_users, dim = weights["user.weight"].shape
        n_items = weights["item.weight"].shape[0]
        region_dim = weights["reduce.weight"].shape[1]
        att = weights["comp_x.weight"].shape[0]
        if dim != cfg.dim or att != cfg.attention_dim:
            raise ValueError(
                f"{self.name}: state has dim={dim}, attention_dim={att}; config says {cfg.dim}, {cfg.attention_dim}"
            )
        device = resolve_device(cfg.train.device)
        module = ACFModule(n_users, n_items, region_dim, dim, att)
        module.load_state_dict(weights)
        self.module = module.to(device).eval()
        self.region_cache = state["region_cache"].half().to(device)
        self.pca_mean, self.pca_basis = state.get("pca_mean"), state.get("pca_basis")
        self._trained_rows = int(state["trained_rows"])
        self.ui_keys = self.ui_ts = None
        if self._attached is not None:
            self._resolve_training_rows()


register(
    ModelSpec(
        "acf",
        ACF,
        ACFConfig,
        frozenset({f"spatial:{FEATURE_BACKBONE}", "triples_random"}),
        "ACF (Chen et al. 2017): component attention over image regions and item attention over the profile "
        "build the user vector; BPR loss.",
    )
)
