"""Item-to-item top-k neighbours by cosine, and profile scores from them.

:func:`top_k_neighbours` is an exact blocked search: a block of query rows is multiplied by
the whole (L2-normalised) feature matrix in float32 and its ``k`` largest similarities kept;
the block has at most ``max_block_elements`` similarities, so memory stays bounded whatever
the catalogue size. It runs on whatever device the features are on (GPU when present). Its cost
is items^2 x dim; :mod:`visrec_pipeline.recsys.ivf` builds the same table approximately at a cost
linear in items.

:func:`neighbour_scores` turns a batch of profiles into ``[b, n_items]`` scores from the
table alone: each profile item ``j`` contributes its ``k`` neighbours with their similarities,
and each catalogue item takes the ``max`` (or the mean of the ``top_t`` largest) of the
contributions it received. The cost is ``profile entries x k`` plus the ``[b, n_items]``
output, independent of the feature dimension and of profile length x catalogue size.

With ``k >= n_items`` every item is everyone's neighbour and the scores equal brute force.
With smaller ``k`` an item outside the ``k`` neighbours of every profile item gets
``UNREACHED``, and an item reached by some but not all profile items may miss similarities
(each of them at most that profile item's ``k``-th neighbour similarity). So for ``max``,
with ``T_u`` the largest ``k``-th neighbour similarity over the profile, every item scoring
above ``T_u`` has its exact score, and these items lead the ranking in the exact order.
These statements hold relative to the table given: from an exact search, "exact" means brute
force's. From an approximate (IVF) one, a true neighbour the search missed counts as not listed:
scores are still never above brute force's (the table holds true similarities), but a leading
item's score, and so its place, is exact only if no profile item's missed neighbour was it.
"""

from __future__ import annotations

import torch

UNREACHED = -2.0  # below any cosine: items no profile item lists among its neighbours


def top_k_neighbours(
    features: torch.Tensor, k: int, *, queries: torch.Tensor | None = None, max_block_elements: int = 1 << 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(items int32 [q, k'], sims float32 [q, k'])``, ``k' = min(k, n)``: for each query row (all ``n`` rows
    of ``features``, or the row indices ``queries``), its ``k'`` most similar rows of ``features`` (itself
    included) by dot product, most similar first, ties by the lower index."""
    if k < 1:
        raise ValueError(f"top_k_neighbours: k must be >= 1, got {k}")
    F = features.float()
    n = F.shape[0]
    k = min(k, n)
    rows = torch.arange(n, device=F.device) if queries is None else queries.to(F.device)
    items = torch.empty((rows.shape[0], k), dtype=torch.int32, device=F.device)
    sims = torch.empty((rows.shape[0], k), dtype=torch.float32, device=F.device)
    step = max(1, max_block_elements // max(n, 1))
    for start in range(0, rows.shape[0], step):
        block = F[rows[start : start + step]] @ F.T
        # a stable descending sort gives ties the lower index; topk does not promise an order among ties
        if k == n:
            vals, idx = torch.sort(block, dim=1, descending=True, stable=True)
        else:
            vals, idx = block.topk(k, dim=1)
        items[start : start + step] = idx.to(torch.int32)
        sims[start : start + step] = vals
    return items, sims


def neighbour_scores(
    profile_items: torch.Tensor,
    profile_mask: torch.Tensor,
    items: torch.Tensor,
    sims: torch.Tensor,
    *,
    agg: str,
    top_t: int = 1,
    max_block_elements: int = 1 << 25,
) -> torch.Tensor:
    """Scores ``[b, n_items]`` from a neighbour table (see the module doc); ``agg`` is ``max`` or
    ``topk_mean``. Rows without a profile entry get ``UNREACHED`` everywhere (the caller decides)."""
    if agg not in ("max", "topk_mean"):
        raise ValueError(f"neighbour_scores: agg must be max|topk_mean, got {agg!r}")
    device = sims.device
    n, k = items.shape
    b = profile_items.shape[0]
    rows, pos = torch.nonzero(profile_mask.to(device), as_tuple=True)
    sources = profile_items.to(device)[rows, pos].long()
    t = 1 if agg == "max" else top_t
    acc = torch.full((b * n, t), -torch.inf, device=device)
    chunk = max(1, max_block_elements // k)  # profile entries per step: chunk x k contributions
    for start in range(0, sources.shape[0], chunk):
        src = sources[start : start + chunk]
        keys = (rows[start : start + chunk].unsqueeze(1) * n + items[src].long()).reshape(-1)
        vals = sims[src].reshape(-1)
        if t == 1:
            acc[:, 0].scatter_reduce_(0, keys, vals, reduce="amax")
        else:
            _merge_top_t(acc, keys, vals, t)
    acc = acc.view(b, n, t)
    if agg == "max":
        out = acc[..., 0]
    else:
        valid = torch.isfinite(acc)
        out = torch.where(valid, acc, 0.0).sum(2) / valid.sum(2).clamp(min=1)
        out = torch.where(valid.any(2), out, -torch.inf)
    return torch.where(torch.isfinite(out), out, UNREACHED)


def _merge_top_t(acc: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, t: int) -> None:
    """Fold ``(key, value)`` contributions into ``acc[key]``, each row the ``t`` largest values so far."""
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[torch.sort(keys[order], stable=True).indices]  # by key, values descending within a key
    keys, vals = keys[order], vals[order]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keys.shape[0], device=keys.device) - torch.repeat_interleave(first, counts)
    keep = rank < t
    group = torch.repeat_interleave(torch.arange(uniq.shape[0], device=keys.device), counts)[keep]
    fresh = torch.full((uniq.shape[0], t), -torch.inf, device=acc.device)
    fresh[group, rank[keep]] = vals[keep]
    acc[uniq] = torch.cat([acc[uniq], fresh], dim=1).topk(t, dim=1).values
