"""The random ("naive") BPR triple sampler: (user, positive, negative), drawn afresh every epoch.

Positives: a random permutation of the training entries (every (user, item) pair is
used once per epoch; more triples per epoch cycle through further permutations).
Negatives: uniform over the items *outside* the user's training profile. Instead of
rejection sampling (draw, look the key up, redraw the hits) we draw the rank ``r`` of
the negative among the user's non-consumed items and map it to an item with one
sorted-key search, so every negative is valid after a single vectorised pass:
for a user whose sorted profile is ``p_0 < p_1 < ...``, the ``r``-th item not in the
profile is ``r + #{k : p_k - k <= r}``, and ``p_k - k`` is non-decreasing, so the count
is a ``torch.searchsorted`` over the global keys ``user * n_items + (p_k - k)``.

Everything is torch on the CPU with a generator seeded from ``(seed, epoch)``, so an
epoch's triples are identical on every device; a whole epoch is moved to the target
device at once and sliced into batches (views, no copies). Nothing is written to disk.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from visrec_pipeline.recsys.data import CSR


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x7B9]).generate_state(2)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def user_chunk_order(user: np.ndarray, chunk: int | np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the triples of users ``user`` (in a random order) that lays them out as chunks of
    up to ``chunk`` triples of one user, the chunks in a seeded random order (per ``seed`` and ``epoch``).
    ``chunk`` may be an array indexed by user id: a chunk size per user (:func:`profile_chunks`).

    Why: a model that encodes each distinct user of a batch once (a profile tower, a profile attention)
    pays per distinct user; a shuffled batch holds ~batch_size distinct users once users are many, so
    the cost per triple grows with the number of users. In chunks, a batch holds ~batch_size / chunk
    of them whatever the data size, while still mixing many users."""
    user = np.asarray(user)
    n = user.size
    per_user = np.ndim(chunk) > 0
    if n == 0 or (not per_user and chunk <= 1):
        return np.arange(n)
    order = np.argsort(user, kind="stable")  # stable: the given random order within a user
    grouped = user[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    size = np.asarray(chunk, dtype=np.int64)[grouped] if per_user else chunk
    chunk_id = np.cumsum(rank % size == 0) - 1  # a new chunk every `size` triples of a user
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0xC4C4]))
    shuffled = rng.permutation(int(chunk_id[-1]) + 1)
    return order[np.argsort(shuffled[chunk_id], kind="stable")]


def profile_chunks(lengths: np.ndarray, chunk: int, profile_cap: int, rows_per_triple: int) -> np.ndarray:
    """Chunk size per user for :func:`user_chunk_order` that bounds the profile rows a model pools per
    triple: ``max(chunk, ceil(min(length, profile_cap) / rows_per_triple))``.

    Why: a batch pools each distinct user's (capped) profile once, so a user in chunks of ``chunk``
    costs ``length / chunk`` poolings of up to ``profile_cap`` rows an epoch: ``cap / chunk`` rows per
    triple for heavy users, and more of them as a dataset grows (measured on bench/scale.py's data:
    22 rows per triple at 100k interactions, 30 at 1M, with chunks of 4 and a cap of 256). Chunks
    that grow with the profile keep it at most ``rows_per_triple`` (12-13 at both sizes with 16);
    light users, whose profiles are short, keep chunks of ``chunk``."""
    capped = np.minimum(np.asarray(lengths, dtype=np.int64), profile_cap if profile_cap > 0 else np.iinfo(np.int64).max)
    return np.maximum(int(chunk), -(-capped // int(rows_per_triple)))


class RandomTripleSampler:
    """Uniform BPR triples over a training CSR ``[n_users x n_items]``; with ``user_chunk`` > 1 an
    epoch's triples come in chunks of that many triples of one user (:func:`user_chunk_order`), and
    with ``profile_rows_per_triple`` > 0 heavy users' chunks grow with their profile (capped at
    ``profile_cap`` items) as :func:`profile_chunks` says."""

    def __init__(
        self,
        train: CSR,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int = 1024,
        triples_per_epoch: int | None = None,
        user_chunk: int = 1,
        profile_rows_per_triple: int = 0,
        profile_cap: int = 0,
    ):
        if user_chunk < 1:
            raise ValueError(f"user_chunk must be >= 1, got {user_chunk}")
        if profile_rows_per_triple < 0 or profile_cap < 0:
            raise ValueError("profile_rows_per_triple and profile_cap must be >= 0")
        self.user_chunk = int(user_chunk)
        self.profile_rows_per_triple = int(profile_rows_per_triple)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if triples_per_epoch is not None and triples_per_epoch < 1:
            raise ValueError(f"triples_per_epoch must be >= 1 or None, got {triples_per_epoch}")
        self.n_users, self.n_items = train.n_rows, train.n_cols
        self.seed = int(seed)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        lengths = train.lengths()
        # the chunk size of each user: one size for all, or grown with the profile (profile_chunks)
        self._chunks: int | np.ndarray = self.user_chunk
        if self.user_chunk > 1 and self.profile_rows_per_triple > 0:
            self._chunks = profile_chunks(lengths, self.user_chunk, int(profile_cap), self.profile_rows_per_triple)
        # a user who consumed every item has no negative: their entries cannot form a triple
        full = lengths >= self.n_items
        self.skipped_users = int(full.sum())
        rows = train.row_ids()
        usable = ~full[rows]
        self._users = torch.as_tensor(rows[usable], dtype=torch.long)
        self._items = torch.as_tensor(train.indices[usable], dtype=torch.long)
        if self._users.numel() == 0:
            raise ValueError("no training entry can form a triple (no interactions, or users consumed every item)")
        self.nnz = int(self._users.numel())
        self.triples_per_epoch = int(triples_per_epoch) if triples_per_epoch is not None else self.nnz
        # within each row, indices are sorted: p_k - k is non-decreasing, so the global keys are sorted
        slot = np.arange(train.nnz, dtype=np.int64) - np.repeat(train.indptr[:-1], lengths)
        self._rank_keys = torch.as_tensor(rows * self.n_items + (train.indices - slot), dtype=torch.long)
        self._indptr = torch.as_tensor(train.indptr, dtype=torch.long)
        self._n_free = torch.as_tensor(self.n_items - lengths, dtype=torch.long)
        # sorted (user, item) keys, for membership checks in tests and callers
        self.keys = torch.as_tensor(rows * self.n_items + train.indices, dtype=torch.long)

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool mask: is ``(users[k], items[k])`` a training interaction? (sorted-key search)"""
        keys = users.cpu().long() * self.n_items + items.cpu().long()
        pos = torch.searchsorted(self.keys, keys).clamp(max=max(self.keys.numel() - 1, 0))
        return (self.keys[pos] == keys) if self.keys.numel() else torch.zeros_like(keys, dtype=torch.bool)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.triples_per_epoch // self.batch_size)

    def sample_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """All triples of ``epoch`` as CPU tensors ``user``, ``pos``, ``neg`` (long ``[triples_per_epoch]``)."""
        g = epoch_generator(self.seed, epoch)
        reps = -(-self.triples_per_epoch // self.nnz)
        order = torch.cat([torch.randperm(self.nnz, generator=g) for _ in range(reps)])[: self.triples_per_epoch]
        users, pos = self._users[order], self._items[order]
        neg = self.sample_negatives(users, g)
        if self.user_chunk > 1:
            chunked = torch.from_numpy(user_chunk_order(users.numpy(), self._chunks, self.seed, epoch))
            users, pos, neg = users[chunked], pos[chunked], neg[chunked]
        return {"user": users, "pos": pos, "neg": neg}

    def sample_negatives(self, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniform item outside each user's training profile (exact, no rejection loop)."""
        free = self._n_free[users]
        # float64 keeps the rank uniform for catalogues far beyond 2**24 items
        r = (torch.rand(users.shape, generator=generator, dtype=torch.float64) * free).long()
        r = torch.minimum(r, free - 1)
        query = users * self.n_items + r
        before = torch.searchsorted(self._rank_keys, query, right=True) - self._indptr[users]
        return r + before

    def epoch(self, e: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of epoch ``e`` on the sampler's device; deterministic given ``(seed, e)``."""
        triples = self.sample_epoch(e)
        if self.device.type != "cpu":
            triples = {k: v.to(self.device, non_blocking=True) for k, v in triples.items()}
        n = self.triples_per_epoch
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            yield {k: v[start:stop] for k, v in triples.items()}

    __call__ = epoch

    def summary(self) -> dict:
        """Counts and settings for lineage metadata."""
        return {
            "sampler": "random",
            "seed": self.seed,
            "users": self.n_users,
            "items": self.n_items,
            "positives": self.nnz,
            "triples_per_epoch": self.triples_per_epoch,
            "batch_size": self.batch_size,
            "batches_per_epoch": len(self),
            "user_chunk": self.user_chunk,
            **(
                {"profile_rows_per_triple": self.profile_rows_per_triple, "largest_user_chunk": int(np.max(self._chunks))}
                if isinstance(self._chunks, np.ndarray) else {}
            ),
            "skipped_users_without_negatives": self.skipped_users,
            "negatives": "uniform over items outside the user's training profile (exact complement sampling)",
        }
