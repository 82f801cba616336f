"""Seeded k-means in torch: k-means++ initialisation, then Lloyd iterations, all vectorised over items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KMeansResult:
    labels: np.ndarray  # int64 [n]; cluster 0 is the largest
    centroids: np.ndarray  # float32 [k, d]
    inertia: float  # sum of squared distances to the assigned centroid
    n_iter: int
    converged: bool

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.centroids))


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, k]`` via ||x||^2 - 2 x.c + ||c||^2 (one matmul)."""
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Centres drawn with probability proportional to the squared distance to the nearest chosen one."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = _sq_dist(x, x_sq, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # every point coincides with a centre: any point will do
            nxt = int(torch.randint(n, (1,), generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, x_sq, x[nxt : nxt + 1])[:, 0])
    return x[chosen].clone()


def kmeans(x, k: int, *, seed: int = 0, max_iter: int = 100, device: str | torch.device = "cpu") -> KMeansResult:
    """Cluster the rows of ``x`` (array or tensor ``[n, d]``) into ``min(k, n)`` clusters."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float().to(device)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(x.cpu(), k, gen).to(x.device)
    x_sq = (x * x).sum(1)
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        dist = _sq_dist(x, x_sq, centroids)
        new_labels = dist.argmin(1)
        if torch.equal(new_labels, labels):
            converged = True
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            # An emptied cluster restarts at the points worst served by their centroid.
            worst = dist.gather(1, labels[:, None])[:, 0].topk(empty.numel()).indices
            centroids[empty] = x[worst]
            labels = torch.full_like(labels, -1)  # force another assignment round
    dist = _sq_dist(x, x_sq, centroids)
    labels = dist.argmin(1)
    inertia = float(dist.gather(1, labels[:, None]).sum())
    # Relabel by size (largest first, ties by old label) so cluster ids read the same across runs.
    sizes = torch.bincount(labels, minlength=k).cpu().numpy()
    order = np.lexsort((np.arange(k), -sizes))
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return KMeansResult(
        labels=remap[labels.cpu().numpy()],
        centroids=centroids.cpu().numpy()[order].astype(np.float32),
        inertia=inertia,
        n_iter=it,
        converged=converged,
    )


def assign(x, centroids: np.ndarray) -> np.ndarray:
    """Label of the nearest centroid for every row of ``x`` (one batched distance matrix)."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    c = torch.as_tensor(centroids, dtype=torch.float32)
    return _sq_dist(xt, (xt * xt).sum(1), c).argmin(1).numpy()


@dataclass(frozen=True)
class ClusterState:
    """What a k-means fit is kept as between runs, so new items can join it without a refit."""

    centroids: np.ndarray  # float32 [k, d]
    fitted_ids: np.ndarray  # int64: the items the centroids were fitted on
    k: int  # requested k (the fit may hold fewer centroids when there were fewer items)
    seed: int
    weights_tag: str

    def save(self, path) -> None:
        from visrec_pipeline.atomic import atomic_path

        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp, centroids=self.centroids, fitted_ids=self.fitted_ids,
                k=np.asarray([self.k]), seed=np.asarray([self.seed]), weights_tag=np.asarray([self.weights_tag]),
            )

    @classmethod
    def load(cls, path) -> "ClusterState | None":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["centroids"], z["fitted_ids"], int(z["k"][0]), int(z["seed"][0]), str(z["weights_tag"][0]))
        except (OSError, KeyError, ValueError):
            return None  # absent or unreadable: the caller refits

    def can_extend(self, ids: np.ndarray, *, k: int, seed: int, weights_tag: str, refit_share: float) -> bool:
        """True when ``ids`` may be assigned to these centroids instead of refitting: same k, seed and
        weights, and at most ``refit_share`` of the items are new since the fit (0 = always refit)."""
        if refit_share <= 0 or (self.k, self.seed, self.weights_tag) != (k, seed, weights_tag) or len(ids) == 0:
            return False
        new = ~np.isin(ids, self.fitted_ids)
        return float(new.mean()) <= refit_share
