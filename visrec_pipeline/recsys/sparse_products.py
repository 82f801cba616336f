"""Products of a sparse binary interaction matrix without a dense copy of it.

``row_gram(A)`` is ``A A^T`` (dense, float64) for a binary CSR ``A``; with ``A = X^T`` it is the
item Gram ``X^T X``, with ``A = X`` the user Gram ``X X^T``. The result is built in column
blocks: a block of rows of ``A`` is densified (``[block, n_cols]``), multiplied by the sparse
``A``, and written into its columns, so besides the result only ``block x n_cols`` values and the
sparse matrix are held. ``block_cols`` picks that block size from a byte bound.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from visrec_pipeline.recsys.data import CSR

DEFAULT_BLOCK_BYTES = 64 << 20  # a dense block of this size is small next to any Gram it builds


def transpose(a: CSR) -> CSR:
    """``a^T`` as a CSR (rows of the result = columns of ``a``)."""
    return CSR.from_pairs(a.indices, a.row_ids(), a.n_cols, a.n_rows)


def select_columns(a: CSR, keep: np.ndarray) -> CSR:
    """``a`` restricted to the columns ``keep`` (sorted or not), renumbered ``0..len(keep)-1`` in ``keep``'s order."""
    remap = np.full(a.n_cols, -1, np.int64)
    remap[np.asarray(keep, np.int64)] = np.arange(len(keep), dtype=np.int64)
    cols = remap[a.indices]
    inside = cols >= 0
    return CSR.from_pairs(a.row_ids()[inside], cols[inside], a.n_rows, len(keep))


def to_torch(a: CSR, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """``a`` as a torch sparse CSR tensor of ones (a CSR is valid by construction: no invariant check)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.as_tensor(a.indptr), torch.as_tensor(a.indices), torch.ones(a.nnz, dtype=dtype),
            (a.n_rows, a.n_cols), device=device, check_invariants=False,
        )


def block_cols(n_rows: int, block_bytes: int = DEFAULT_BLOCK_BYTES, itemsize: int = 8) -> int:
    """How many columns of an ``[n_rows, cols]`` dense block fit in ``block_bytes``."""
    return max(1, block_bytes // max(n_rows * itemsize, 1))


def dense_rows_t(a: CSR, start: int, stop: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """Rows ``start:stop`` of ``a``, transposed: a dense contiguous ``[n_cols, stop - start]`` tensor."""
    indptr = a.indptr[start : stop + 1]
    lengths = np.diff(indptr)
    rows = torch.as_tensor(np.repeat(np.arange(stop - start, dtype=np.int64), lengths), device=device)
    cols = torch.as_tensor(a.indices[indptr[0] : indptr[-1]], device=device)
    out = torch.zeros((a.n_cols, stop - start), dtype=dtype, device=device)
    out[cols, rows] = 1.0
    return out


def row_gram(a: CSR, *, device=None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``a a^T`` as a dense float64 ``[n_rows, n_rows]`` tensor, built column block by column block.

    The products run in float32, which holds the co-occurrence counts exactly (integers below
    2^24) at about twice float64's speed; each block is widened to float64 as it is written."""
    n = a.n_rows
    if a.nnz and int(np.bincount(a.indices, minlength=a.n_cols).max()) >= 1 << 24:
        raise ValueError("row_gram: a count reaches 2^24, beyond what float32 holds exactly")
    sparse = to_torch(a, device=device, dtype=torch.float32)
    out = torch.empty((n, n), dtype=torch.float64, device=device)
    step = block_cols(a.n_cols, block_bytes, itemsize=4)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[:, start:stop] = sparse @ dense_rows_t(a, start, stop, device=device, dtype=torch.float32)
    return out
