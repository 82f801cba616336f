"""CuratorNet's six sampling guidelines: training triples ``(profile, positive, negative)``.

Messina et al. (2020) do not sample triples uniformly; each triple follows one of
six guidelines:

1. ``hold_out``: remove an item from the user's profile and predict it;
2. ``next_in_time``: order the profile by time and predict the next item;
3. ``favourite_artists``: visually similar items of the user's favourite artists;
4. ``profile_items``: items of the user's own profile;
5. ``single_item_profile``: an artificial one-item profile ``{p}`` predicting the
   user's other profile items;
6. ``single_item_same_artist``: an artificial one-item profile ``{p}`` predicting
   visually similar items of ``p``'s artist.

Wikimedia has no artist: an item's *artist* is its creator when the catalogue
knows it, else its visual cluster (``cluster:<id>``), else the item alone.

Similarity is hybrid: ``sim(a, b) = alpha * cos(f_a, f_b) + (1 - alpha) * [artist(a) == artist(b)]``.
Against a profile ``P`` (the *anchor* of every guideline is the triple's own
profile: ``P \\ {i}``, the time prefix, the full profile, or the one item ``{p}``)
it is the mean over the profile items, which is
``alpha * mean_p(f̂_p) . f̂_x + (1 - alpha) * share of P with artist(x)``.
A triple is kept only when ``sim(P, pos) >= sim(P, neg) + margin``. Negatives
lie outside the user's whole profile and, with ``far_negatives`` (the paper),
belong to another artist and another visual cluster than the positive. By
default both filters are off (a measured departure: see ``GuidedSamplerConfig``).
Duplicate triples (same profile *content*, positive, negative) are dropped by a
64-bit hash; the first guideline wins.

G3 and G6 rank candidates from an artist's items; an artist with more than
``candidates_per_artist`` items is represented by that many, drawn uniformly, so
memory is proportional to the queries (users x cap), never to users x artist size.

Everything is vectorised over users with numpy/torch (per-row sampling by random
keys + lexsort, sparse matrix products for profile centroids); nothing loops over
users or over catalogue items in Python.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch

from visrec_pipeline.recsys.data import CSR

GUIDELINES: dict[int, str] = {
    1: "hold_out",
    2: "next_in_time",
    3: "favourite_artists",
    4: "profile_items",
    5: "single_item_profile",
    6: "single_item_same_artist",
}


@dataclass
class GuidedSamplerConfig:
    """How many candidate positives each guideline proposes per user, and the filter."""

    holdouts_per_user: int = 5  # G1: profiles P \\ {i}, one per removed item
    prefixes_per_user: int = 5  # G2: time prefixes, one per cut-off
    favourite_artists: int = 3  # G3: the user's most frequent artists
    similar_per_user: int = 10  # G3: positives per user
    profile_items_per_user: int = 10  # G4: positives per user
    single_profiles_per_user: int = 3  # G5/G6: artificial one-item profiles per user
    positives_per_single: int = 3  # G5 and G6: positives per artificial profile
    # G3/G6: candidate positives drawn per (user, favourite artist) and per one-item profile before
    # ranking by similarity. An artist with more items is represented by this many, drawn uniformly:
    # memory then grows with users x cap, not with users x artist size (a visual cluster of a 50k-item
    # catalogue holds thousands of items). At or under the cap every item of the artist is ranked.
    candidates_per_artist: int = 256
    negatives_per_positive: int = 3
    alpha: float = 0.5  # weight of the visual term in the hybrid similarity
    # subtract the mean feature before the cosine: CNN features share a large common component
    # (random-init ResNet-50: mean cosine 0.998), which leaves the raw cosine nothing to rank by
    center_features: bool = True
    # The paper's negatives: of another artist and another visual cluster than the positive, and kept only
    # when sim(P, pos) >= sim(P, neg) + margin. DEPARTURE, by default neither: negatives are any item
    # outside the user's profile and the margin is off (-2: hybrid similarities differ by at most 1.5).
    # On the demo (random-init ResNet-50 features) the paper's filters give the model only easy triples:
    # it fits them (loss 0.3 by epoch 6) and ranks poorly. Demo test AUC at the demo's 6 epochs, seed 0:
    # far + margin .715, far + no margin .743, uniform + margin .727, uniform + no margin .761; seeds 0-2
    # uniform + no margin .761/.779/.762 against the random-triples ablation .789/.780 (see
    # docs/curatornet_guided.md). far_negatives=True, margin=0.05 restore the paper's sampler.
    far_negatives: bool = False
    margin: float = -2.0
    oversample: int = 8  # negative candidates drawn per wanted negative
    seed: int = 0

    def __post_init__(self):
        for name in (
            "holdouts_per_user",
            "prefixes_per_user",
            "favourite_artists",
            "similar_per_user",
            "profile_items_per_user",
            "single_profiles_per_user",
            "positives_per_single",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"GuidedSamplerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.candidates_per_artist < 1:
            raise ValueError(
                f"GuidedSamplerConfig.candidates_per_artist must be >= 1, got {self.candidates_per_artist}"
            )
        if self.negatives_per_positive < 1 or self.oversample < 1:
            raise ValueError("GuidedSamplerConfig.negatives_per_positive and .oversample must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"GuidedSamplerConfig.alpha must be in [0, 1], got {self.alpha}")


# ---------------------------------------------------------------------------------------------
# small vectorised helpers


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_combine(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    return splitmix64(h ^ splitmix64(np.asarray(v).astype(np.uint64)))


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment id, offset within segment) of every element of concatenated segments."""
    lengths = np.asarray(lengths, np.int64)
    seg = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    off = np.arange(seg.size, dtype=np.int64) - np.repeat(starts, lengths)
    return seg, off


def _sample_within_segments(lengths: np.ndarray, k, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` distinct offsets per segment, uniformly; returns (segment, offset) sorted."""
    seg, off = _segments(lengths)
    if seg.size == 0:
        return seg, off
    keys = rng.random(seg.size)
    order = np.lexsort((keys, seg))  # segments stay in place, shuffled inside
    rank = off  # rank of the sorted element inside its segment (segments keep their positions)
    kk = np.broadcast_to(np.asarray(k, np.int64), lengths.shape)[seg]
    sel = order[rank < kk]
    s, o = seg[sel], off[sel]
    o2 = np.lexsort((o, s))
    return s[o2], o[o2]


def _top_within_groups(group: np.ndarray, score: np.ndarray, tie: np.ndarray, k) -> np.ndarray:
    """Positions of the ``k`` best scores per group (ties: smaller ``tie`` first)."""
    if group.size == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((tie, -score, group))
    g = group[order]
    first = np.ones(g.size, bool)
    first[1:] = g[1:] != g[:-1]
    starts = np.maximum.accumulate(np.where(first, np.arange(g.size), 0))
    rank = np.arange(g.size) - starts
    kk = np.broadcast_to(np.asarray(k, np.int64), group.shape)[order]
    return np.sort(order[rank < kk])


def capped_members(groups: CSR, rows: np.ndarray, cap: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The members of ``groups`` row ``rows[k]`` for every k: all of them when the row holds at most
    ``cap``, else ``cap`` draws with replacement, repeats dropped. Returns ``(k, member)`` sorted by k;
    at most ``rows.size * cap`` pairs, whatever the rows' lengths."""
    rows = np.asarray(rows, np.int64)
    lengths = groups.lengths()[rows]
    small = np.flatnonzero(lengths <= cap)
    sub = groups.take_rows(rows[small])
    k_small, m_small = small[sub.row_ids()], sub.indices
    big = np.flatnonzero(lengths > cap)
    if big.size == 0:
        return k_small, m_small
    off = np.sort((rng.random((big.size, cap)) * lengths[big, None]).astype(np.int64), axis=1)
    fresh = np.ones(off.shape, bool)
    fresh[:, 1:] = off[:, 1:] != off[:, :-1]
    k_big = np.broadcast_to(big[:, None], off.shape)[fresh]
    m_big = groups.indices[(groups.indptr[rows[big]][:, None] + off)[fresh]]
    k, m = np.concatenate([k_small, k_big]), np.concatenate([m_small, m_big])
    order = np.argsort(k, kind="stable")
    return k[order], m[order]


def artist_ids(n_items: int, creators: np.ndarray | None, clusters: np.ndarray | None) -> np.ndarray:
    """Dense artist id per item: the creator if known, else ``cluster:<id>``, else the item alone."""
    creators = np.full(n_items, -1, np.int64) if creators is None else np.asarray(creators, np.int64)
    clusters = np.full(n_items, -1, np.int64) if clusters is None else np.asarray(clusters, np.int64)
    kind = np.where(creators >= 0, 0, np.where(clusters >= 0, 1, 2))
    value = np.where(kind == 0, creators, np.where(kind == 1, clusters, np.arange(n_items, dtype=np.int64)))
    _, dense = np.unique(np.stack([kind, value], axis=1), axis=0, return_inverse=True)
    return dense.reshape(-1).astype(np.int64)


def normalized_features(
    features: np.ndarray, feature_mask: np.ndarray | None = None, *, center: bool = False
) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32), after subtracting the mean row of the items with features
    when ``center``; zero rows and masked-out rows stay zero."""
    f = np.asarray(features, dtype=np.float32)
    usable = np.ones(f.shape[0], bool) if feature_mask is None else np.asarray(feature_mask, bool)
    if center and usable.any():
        f = f - f[usable].mean(0, keepdims=True)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    out = np.divide(f, norms, out=np.zeros_like(f), where=norms > 1e-12)
    if feature_mask is not None:
        out[~np.asarray(feature_mask, bool)] = 0.0
    return out


def _profile_set_hash(profiles: CSR) -> np.ndarray:
    """Order-free 64-bit hash of each profile's item set (items are unique within a row)."""
    h_items = splitmix64(profiles.indices.astype(np.uint64) + np.uint64(1))
    sums = np.zeros(profiles.n_rows, np.uint64)
    np.add.at(sums, profiles.row_ids(), h_items)  # uint64 add wraps: a set hash
    return _hash_combine(sums, profiles.lengths())


# ---------------------------------------------------------------------------------------------
# the result


@dataclass
class GuidedTriples:
    """Triples referencing a table of distinct profiles (a CSR over the item index)."""

    profiles: CSR  # [n_profiles x n_items]
    profile_id: np.ndarray  # int64 [T]
    pos: np.ndarray  # int64 [T]
    neg: np.ndarray  # int64 [T]
    guideline: np.ndarray  # int8 [T], 1..6
    user: np.ndarray  # int64 [T], the user whose data produced the triple
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.pos.shape[0])

    def summary(self) -> dict[str, int]:
        """Triples kept per guideline (``<id>_<name>``) plus ``total``."""
        counts = np.bincount(self.guideline.astype(np.int64), minlength=7)
        out = {f"{g}_{name}": int(counts[g]) for g, name in GUIDELINES.items()}
        out["total"] = len(self)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``/Parquet); inverse of :meth:`from_arrays`."""
        return {
            "profile_indptr": self.profiles.indptr,
            "profile_indices": self.profiles.indices,
            "n_items": np.asarray([self.profiles.n_cols], np.int64),
            "profile_id": self.profile_id,
            "pos": self.pos,
            "neg": self.neg,
            "guideline": self.guideline,
            "user": self.user,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "GuidedTriples":
        missing = {"profile_indptr", "profile_indices", "n_items", "profile_id", "pos", "neg", "guideline", "user"}
        missing -= set(arrays)
        if missing:
            raise KeyError(f"GuidedTriples.from_arrays: missing arrays {sorted(missing)}")
        profiles = CSR(
            np.asarray(arrays["profile_indptr"], np.int64),
            np.asarray(arrays["profile_indices"], np.int64),
            int(np.asarray(arrays["n_items"]).reshape(-1)[0]),
        )
        out = cls(
            profiles,
            np.asarray(arrays["profile_id"], np.int64),
            np.asarray(arrays["pos"], np.int64),
            np.asarray(arrays["neg"], np.int64),
            np.asarray(arrays["guideline"], np.int8),
            np.asarray(arrays["user"], np.int64),
        )
        out.validate()
        return out

    def validate(self) -> None:
        t = self.pos.shape[0]
        for name in ("profile_id", "neg", "guideline", "user"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"GuidedTriples.{name} has shape {getattr(self, name).shape}, expected ({t},)")
        n_items, n_prof = self.profiles.n_cols, self.profiles.n_rows
        for name in ("pos", "neg"):
            arr = getattr(self, name)
            if t and (arr.min() < 0 or arr.max() >= n_items):
                raise ValueError(f"GuidedTriples.{name} holds item indices outside [0, {n_items})")
        if t and (self.profile_id.min() < 0 or self.profile_id.max() >= n_prof):
            raise ValueError(f"GuidedTriples.profile_id outside [0, {n_prof})")
        if self.profiles.nnz and (self.profiles.indices.min() < 0 or self.profiles.indices.max() >= n_items):
            raise ValueError("GuidedTriples.profiles holds item indices outside the catalogue")


# ---------------------------------------------------------------------------------------------
# the builder


def _row_sums(indptr: np.ndarray, indices: np.ndarray, dense: torch.Tensor) -> torch.Tensor:
    """The sum of ``dense``'s rows listed in each CSR row (a sparse 0/1 matrix times ``dense``)."""
    n_rows = indptr.size - 1
    if n_rows == 0 or indices.size == 0:
        return torch.zeros((n_rows, dense.shape[1]), dtype=dense.dtype)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; the product is exact
        warnings.simplefilter("ignore", UserWarning)
        sp = torch.sparse_csr_tensor(
            torch.from_numpy(np.asarray(indptr, np.int64)),
            torch.from_numpy(np.asarray(indices, np.int64)),
            torch.ones(indices.size, dtype=dense.dtype),
            size=(n_rows, dense.shape[0]),
            check_invariants=False,  # built here: in range
        )
        return sp @ dense


def _prefix_sums(users: np.ndarray, cuts: np.ndarray, t_items: np.ndarray, starts: np.ndarray, fhat: torch.Tensor) -> torch.Tensor:
    """The sum of ``fhat`` over the first ``cuts[k]`` time-ordered items of ``users[k]``, for every k:
    a segment sum between consecutive cuts of a user, then a running sum over the user's cuts, so each
    item is read once per user instead of once per prefix holding it."""
    order = np.lexsort((cuts, users))
    u, c = users[order], cuts[order]
    first = np.ones(u.size, bool)
    first[1:] = u[1:] != u[:-1]
    prev = np.zeros_like(c)
    prev[1:] = c[:-1]
    prev[first] = 0
    seg_len = c - prev
    seg, off = _segments(seg_len)
    indptr = np.zeros(u.size + 1, np.int64)
    np.cumsum(seg_len, out=indptr[1:])
    sums = _row_sums(indptr, t_items[starts[u][seg] + prev[seg] + off], fhat)
    rank = np.arange(u.size) - np.maximum.accumulate(np.where(first, np.arange(u.size), 0))
    for k in range(1, int(rank.max()) + 1 if rank.size else 1):  # a handful of cuts per user
        rows = torch.from_numpy(np.flatnonzero(rank == k))
        sums[rows] += sums[rows - 1]
    out = torch.empty_like(sums)
    out[torch.from_numpy(order)] = sums
    return out


class _ProfileTable:
    """Accumulates profiles (rows of items) with the sum of their items' feature vectors, and hands
    out local ids. The sums come from the guideline that built the profile (a user's sum minus one item,
    running prefix sums...), far cheaper than summing every profile's items anew."""

    def __init__(self):
        self.lengths: list[np.ndarray] = []
        self.items: list[np.ndarray] = []
        self.sums: list[torch.Tensor] = []
        self.n = 0

    def add(self, lengths: np.ndarray, items: np.ndarray, sums: torch.Tensor) -> np.ndarray:
        lengths = np.asarray(lengths, np.int64)
        if sums.shape[0] != lengths.size:
            raise AssertionError(f"{sums.shape[0]} feature sums for {lengths.size} profiles")
        ids = np.arange(self.n, self.n + lengths.size, dtype=np.int64)
        self.lengths.append(lengths)
        self.items.append(np.asarray(items, np.int64))
        self.sums.append(sums)
        self.n += lengths.size
        return ids

    def take_feature_sums(self, dim: int) -> torch.Tensor:
        """Every profile's feature sum as one ``[n, dim]`` tensor, taken out of the table: each part is
        released once copied. These are the sampler's largest arrays (~280k profiles x 2048 float32 = 2.3 GB
        at 1M interactions): a ``torch.cat`` beside the parts held them twice."""
        if not self.sums:
            return torch.zeros((0, dim))
        out = torch.empty((sum(int(t.shape[0]) for t in self.sums), dim), dtype=self.sums[0].dtype)
        at = 0
        while self.sums:
            part = self.sums.pop(0)
            out[at : at + part.shape[0]] = part
            at += part.shape[0]
            del part
        return out

    def csr(self, n_items: int) -> CSR:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        items = np.concatenate(self.items) if self.items else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
        return CSR.from_pairs(rows, items, lengths.size, n_items)


class _Similarity:
    """Hybrid visual + artist similarity between profiles and items."""

    def __init__(self, profiles: CSR, sums: torch.Tensor, fhat: torch.Tensor, artist: np.ndarray, alpha: float):
        self.alpha = float(alpha)
        self.fhat = fhat
        self.artist = artist
        self.n_artists = int(artist.max()) + 1 if artist.size else 1
        lengths = profiles.lengths()
        self.lengths = lengths
        # centroid of the profile's unit feature vectors, in place: ``sums`` is as large as the table
        self.centroids = sums.div_(torch.from_numpy(np.maximum(lengths, 1)).to(sums.dtype)[:, None])
        # sorted (profile, artist) keys to count artist occurrences per profile
        self.pa_keys = np.sort(profiles.row_ids() * self.n_artists + artist[profiles.indices])

    def __call__(self, prof: np.ndarray, items: np.ndarray) -> np.ndarray:
        prof = np.asarray(prof, np.int64).reshape(-1)
        items = np.asarray(items, np.int64).reshape(-1)
        visual = self._visual(prof, items)
        keys = prof * self.n_artists + self.artist[items]
        count = np.searchsorted(self.pa_keys, keys, "right") - np.searchsorted(self.pa_keys, keys, "left")
        share = count / np.maximum(self.lengths[prof], 1)
        return self.alpha * visual + (1.0 - self.alpha) * share.astype(np.float32)

    def _visual(self, prof: np.ndarray, items: np.ndarray) -> np.ndarray:
        """centroid . item for each pair, as one sampled dense-dense product over the distinct pairs
        (torch.sparse.sampled_addmm): 12x faster on CPU than gathering both rows per pair."""
        if prof.size == 0:
            return np.zeros(0, np.float32)
        n_items = self.fhat.shape[0]
        pairs, inverse = np.unique(prof * n_items + items, return_inverse=True)
        rows = pairs // n_items
        crow = np.zeros(self.centroids.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=self.centroids.shape[0]), out=crow[1:])
        with warnings.catch_warnings():  # torch flags sparse CSR as beta
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                torch.from_numpy(crow),
                torch.from_numpy(pairs % n_items),
                torch.zeros(pairs.size, dtype=self.fhat.dtype),
                size=(self.centroids.shape[0], n_items),
                check_invariants=False,  # np.unique: sorted by row, then column
            )
            product = torch.sparse.sampled_addmm(pattern, self.centroids, self.fhat.T, beta=0.0)
        return product.values().numpy()[inverse.reshape(-1)]


class _Catalogue:
    """What the guidelines read about items: unit feature vectors, artist and cluster ids, each artist's items."""

    def __init__(self, n_items: int, features: np.ndarray, feature_mask, creators, clusters, center: bool):
        self.fhat = torch.from_numpy(normalized_features(features, feature_mask, center=center))
        self.artist = artist_ids(n_items, creators, clusters)
        self.cluster = np.full(n_items, -1, np.int64) if clusters is None else np.asarray(clusters, np.int64)
        self.n_artists = int(self.artist.max()) + 1 if n_items else 0
        self.artist_items = CSR.from_pairs(self.artist, np.arange(n_items, dtype=np.int64), self.n_artists, n_items)


class _UserItems:
    """Each user's training items as the guidelines read them: counts, row starts, time order, membership,
    and the sum of their unit feature vectors."""

    def __init__(self, train: CSR, train_ts: np.ndarray, fhat: torch.Tensor):
        self.train = train
        self.n_items = train.n_cols
        self.lengths = train.lengths()
        self.starts = train.indptr[:-1]
        # each user's items in time order (ties by item index), same row layout as `train`
        t_order = np.lexsort((train.indices, train_ts, train.row_ids()))
        self.t_items = train.indices[t_order]
        self.member_keys = train.row_ids() * self.n_items + train.indices  # sorted: CSR rows, sorted columns
        self.feature_sums = _row_sums(train.indptr, train.indices, fhat)  # [n_users, d]

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Is ``items[k]`` in the training profile of ``users[k]``?"""
        keys = users * self.n_items + items
        if self.member_keys.size == 0:
            return np.zeros(keys.shape, bool)
        at = np.minimum(np.searchsorted(self.member_keys, keys), self.member_keys.size - 1)
        return self.member_keys[at] == keys


class _Queries:
    """(profile, user, positive, guideline) proposals, collected guideline by guideline."""

    def __init__(self):
        self.prof: list[np.ndarray] = []
        self.user: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.guide: list[np.ndarray] = []

    def add(self, prof, user, pos, g: int) -> None:
        self.prof.append(np.asarray(prof, np.int64))
        self.user.append(np.asarray(user, np.int64))
        self.pos.append(np.asarray(pos, np.int64))
        self.guide.append(np.full(np.asarray(pos).size, g, np.int8))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        prof, user, pos, guide = (np.concatenate(x) for x in (self.prof, self.user, self.pos, self.guide))
        return prof, user, pos, guide


# Each guideline below adds the profiles it needs to the table and returns its queries
# ``(profile ids, users, positives)``. They draw from one generator, in the builder's order.


def _hold_out(users: _UserItems, fhat: torch.Tensor, table: _ProfileTable, multi: np.ndarray, k: int, rng):
    """G1: remove an item, predict it; profile = P \\ {i}."""
    train = users.train
    s, o = _sample_within_segments(users.lengths[multi], k, rng)
    u1 = multi[s]
    i1 = train.indices[users.starts[u1] + o]
    sub = train.take_rows(u1)
    seg = sub.row_ids()
    keep = sub.indices != i1[seg]
    return table.add(sub.lengths() - 1, sub.indices[keep], users.feature_sums[u1] - fhat[i1]), u1, i1


def _next_in_time(users: _UserItems, fhat: torch.Tensor, table: _ProfileTable, multi: np.ndarray, k: int, rng):
    """G2: predict the next item in time from the prefix before it."""
    s, o = _sample_within_segments(users.lengths[multi] - 1, k, rng)
    u2 = multi[s]
    cut = o + 1  # prefix length, 1 .. |P|-1
    seg2, off2 = _segments(cut)
    prefix_items = users.t_items[users.starts[u2][seg2] + off2]
    sums = _prefix_sums(u2, cut, users.t_items, users.starts, fhat)
    return table.add(cut, prefix_items, sums), u2, users.t_items[users.starts[u2] + cut]


def _full_profiles(users: _UserItems, table: _ProfileTable, has: np.ndarray) -> np.ndarray:
    """The profile id of each user's whole profile (G3, G4), -1 for users without items."""
    full_id = np.full(users.train.n_rows, -1, np.int64)
    full_id[has] = table.add(users.lengths[has], users.train.take_rows(has).indices, users.feature_sums[has])
    return full_id


def _single_item_profiles(users: _UserItems, fhat: torch.Tensor, table: _ProfileTable, multi: np.ndarray, k: int, rng):
    """G5/G6's artificial one-item profiles ``{p}``: ``(users, items p, profile ids)``."""
    s, o = _sample_within_segments(users.lengths[multi], k, rng)
    u56 = multi[s]
    p56 = users.train.indices[users.starts[u56] + o]
    return u56, p56, table.add(np.ones(p56.size, np.int64), p56, fhat[p56])


def _favourite_artists(users: _UserItems, catalogue: _Catalogue, sim: _Similarity, full_id: np.ndarray, cfg, rng):
    """G3: items (outside the profile) of the user's favourite artists, most similar to the profile
    (among at most ``candidates_per_artist`` drawn per favourite artist)."""
    train, n_artists, artist = users.train, catalogue.n_artists, catalogue.artist
    ua_keys = train.row_ids() * n_artists + artist[train.indices]
    keys, counts = np.unique(ua_keys, return_counts=True)
    ku, ka = keys // n_artists, keys % n_artists
    fav = _top_within_groups(ku, counts.astype(np.float64), ka, cfg.favourite_artists)
    fu, fa = ku[fav], ka[fav]
    k, cx = capped_members(catalogue.artist_items, fa, cfg.candidates_per_artist, rng)
    cu = fu[k]
    ok = ~users.contains(cu, cx)
    cu, cx = cu[ok], cx[ok]
    score = sim(full_id[cu], cx)
    best = _top_within_groups(cu, score.astype(np.float64), cx, cfg.similar_per_user)
    return (full_id[cu[best]], cu[best], cx[best]), int(cx.size)


def _profile_items(users: _UserItems, full_id: np.ndarray, has: np.ndarray, k: int, rng):
    """G4: items of the profile itself, given the whole profile."""
    s, o = _sample_within_segments(users.lengths[has], k, rng)
    u4 = has[s]
    return full_id[u4], u4, users.train.indices[users.starts[u4] + o]


def _single_item_profile(users: _UserItems, u56: np.ndarray, p56: np.ndarray, single_id: np.ndarray, k: int, rng):
    """G5: given ``{p}``, predict the user's other profile items."""
    sub = users.train.take_rows(u56)
    seg = sub.row_ids()
    keep = sub.indices != p56[seg]
    indptr = np.concatenate([[0], np.cumsum(sub.lengths() - 1)]).astype(np.int64)
    others = CSR(indptr, sub.indices[keep], users.n_items)
    s, o = _sample_within_segments(others.lengths(), k, rng)
    return single_id[s], u56[s], others.indices[others.indptr[s] + o]


def _single_item_same_artist(
    catalogue: _Catalogue, sim: _Similarity, u56: np.ndarray, p56: np.ndarray, single_id: np.ndarray, k: int, cap: int, rng
):
    """G6: given ``{p}``, predict visually similar items of p's artist (among at most ``cap`` drawn)."""
    cs, cx = capped_members(catalogue.artist_items, catalogue.artist[p56], cap, rng)
    ok = cx != p56[cs]
    cs, cx = cs[ok], cx[ok]
    score = sim(single_id[cs], cx)
    best = _top_within_groups(cs, score.astype(np.float64), cx, k)
    return (single_id[cs[best]], u56[cs[best]], cx[best]), int(cx.size)


def _negatives(
    users: _UserItems, catalogue: _Catalogue, sim: _Similarity, prof, user, pos, cfg: GuidedSamplerConfig, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``negatives_per_positive`` negatives per query: outside the user's profile, of another artist
    and another cluster than the positive when ``far_negatives``, and passing the margin. Returns ``(query index, negative)``."""
    artist, cluster = catalogue.artist, catalogue.cluster
    n_neg = cfg.negatives_per_positive
    q = pos.size
    cand = rng.integers(0, max(users.n_items, 1), size=(q, n_neg * cfg.oversample), dtype=np.int64)
    pos_b = pos[:, None]
    cheap = ~users.contains(np.broadcast_to(user[:, None], cand.shape), cand) & (cand != pos_b)
    if cfg.far_negatives:
        cheap &= (artist[cand] != artist[pos_b]) & ~((cluster[cand] == cluster[pos_b]) & (cluster[pos_b] >= 0))
    # no repeated negative within a query
    first_seen = np.zeros_like(cheap)
    srt = np.argsort(cand, axis=1, kind="stable")
    cs = np.take_along_axis(cand, srt, 1)
    dup = np.zeros_like(cheap)
    dup[:, 1:] = cs[:, 1:] == cs[:, :-1]
    np.put_along_axis(first_seen, srt, ~dup, 1)
    cheap &= first_seen
    # score only the first 2 * n_neg admissible candidates per query, then apply the margin
    rank = np.cumsum(cheap, axis=1) - 1
    scored = cheap & (rank < 2 * n_neg)
    rq, rc = np.nonzero(scored)
    sim_pos = sim(prof, pos)
    sim_neg = sim(prof[rq], cand[rq, rc])
    passes = sim_pos[rq] >= sim_neg + np.float32(cfg.margin)
    rq, rc = rq[passes], rc[passes]
    # keep the first n_neg passing negatives per query (rq is sorted, rc ascending within)
    first = np.ones(rq.size, bool)
    first[1:] = rq[1:] != rq[:-1]
    grp_start = np.maximum.accumulate(np.where(first, np.arange(rq.size), 0))
    take = (np.arange(rq.size) - grp_start) < n_neg
    rq, rc = rq[take], rc[take]
    return rq, cand[rq, rc]


def _drop_duplicates(
    profiles: CSR, t_prof: np.ndarray, t_pos: np.ndarray, t_neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical profiles by content, then the first of each set of duplicate triples (same profile
    content, positive, negative). Returns ``(canonical profile rows, canonical id per triple, kept triples)``."""
    used = np.unique(t_prof)
    used_csr = profiles.take_rows(used)
    p_hash = _profile_set_hash(used_csr)
    _, first_idx, inv = np.unique(p_hash, return_index=True, return_inverse=True)
    canon_of_used = inv.reshape(-1)
    # canonical id = order of the first profile with that content
    order = np.argsort(first_idx, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(order.size)
    canon_of_used = rank_of[canon_of_used]
    canon_rows = used[first_idx[order]]
    t_canon = canon_of_used[np.searchsorted(used, t_prof)]
    t_hash = _hash_combine(_hash_combine(p_hash[first_idx[order]][t_canon], t_pos), t_neg)
    _, keep_idx = np.unique(t_hash, return_index=True)
    return canon_rows, t_canon, np.sort(keep_idx)


def _check_inputs(train: CSR, train_ts, features, creators, clusters, feature_mask) -> None:
    n_items = train.n_cols
    if features.ndim != 2 or features.shape[0] != n_items:
        raise ValueError(f"features must be [n_items={n_items}, d], got shape {features.shape}")
    if train_ts.shape != (train.nnz,):
        raise ValueError(f"train_ts must align with the training CSR ({train.nnz} entries), got {train_ts.shape}")
    for name, arr in (("creators", creators), ("clusters", clusters), ("feature_mask", feature_mask)):
        if arr is not None and np.asarray(arr).shape != (n_items,):
            raise ValueError(f"{name} must have shape ({n_items},), got {np.asarray(arr).shape}")
    usable = np.ones(n_items, bool) if feature_mask is None else np.asarray(feature_mask, bool)
    bad = np.flatnonzero(usable & ~np.isfinite(features).all(1))
    if bad.size:
        raise ValueError(f"non-finite feature values for item indices {bad[:5].tolist()} (first 5)")


def build_guided_triples(
    train: CSR,
    train_ts: np.ndarray,
    features: np.ndarray,
    *,
    creators: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
    feature_mask: np.ndarray | None = None,
    config: GuidedSamplerConfig | None = None,
) -> GuidedTriples:
    """Sample CuratorNet's guideline triples from the training users.

    ``train``: users x items CSR; ``train_ts``: timestamps aligned with ``train.indices``;
    ``features``: ``[n_items, d]`` pooled visual features; ``creators``/``clusters``:
    int64 ``[n_items]`` with -1 for unknown. Deterministic for a given ``config.seed``.
    """
    cfg = config or GuidedSamplerConfig()
    features = np.asarray(features)
    train_ts = np.asarray(train_ts, np.int64)
    _check_inputs(train, train_ts, features, creators, clusters, feature_mask)
    rng = np.random.default_rng(cfg.seed)
    catalogue = _Catalogue(train.n_cols, features, feature_mask, creators, clusters, cfg.center_features)
    users = _UserItems(train, train_ts, catalogue.fhat)
    fhat = catalogue.fhat

    # the profiles: built by the guidelines that own them, in this order (it fixes the profile ids)
    table = _ProfileTable()
    queries = _Queries()
    multi = np.flatnonzero(users.lengths >= 2)  # users who can lose an item and keep a profile
    queries.add(*_hold_out(users, fhat, table, multi, cfg.holdouts_per_user, rng), 1)
    queries.add(*_next_in_time(users, fhat, table, multi, cfg.prefixes_per_user, rng), 2)
    has = np.flatnonzero(users.lengths >= 1)
    full_id = _full_profiles(users, table, has)
    u56, p56, single_id = _single_item_profiles(users, fhat, table, multi, cfg.single_profiles_per_user, rng)
    profiles = table.csr(train.n_cols)
    sim = _Similarity(profiles, table.take_feature_sums(fhat.shape[1]), fhat, catalogue.artist, cfg.alpha)

    # the positives of the guidelines that reuse those profiles
    ranked = np.zeros(7, np.int64)  # G3/G6: candidates scored before keeping the most similar
    if cfg.favourite_artists and cfg.similar_per_user and has.size:
        g3, ranked[3] = _favourite_artists(users, catalogue, sim, full_id, cfg, rng)
        queries.add(*g3, 3)
    queries.add(*_profile_items(users, full_id, has, cfg.profile_items_per_user, rng), 4)
    queries.add(*_single_item_profile(users, u56, p56, single_id, cfg.positives_per_single, rng), 5)
    if cfg.positives_per_single and p56.size:
        g6, ranked[6] = _single_item_same_artist(
            catalogue, sim, u56, p56, single_id, cfg.positives_per_single, cfg.candidates_per_artist, rng
        )
        queries.add(*g6, 6)

    prof, user, pos, guide = queries.arrays()
    proposed = np.bincount(guide.astype(np.int64), minlength=7)
    rq, neg = _negatives(users, catalogue, sim, prof, user, pos, cfg, rng)
    t_prof, t_user, t_pos, t_neg, t_g = prof[rq], user[rq], pos[rq], neg, guide[rq]
    after_margin = np.bincount(t_g.astype(np.int64), minlength=7)

    canon_rows, t_canon, keep_idx = _drop_duplicates(profiles, t_prof, t_pos, t_neg)
    out = GuidedTriples(
        profiles.take_rows(canon_rows),
        t_canon[keep_idx],
        t_pos[keep_idx],
        t_neg[keep_idx],
        t_g[keep_idx],
        t_user[keep_idx],
        config=asdict(cfg),
    )
    final = np.bincount(out.guideline.astype(np.int64), minlength=7)
    out.stats = {
        name: {
            "candidates_ranked": int(ranked[g]),
            "positives_proposed": int(proposed[g]),
            "triples_after_margin": int(after_margin[g]),
            "duplicates_dropped": int(after_margin[g] - final[g]),
            "triples": int(final[g]),
        }
        for g, name in GUIDELINES.items()
    }
    return out


# ---------------------------------------------------------------------------------------------
# batches for training


def profile_batch(profiles: CSR, profile_ids: np.ndarray, device=None) -> dict[str, torch.Tensor]:
    """The distinct profiles of a batch as flat items + offsets (a CSR slice)."""
    uniq, inv = np.unique(profile_ids, return_inverse=True)
    sub = profiles.take_rows(uniq)
    return {
        "profile_items": torch.as_tensor(sub.indices, device=device),
        "profile_offsets": torch.as_tensor(sub.indptr, device=device),
        "triple_profile": torch.as_tensor(inv.reshape(-1), device=device),
    }


class GuidedTripleBatches:
    """Shuffled mini-batches of guided triples; ``epoch(e)`` is deterministic in ``(seed, e)``.

    With ``group_by_profile`` (default) the triples of one profile sit next to each other in a
    shuffled order of profiles (and in random order inside), so a batch carries ~10x fewer
    distinct profiles to pool: the profile pooling, not the towers, dominates CPU time otherwise.

    Each batch: ``profile_items`` long [nnz], ``profile_offsets`` long [n_profiles + 1],
    ``triple_profile`` long [b] (row of the batch's profile table), ``pos``, ``neg`` long [b],
    ``guideline`` long [b].
    """

    def __init__(
        self, triples: GuidedTriples, *, batch_size: int, seed: int = 0, device=None, group_by_profile: bool = True
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.triples = triples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = device
        self.group_by_profile = bool(group_by_profile)

    def __len__(self) -> int:
        return -(-len(self.triples) // self.batch_size)

    def order(self, e: int) -> np.ndarray:
        """The order of the triples in epoch ``e``."""
        t = self.triples
        rng = np.random.default_rng([self.seed, int(e)])
        if not self.group_by_profile:
            return rng.permutation(len(t))
        profile_rank = rng.permutation(t.profiles.n_rows)
        return np.lexsort((rng.random(len(t)), profile_rank[t.profile_id]))

    def epoch(self, e: int) -> Iterator[dict[str, torch.Tensor]]:
        t = self.triples
        perm = self.order(e)
        for s in range(0, perm.size, self.batch_size):
            idx = perm[s : s + self.batch_size]
            batch = profile_batch(t.profiles, t.profile_id[idx], self.device)
            batch["pos"] = torch.as_tensor(t.pos[idx], device=self.device)
            batch["neg"] = torch.as_tensor(t.neg[idx], device=self.device)
            batch["guideline"] = torch.as_tensor(t.guideline[idx].astype(np.int64), device=self.device)
            yield batch

    __call__ = epoch
