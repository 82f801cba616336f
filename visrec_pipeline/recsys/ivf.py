"""Approximate item-to-item top-k neighbours by an inverted-file (IVF) search, and its measured recall.

:func:`ivf_top_k_neighbours` partitions the (L2-normalised) items into ``n_lists ~ n / list_size``
lists with a coarse spherical k-means (random seeded start, a few Lloyd rounds on a seeded sample),
then searches list by list: the queries of one list are compared with the items of the ``n_probe``
lists whose centroids are nearest to that list's centroid (its own first; more lists when those hold
fewer than ``k`` items), keeping each query's ``k`` best. The cost is

- search: ``n x n_probe x list_size x d``, linear in items at fixed ``n_probe`` and ``list_size``;
- assignment of every item to its list: ``n x n_lists x d = n^2 d / list_size``;
- k-means: ``sample x n_lists x d x iters`` with ``sample = min(n, 32 x n_lists)``, i.e.
  ``n^2 d x 32 iters / list_size^2`` (``n^2 d / 256`` at 8 rounds of lists of 256).

The last two are quadratic but 1/256 of the exact search's ``n^2 d`` each at the defaults, and below
the search up to ~250k items (measured at 100k x 2048-d, one CPU thread: k-means 1.5 s, assignment
1.4 s, search ~5 s; exact ~370 s). Far beyond that, raise ``list_size`` (``n_lists ~ sqrt(n)``
balances the terms).

Similarities found are exact dot products (the table holds true cosines), so an item may only be
*missing* from a row, never over-scored. Memory: one copy of the features in list order (so every list
is a contiguous view) and blocks bounded by ``max_block_elements`` similarities; it all runs on the
device the features are on. Probing every list is the exact search.

:func:`neighbour_recall` measures a table against the exact search on a seeded sample of query rows
(``queries x n x d``, cheap): the share of each sampled row's exact top-k similarities the table reaches.
"""

from __future__ import annotations

import torch

from visrec_pipeline.recsys.neighbours import top_k_neighbours

KMEANS_SAMPLE_PER_LIST = 32  # items per list the coarse k-means is fitted on


def ivf_top_k_neighbours(
    features: torch.Tensor,
    k: int,
    *,
    list_size: int = 256,
    n_probe: int = 8,
    seed: int = 0,
    kmeans_iters: int = 8,
    max_block_elements: int = 1 << 25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(items int32 [n, k'], sims float32 [n, k'])``, ``k' = min(k, n)``, like
    :func:`~visrec_pipeline.recsys.neighbours.top_k_neighbours` but approximate (see the module doc).
    Deterministic for a ``seed`` on a given device."""
    if k < 1:
        raise ValueError(f"ivf_top_k_neighbours: k must be >= 1, got {k}")
    if list_size < 1 or n_probe < 1 or kmeans_iters < 0:
        raise ValueError(
            f"ivf_top_k_neighbours: list_size and n_probe must be >= 1 and kmeans_iters >= 0, "
            f"got {list_size}, {n_probe}, {kmeans_iters}"
        )
    F = features.float()
    n = F.shape[0]
    k = min(k, n)
    if n == 0:
        return torch.empty((0, 0), dtype=torch.int32, device=F.device), torch.empty((0, 0), device=F.device)
    n_lists = max(1, min(n, round(n / list_size)))
    centroids = coarse_centroids(F, n_lists, seed=seed, iters=kmeans_iters, max_block_elements=max_block_elements)
    labels = nearest_centroid(F, centroids, max_block_elements)
    # items without features (zero rows) are as similar to one list as to any other: spread them over the
    # lists, so that a catalogue with many of them does not pile them into one list searched quadratically
    blank = (F == 0).all(1).nonzero().flatten()
    labels[blank] = torch.arange(blank.shape[0], device=F.device) % n_lists
    order = torch.argsort(labels, stable=True)  # item ids grouped by list
    grouped = F[order]  # one copy in list order: every list is then a contiguous view, no gathers per list
    sizes = torch.bincount(labels, minlength=n_lists)
    starts = (torch.cumsum(sizes, 0) - sizes).tolist()
    size_list = sizes.tolist()
    between = centroids @ centroids.T
    between.fill_diagonal_(torch.inf)  # a list always searches itself first
    probes = between.topk(min(n_probe, n_lists), dim=1).indices
    short = set((sizes[probes].sum(1) < k).nonzero().flatten().tolist())
    items = torch.empty((n, k), dtype=torch.int32, device=F.device)
    sims = torch.empty((n, k), dtype=torch.float32, device=F.device)
    for lst in range(n_lists):
        if size_list[lst] == 0:
            continue
        if lst in short:  # too few items in the nearest lists: take lists in order until k are covered
            ranked = between[lst].argsort(descending=True, stable=True)
            need = int((torch.cumsum(sizes[ranked], 0) < k).sum()) + 1
            probe = ranked[:need].tolist()
        else:
            probe = probes[lst].tolist()
        probe = [p for p in probe if size_list[p]]
        candidates = torch.cat([order[starts[p] : starts[p] + size_list[p]] for p in probe])
        step = max(1, max_block_elements // candidates.shape[0])
        for start in range(starts[lst], starts[lst] + size_list[lst], step):
            stop = min(start + step, starts[lst] + size_list[lst])
            queries = grouped[start:stop]
            block = torch.cat([queries @ grouped[starts[p] : starts[p] + size_list[p]].T for p in probe], dim=1)
            vals, idx = block.topk(k, dim=1)
            rows = order[start:stop]
            items[rows] = candidates[idx].to(torch.int32)
            sims[rows] = vals
    return items, sims


def coarse_centroids(
    F: torch.Tensor, n_lists: int, *, seed: int, iters: int, max_block_elements: int = 1 << 25
) -> torch.Tensor:
    """``[n_lists, d]`` unit centroids: spherical k-means on a seeded sample of the non-zero rows (of all rows
    when fewer than ``n_lists`` are non-zero), started at ``n_lists`` distinct sampled rows; a list left
    empty by a round keeps its previous centroid."""
    rows = (F != 0).any(1).nonzero().flatten().cpu()
    if rows.shape[0] < n_lists:
        rows = torch.arange(F.shape[0])
    gen = torch.Generator().manual_seed(seed)
    picked = rows[torch.randperm(rows.shape[0], generator=gen)[: max(n_lists, KMEANS_SAMPLE_PER_LIST * n_lists)]]
    sample = F[picked.to(F.device)]
    centroids = torch.nn.functional.normalize(sample[:n_lists], dim=1)
    for _ in range(iters):
        labels = nearest_centroid(sample, centroids, max_block_elements)
        sums = torch.zeros_like(centroids).index_add_(0, labels, sample)
        filled = torch.bincount(labels, minlength=n_lists) > 0
        centroids = torch.where(filled.unsqueeze(1), torch.nn.functional.normalize(sums, dim=1), centroids)
    return centroids


def nearest_centroid(X: torch.Tensor, centroids: torch.Tensor, max_block_elements: int = 1 << 25) -> torch.Tensor:
    """The index of each row's most similar centroid by dot product, in blocks of rows."""
    labels = torch.empty(X.shape[0], dtype=torch.long, device=X.device)
    step = max(1, max_block_elements // max(centroids.shape[0], 1))
    for start in range(0, X.shape[0], step):
        labels[start : start + step] = (X[start : start + step] @ centroids.T).argmax(1)
    return labels


def neighbour_recall(
    features: torch.Tensor, sims: torch.Tensor, *, n_queries: int = 256, seed: int = 0, max_block_elements: int = 1 << 25
) -> float:
    """Recall@k of a neighbour table (its ``sims [n, k]``) on ``n_queries`` seeded sample rows: the share
    of each row's exact top-k the table holds, counting a table entry at least the exact k-th similarity
    (less 1e-5 for float rounding) as found, so ties at the k-th place do not count as misses."""
    n, k = sims.shape
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randperm(n, generator=gen)[: min(n_queries, n)].to(features.device)
    _, exact = top_k_neighbours(features, k, queries=queries, max_block_elements=max_block_elements)
    kth = exact[:, -1:].to(sims.device)
    found = (sims[queries.to(sims.device)] >= kth - 1e-5).sum(1).clamp(max=k)
    return float(found.sum()) / (queries.shape[0] * k)
