"""VisRank: content-based, no training. ``score(u, i) = agg_{j in P_u} cos(f_i, f_j)``.

``agg`` is ``max`` (default), ``mean`` or ``topk_mean`` (mean of the ``top_t`` largest
similarities). Features are L2-normalised so a dot product is a cosine; with
``center=True`` the mean feature (over items with an image) is subtracted first.
Scores are batched matrix products: the profile is processed in blocks of positions
whose ``[rows, block, n_items]`` similarity tensor stays under ``max_block_elements``,
folding each block into a running max / top-t (rows whose profile has ended leave the
later blocks); ``mean`` is a single product with the mean profile vector. No loop
runs over items.

**Neighbour scoring** (``scoring``): the exact path above costs profile length x catalogue x
feature dimension per user. For a large catalogue (``auto``: more than ``exact_max_items``
items; or ``scoring="neighbours"``) ``fit`` precomputes each item's ``neighbours_k`` most
similar items, and ``max`` / ``topk_mean`` are taken over the similarities those lists hold: the
cost per user is profile length x ``neighbours_k``. With ``neighbours_k >= n_items`` the scores
equal the exact path; with fewer, an item no profile item lists scores ``neighbours.UNREACHED``
(-2, below any cosine) and an item listed by some profile items only misses the others'
similarities, each at most that profile item's k-th neighbour similarity; so under ``max`` every
item above the profile's largest k-th neighbour similarity keeps its exact score, and the top of
the ranking is brute force's *relative to the table found*.

**Neighbour search** (``neighbour_search``): ``exact`` (:mod:`visrec_pipeline.recsys.neighbours`, a
blocked search in float32, items^2 x dim) finds each item's true top ``neighbours_k``; ``ivf``
(:mod:`visrec_pipeline.recsys.ivf`, an inverted-file search probing ``ivf_probe`` lists of about
``ivf_list_size`` items, cost linear in items) may miss some of them (never invents a similarity:
a missed neighbour only lowers or unreaches that item's score, like a smaller ``k``). ``auto``
searches exactly up to ``exact_search_max_items`` items and by IVF above. Both run on the GPU
when the device is one. ``fit`` records in ``history.notes`` which search ran and, for IVF, its
recall@k measured against the exact search on ``recall_queries`` sampled items.
``mean`` is always exact (one product with the mean profile vector). The neighbour table is
part of the checkpoint (``[n_items, k]`` indices and similarities), so evaluation does not
search again.

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
from visrec_pipeline.recsys.ivf import ivf_top_k_neighbours, neighbour_recall
from visrec_pipeline.recsys.neighbours import neighbour_scores, top_k_neighbours
from visrec_pipeline.recsys.models.features import normalise, pooled_features

AGGREGATIONS = ("max", "mean", "topk_mean")
SCORINGS = ("auto", "exact", "neighbours")
NEIGHBOUR_SEARCHES = ("auto", "exact", "ivf")


@dataclass
class VisRankConfig:
    agg: str = "max"  # "max" | "mean" | "topk_mean"
    top_t: int = 3  # for agg="topk_mean"
    # subtract the mean feature before normalising. Off by default: the tutorial's VisRank uses the raw
    # cosine, and on planted synthetic data centring changed AUC by < 0.01 either way (slightly worse for
    # max); switch it on when validation says so for a given backbone.
    center: bool = False
    max_block_elements: int = 1 << 25  # bound on the [b, block, n_items] similarity block (and neighbour blocks)
    scoring: str = "auto"  # "auto" | "exact" | "neighbours" (see the module doc)
    neighbours_k: int = 200  # neighbours kept per item for scoring="neighbours"
    exact_max_items: int = 8192  # auto: exact up to this many catalogue items, neighbours above
    neighbour_search: str = "auto"  # "auto" | "exact" | "ivf": how the neighbour table is found (module doc)
    # auto: exact search up to this many items, IVF above. The exact search costs items^2 x dim: at 2048-d
    # on one CPU thread ~4 s for 10k items, ~11 s at this bound (still cheap, and exact), 359 s at 100k
    exact_search_max_items: int = 16384
    # IVF defaults measured on the scale benchmark's resnet50 features (bench/scale.py, 2048-d, 1 CPU
    # thread), recall@200: 256 x 8 0.994 at 10k items (1.7 s), 1.000 at 100k (8.0 s); 256 x 4 0.987 and
    # 0.999 at about the same cost at 100k; lists of 128 x 8: 0.979 at 10k and 2x the time at 100k
    ivf_list_size: int = 256  # items per inverted list (n_lists = n_items / ivf_list_size)
    ivf_probe: int = 8  # lists each list's items search (their own and the nearest by centroid)
    recall_queries: int = 256  # sampled items whose exact top-k measures the IVF table's recall
    seed: int = 0  # the IVF search's k-means sample and start (the exact paths are deterministic)
    device: str = "auto"


class VisRank(Recommender):
    name = "visrank"

    def __init__(self, config: VisRankConfig | None = None, **kw):
        super().__init__(config or VisRankConfig(), **kw)
        if self.config.agg not in AGGREGATIONS:
            raise ValueError(f"VisRankConfig.agg must be one of {AGGREGATIONS}, got {self.config.agg!r}")
        if self.config.agg == "topk_mean" and self.config.top_t < 1:
            raise ValueError(f"VisRankConfig.top_t must be >= 1, got {self.config.top_t}")
        if self.config.scoring not in SCORINGS:
            raise ValueError(f"VisRankConfig.scoring must be one of {SCORINGS}, got {self.config.scoring!r}")
        if self.config.neighbours_k < 1:
            raise ValueError(f"VisRankConfig.neighbours_k must be >= 1, got {self.config.neighbours_k}")
        if self.config.neighbour_search not in NEIGHBOUR_SEARCHES:
            raise ValueError(
                f"VisRankConfig.neighbour_search must be one of {NEIGHBOUR_SEARCHES}, got {self.config.neighbour_search!r}"
            )
        for name in ("ivf_list_size", "ivf_probe", "recall_queries"):
            if getattr(self.config, name) < 1:
                raise ValueError(f"VisRankConfig.{name} must be >= 1, got {getattr(self.config, name)}")
        self.features: torch.Tensor | None = None  # L2-normalised [n_items, d]
        self.has_features: torch.Tensor | None = None
        self.neighbours: tuple[torch.Tensor, torch.Tensor] | None = None  # (items int32, sims) [n_items, k]

    def attach_inputs(self, data: RecData, inputs: FitInputs) -> None:
        feats, mask = pooled_features(inputs, data.n_items, model="VisRank")
        self.features = normalise(feats, mask, center=self.config.center, l2=True)
        self.has_features = mask
        self.neighbours = None  # derived from the features: rebuilt or reloaded after new ones

    def uses_neighbours(self) -> bool:
        """Whether ``max`` / ``topk_mean`` are scored from the neighbour table (``mean`` never is)."""
        c = self.config
        if c.agg == "mean" or c.scoring == "exact":
            return False
        return c.scoring == "neighbours" or self.features.shape[0] > c.exact_max_items

    def neighbour_search(self) -> str:
        """``exact`` or ``ivf``: the search that builds the neighbour table for this catalogue."""
        c = self.config
        if c.neighbour_search != "auto":
            return c.neighbour_search
        return "ivf" if self.features.shape[0] > c.exact_search_max_items else "exact"

    def _build_neighbours(self) -> dict:
        """Builds the table; returns notes: the search that ran and, for IVF, its measured recall@k."""
        c = self.config
        device = resolve_device(c.device)
        F = self.features.to(device)
        search = self.neighbour_search()
        if search == "exact":
            items, sims = top_k_neighbours(F, c.neighbours_k, max_block_elements=c.max_block_elements)
            notes = {"neighbour_search": "exact"}
        else:
            items, sims = ivf_top_k_neighbours(
                F, c.neighbours_k, list_size=c.ivf_list_size, n_probe=c.ivf_probe, seed=c.seed,
                max_block_elements=c.max_block_elements,
            )
            recall = neighbour_recall(
                F, sims, n_queries=c.recall_queries, seed=c.seed, max_block_elements=c.max_block_elements
            )
            notes = {
                "neighbour_search": "ivf", "ivf_list_size": c.ivf_list_size, "ivf_probe": c.ivf_probe,
                "neighbour_recall": round(recall, 4), "recall_queries": min(c.recall_queries, F.shape[0]),
            }
        self.neighbours = (items.cpu(), sims.cpu())
        return notes

    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        self.attach_inputs(data, inputs)
        notes = {"trained": False, "items_with_features": int(self.has_features.sum())}
        self.neighbours = None
        if self.uses_neighbours():
            notes.update(self._build_neighbours())
            notes["scoring"] = "neighbours"
            notes["neighbours_k"] = int(self.neighbours[0].shape[1])
        else:
            notes["scoring"] = "exact"
        self.log.info(
            "VisRank agg=%s scoring=%s search=%s recall=%s", self.config.agg, notes["scoring"],
            notes.get("neighbour_search"), notes.get("neighbour_recall"),
        )
        return TrainHistory(notes=notes)

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
        if self.uses_neighbours():
            if self.neighbours is None:
                self._build_neighbours()
            nbr_items, nbr_sims = (t.to(device) for t in self.neighbours)
            self.neighbours = (nbr_items, nbr_sims)
            out = neighbour_scores(
                items, mask, nbr_items, nbr_sims, agg=agg, top_t=self.config.top_t,
                max_block_elements=self.config.max_block_elements,
            )
            return torch.where(counts > 0, out, 0.0).float()
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
        state = {"n_items": torch.tensor(self.features.shape[0]), "feature_dim": torch.tensor(self.features.shape[1])}
        if self.neighbours is not None:
            state["neighbour_items"], state["neighbour_sims"] = (t.cpu() for t in self.neighbours)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.features is None:
            raise RuntimeError("VisRank: call attach_inputs(data, inputs) before load_state_dict()")
        expected = (int(state["n_items"]), int(state["feature_dim"]))
        if tuple(self.features.shape) != expected:
            raise ValueError(
                f"VisRank: attached features have shape {tuple(self.features.shape)}, checkpoint expects {expected}"
            )
        self.neighbours = None
        if "neighbour_items" in state:
            items, sims = state["neighbour_items"], state["neighbour_sims"]
            k = min(self.config.neighbours_k, expected[0])
            if tuple(items.shape) != (expected[0], k) or items.shape != sims.shape:
                raise ValueError(
                    f"VisRank: checkpoint neighbour table has shape {tuple(items.shape)}, expected ({expected[0]}, {k})"
                )
            self.neighbours = (items.to(torch.int32), sims.float())


register(
    ModelSpec(
        "visrank", VisRank, VisRankConfig, frozenset({f"features:{FEATURE_BACKBONE}"}),
        "VisRank: content-based, each item scored by its cosine similarity to the user's profile items.",
    )
)
