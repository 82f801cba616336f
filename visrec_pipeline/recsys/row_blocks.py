"""Reading a large ``[n, ...]`` input (an in-RAM array, an ``np.memmap`` or a lazy accessor with
``iter_blocks``) block by block, without keeping what was read resident.

A memory map's pages stay in the process (and count in its resident memory) once read, until
unmapped: a scan over a 20 GB spatial-map file would hold 20 GB. :func:`iter_row_blocks` copies
each block out and tells the kernel the process no longer needs the block's pages
(``MADV_DONTNEED``: the file's page cache keeps them, the next read faults them back in).
"""

from __future__ import annotations

import mmap
from typing import Iterator

import numpy as np

_PAGE = mmap.PAGESIZE


def iter_row_blocks(array, block: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, array[start:start + block])`` over the leading axis, each block an in-RAM array."""
    block = max(1, int(block))
    if hasattr(array, "iter_blocks"):
        yield from array.iter_blocks(block)
        return
    n = len(array)
    for start in range(0, n, block):
        rows = np.array(array[start : start + block])
        release_pages(array, start, start + len(rows))
        yield start, rows


def release_pages(array, start: int, stop: int) -> None:
    """Drop the process's mapping of rows ``[start, stop)`` of a memory-mapped ``array`` (no-op for
    anything else); reading them again maps them back from the page cache."""
    mm = getattr(array, "_mmap", None)
    if not isinstance(array, np.memmap) or mm is None or not array.flags.c_contiguous or stop <= start:
        return
    row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    base = np.frombuffer(mm, dtype=np.uint8)  # where the map starts (a view: released below)
    try:
        first = array.ctypes.data - base.ctypes.data + start * row_bytes
        lo = first - first % _PAGE
        hi = min(first + (stop - start) * row_bytes, len(mm))
        hi = -(-hi // _PAGE) * _PAGE
        mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, -(-len(mm) // _PAGE) * _PAGE) - lo)
    except (ValueError, OSError):
        pass  # an advice the kernel refuses changes nothing but memory use
    finally:
        del base
