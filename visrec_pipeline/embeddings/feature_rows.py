"""A lazy, read-only ``[n, ...]`` array of feature rows spread over memory-mapped shard files.

:class:`FeatureRows` is what the models get when the store's rows are not one contiguous run of
one shard in the requested order (otherwise they get the shard's ``np.memmap`` itself, see
``store.open_features``). Indexing it reads only the rows asked for: each call maps the shard
files it needs and unmaps them when it returns, so a scan over all rows keeps one block in
memory, not the whole array and not the file pages it has read.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

# shard number -> that shard's memory-mapped array (checked; mapped anew on each call)
Opener = Callable[[int], np.ndarray]


class FeatureRows:
    """Rows ``i`` of a logical ``[n, *row_shape]`` array; row ``i`` lives at row ``rows[i]`` of shard
    ``shard_of[i]`` (``-1``: the item has no features, read as zeros).

    Supports ``len``, ``shape``, ``dtype``, ``ndim``, ``x[i]``, ``x[a:b]``, ``x[int array]``,
    ``x[bool mask]``, ``x[rows, regions]`` (advanced indexing on the leading axes, as numpy),
    :meth:`iter_blocks`, and ``np.asarray(x)`` (the whole array: avoid at scale).
    """

    def __init__(
        self,
        shard_of: np.ndarray,
        rows: np.ndarray,
        row_shape: Sequence[int],
        dtype,
        opener: Opener,
        n_shards: int,
    ):
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._rows = np.asarray(rows, dtype=np.int64)
        if self._shard_of.shape != self._rows.shape or self._shard_of.ndim != 1:
            raise ValueError("FeatureRows: shard_of and rows must be 1-d arrays of the same length")
        self.dtype = np.dtype(dtype)
        self.shape = (len(self._rows), *(int(s) for s in row_shape))
        self._opener = opener
        self._n_shards = int(n_shards)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def _positions(self, key) -> tuple[np.ndarray, bool]:
        """(row positions, scalar?) of a leading-axis key."""
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of bounds for axis 0 with size {n}")
            return np.array([i], np.int64), True
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64), False
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} does not match axis 0 of size {n}")
            return np.flatnonzero(idx), False
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(f"FeatureRows supports 1-d integer or boolean row indices, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64) + np.where(idx < 0, n, 0)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of bounds for axis 0 with size {n}")
        return idx, False

    def __getitem__(self, key) -> np.ndarray:
        lead, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        pos, scalar = self._positions(lead)
        rest = tuple(np.asarray(r) if isinstance(r, (list, np.ndarray)) else r for r in rest)
        pointwise = [r for r in rest if isinstance(r, np.ndarray)]
        if any(r.shape != pos.shape for r in pointwise) and not scalar:
            raise IndexError("FeatureRows: an index array after the rows must have one entry per row")
        # the result's shape: index a zero-size stand-in of the same trailing shape the same way
        stand_in = np.broadcast_to(np.zeros((), self.dtype), (1, *self.shape[1:]))
        probe = stand_in[(np.zeros(1, np.int64), *(r[:1] if isinstance(r, np.ndarray) else r for r in rest))]
        out = np.zeros((len(pos), *probe.shape[1:]), dtype=self.dtype)
        shard_of, rows = self._shard_of[pos], self._rows[pos]
        for s in np.unique(shard_of[shard_of >= 0]).tolist():
            dst = np.flatnonzero(shard_of == s)
            order = np.argsort(rows[dst], kind="stable")  # sequential reads from the map
            dst = dst[order]
            mapped = self._opener(s)
            sel = (rows[dst], *(r[dst] if isinstance(r, np.ndarray) else r for r in rest))
            out[dst] = mapped[sel]
            del mapped  # unmapped here: the pages read do not stay in this process
        return out[0] if scalar else out

    def iter_blocks(self, block: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows[start:start + block])`` over the whole array, each block a new in-RAM array."""
        for start in range(0, self.shape[0], max(1, int(block))):
            yield start, self[start : start + block]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for start, rows in self.iter_blocks():
            out[start : start + len(rows)] = rows
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"FeatureRows(shape={self.shape}, dtype={self.dtype}, shards={self._n_shards})"
