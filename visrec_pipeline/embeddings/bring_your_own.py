"""Features shipped with the dataset ("bring your own"): validated, then registered in the feature store.

A dataset folder may hold, for a backbone named as in ``FEATURE_BACKBONE`` (e.g. ``resnet50``):

- ``features/<backbone>.npy``: float16 or float32 ``[n, d]`` pooled features, and
  ``features/<backbone>_ids.npy``: int64 ``[n]`` item ids (row ``i`` is item ``ids[i]``); or
- ``features/<backbone>.parquet``: column ``item_id`` (integer) and column ``embedding`` (a list or
  fixed-size list of floats, the same length on every row);
- optionally ``features/<backbone>_spatial.npy``: float16/float32 ``[n, regions, channels]`` spatial
  maps, rows aligned with ``features/<backbone>_ids.npy``.

Every file is checked (shape, dtype, finite values, ids unique and in ``item_catalog``); a problem is a
:class:`BroughtFeaturesError` naming the file. The rows are then copied block by block (never all in
memory) into one new shard of the store, in item-id order, so a catalogue whose every item has
features reads them as one memory map. The weights tag is ``byo-<hash>`` over the files' SHA-256;
the index rows' content hash ``byo:<hash>`` marks them as served without an image.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pandas as pd

from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.embeddings import shard_files, store

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
WEIGHTS_USED = "bring-your-own"
CONTENT_PREFIX = "byo:"
_BLOCK = 2048  # rows per block of a pass over the files


class BroughtFeaturesError(ValueError):
    """A precomputed feature file is malformed; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"precomputed features {path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class BroughtFiles:
    """The feature files of one backbone found in a dataset folder."""

    backbone: str
    pooled: Path  # .npy or .parquet
    ids: Path | None  # <backbone>_ids.npy (required for .npy pooled and for spatial)
    spatial: Path | None

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.pooled, self.ids, self.spatial) if p is not None]


def find(dataset_dir: Path, backbone: str) -> BroughtFiles | None:
    """The precomputed ``backbone`` features of ``dataset_dir``, or None when it ships none."""
    folder = Path(dataset_dir) / "features"
    npy, parquet = folder / f"{backbone}.npy", folder / f"{backbone}.parquet"
    ids, spatial = folder / f"{backbone}_ids.npy", folder / f"{backbone}_spatial.npy"
    if npy.is_file() and parquet.is_file():
        raise BroughtFeaturesError(npy, f"both {npy.name} and {parquet.name} exist: keep one")
    pooled = npy if npy.is_file() else parquet if parquet.is_file() else None
    if pooled is None:
        if spatial.is_file():
            raise BroughtFeaturesError(spatial, f"spatial maps without pooled features ({npy.name} or {parquet.name})")
        return None
    if (pooled is npy or spatial.is_file()) and not ids.is_file():
        raise BroughtFeaturesError(ids, "missing: the item ids of the rows (int64 [n]) are required")
    return BroughtFiles(backbone, pooled, ids if ids.is_file() else None, spatial if spatial.is_file() else None)


# The brought files' digests, by path, size, mtime and inode: a re-run does not hash gigabytes of unchanged
# files again (any write to a file changes its mtime, a replaced file its inode too).
DIGEST_CACHE = "brought_digests.json"


def _digest(path: Path, cache: dict) -> shard_files.FileDigest:
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return shard_files.FileDigest(st.st_size, hit["sha256"])
    d = shard_files.digest(path)
    cache[key] = {"stamp": stamp, "sha256": d.sha256}
    return d


def fingerprint(
    found: BroughtFiles, cache_file: Path | None = None
) -> tuple[str, dict[str, shard_files.FileDigest]]:
    """(SHA-256 over the files' names, sizes and hashes; name -> digest of each file). With ``cache_file``,
    a file whose size, mtime and inode are those recorded there is not hashed again."""
    cache: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):  # unreadable: hash everything, rewrite it
            cache = {}
        cache = cache if isinstance(cache, dict) else {}
    digests = {p.name: _digest(p, cache) for p in found.files}
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(cache, indent=1))
    h = hashlib.sha256()
    for name, d in sorted(digests.items()):
        h.update(f"{name}:{d.bytes}:{d.sha256}\n".encode())
    return h.hexdigest(), digests


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays (pickles) and malformed headers
        raise BroughtFeaturesError(path, f"not a plain .npy array ({exc})") from None


def _float_rows(path: Path, arr: np.ndarray, ndim: int, what: str) -> None:
    if arr.ndim != ndim:
        raise BroughtFeaturesError(path, f"{what} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype not in (np.float16, np.float32):
        raise BroughtFeaturesError(path, f"{what} must be float16 or float32, got {arr.dtype}")
    if arr.shape[0] == 0 or any(s == 0 for s in arr.shape[1:]):
        raise BroughtFeaturesError(path, f"{what} is empty (shape {arr.shape})")


def _check_finite(path: Path, start: int, block: np.ndarray, ids: np.ndarray) -> None:
    finite = np.isfinite(block.reshape(len(block), -1)).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5]
        raise BroughtFeaturesError(
            path, f"non-finite values in rows {(bad + start).tolist()} (item ids {ids[bad].tolist()}; first 5)"
        )


def _check_ids(path: Path, ids: np.ndarray, catalogue: np.ndarray) -> None:
    if ids.size == 0:
        raise BroughtFeaturesError(path, "no rows")
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        raise BroughtFeaturesError(path, f"duplicate item ids, e.g. {uniq[counts > 1][:5].tolist()}")
    unknown = uniq[~np.isin(uniq, catalogue)]
    if unknown.size:
        raise BroughtFeaturesError(
            path, f"{unknown.size} item id(s) not in the catalogue (item_catalog), e.g. {unknown[:5].tolist()}"
        )


def _read_ids(path: Path) -> np.ndarray:
    ids = _load_npy(path)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise BroughtFeaturesError(path, f"item ids must be a 1-d integer array (int64), got {ids.dtype} {ids.shape}")
    return np.asarray(ids, dtype=np.int64)


@dataclass
class _Source:
    """Validated files: ``blocks()`` yields ``(item_ids, pooled, spatial or None)`` over all rows."""

    found: BroughtFiles
    ids: np.ndarray  # int64 [n], in file order
    n: int
    dim: int
    spatial_shape: tuple[int, int] | None
    blocks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]]


def _npy_source(found: BroughtFiles, catalogue: np.ndarray) -> _Source:
    ids = _read_ids(found.ids)
    pooled = _load_npy(found.pooled)
    _float_rows(found.pooled, pooled, 2, "pooled features")
    if pooled.shape[0] != ids.size:
        raise BroughtFeaturesError(found.pooled, f"{pooled.shape[0]} rows but {found.ids.name} has {ids.size} ids")
    _check_ids(found.ids, ids, catalogue)
    spatial = _spatial(found, ids.size)

    def blocks():
        for s in range(0, ids.size, _BLOCK):
            e = min(ids.size, s + _BLOCK)
            yield ids[s:e], np.asarray(pooled[s:e]), None if spatial is None else np.asarray(spatial[s:e])

    return _Source(found, ids, ids.size, int(pooled.shape[1]), None if spatial is None else spatial.shape[1:], blocks)


def _spatial(found: BroughtFiles, n: int) -> np.ndarray | None:
    if found.spatial is None:
        return None
    spatial = _load_npy(found.spatial)
    _float_rows(found.spatial, spatial, 3, "spatial maps")
    if spatial.shape[0] != n:
        raise BroughtFeaturesError(found.spatial, f"{spatial.shape[0]} rows but {found.ids.name} has {n} ids")
    return spatial


def _parquet_source(found: BroughtFiles, catalogue: np.ndarray) -> _Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = found.pooled
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BroughtFeaturesError(path, f"not a readable Parquet file ({exc})") from None
    names = set(pf.schema_arrow.names)
    if not {"item_id", "embedding"} <= names:
        raise BroughtFeaturesError(path, f"needs columns item_id and embedding, has {sorted(names)}")
    id_type, emb_type = pf.schema_arrow.field("item_id").type, pf.schema_arrow.field("embedding").type
    if not pa.types.is_integer(id_type):
        raise BroughtFeaturesError(path, f"column item_id must be integers, is {id_type}")
    if not (pa.types.is_list(emb_type) or pa.types.is_large_list(emb_type) or pa.types.is_fixed_size_list(emb_type)):
        raise BroughtFeaturesError(path, f"column embedding must be a list of floats, is {emb_type}")
    if not pa.types.is_floating(emb_type.value_type):
        raise BroughtFeaturesError(path, f"column embedding must hold floats, holds {emb_type.value_type}")
    ids = pf.read(columns=["item_id"]).column("item_id").to_numpy().astype(np.int64)
    _check_ids(path, ids, catalogue)

    def batches():
        start = 0
        for batch in pf.iter_batches(batch_size=_BLOCK, columns=["item_id", "embedding"]):
            col = batch.column("embedding")
            if col.null_count:
                raise BroughtFeaturesError(path, f"empty (null) embedding in rows from {start}")
            lengths = pa.compute.list_value_length(col).to_numpy(zero_copy_only=False)
            yield start, batch.column("item_id").to_numpy().astype(np.int64), col, lengths
            start += len(batch)

    first_len = None
    for start, _, _, lengths in batches():  # dimension check first: the copy pass may then trust it
        if lengths.size and first_len is None:
            first_len = int(lengths[0])
        bad = np.flatnonzero(lengths != first_len)
        if bad.size:
            raise BroughtFeaturesError(
                path, f"embedding lengths differ: row {start + bad[0]} has {lengths[bad[0]]}, row 0 has {first_len}"
            )
    if not first_len:
        raise BroughtFeaturesError(path, "embeddings are empty")
    spatial = None
    if found.spatial is not None:
        spatial_ids = _read_ids(found.ids)
        _check_ids(found.ids, spatial_ids, catalogue)
        if not np.array_equal(np.sort(spatial_ids), np.sort(ids)):
            raise BroughtFeaturesError(found.ids, f"its ids (the spatial rows) are not the item ids of {path.name}")
        spatial = _spatial(found, spatial_ids.size)
        spatial_row = np.argsort(spatial_ids)  # rank of an item id -> its row in the spatial file
        sorted_ids = np.sort(ids)

    def blocks():
        for _, block_ids, col, _ in batches():
            flat = pa.compute.list_flatten(col).to_numpy(zero_copy_only=False)
            pooled = np.asarray(flat, dtype=np.float32).reshape(len(block_ids), first_len)
            sp = None
            if spatial is not None:
                rows = spatial_row[np.searchsorted(sorted_ids, block_ids)]
                order = np.argsort(rows, kind="stable")
                sp = np.empty((len(rows), *spatial.shape[1:]), spatial.dtype)
                sp[order] = spatial[rows[order]]
            yield block_ids, pooled, sp

    return _Source(found, ids, ids.size, first_len, None if spatial is None else spatial.shape[1:], blocks)


def open_source(found: BroughtFiles, catalogue: np.ndarray) -> _Source:
    """Validate ``found``'s headers, ids and dimensions against the ``catalogue`` item ids (values are
    checked while copying, see :func:`write_shard`)."""
    catalogue = np.asarray(catalogue, np.int64)
    return _npy_source(found, catalogue) if found.pooled.suffix == ".npy" else _parquet_source(found, catalogue)


def write_shard(source: _Source, features_dir: Path, weights_tag: str) -> store.ShardWriter:
    """Copy ``source`` block by block into a new shard (rows in item-id order); raises on a non-finite value."""
    found = source.found
    all_ids = np.sort(source.ids)
    with store.ShardWriter(features_dir, found.backbone, weights_tag, all_ids) as writer:
        start = 0
        for ids, pooled, spatial in source.blocks():
            _check_finite(found.pooled, start, pooled, ids)
            if spatial is not None:
                _check_finite(found.spatial, start, spatial, ids)
            writer.write(np.searchsorted(all_ids, ids), pooled, spatial)
            start += len(ids)
    return writer


@dataclass(frozen=True)
class Registered:
    weights_tag: str
    items: int
    dim: int
    spatial_shape: tuple[int, int] | None
    reused: bool  # the same files were registered before: nothing copied
    shard: str | None
    files: dict[str, shard_files.FileDigest]
    files_removed: int


def provenance(found: BroughtFiles, source: _Source, digests: dict[str, shard_files.FileDigest]) -> dict:
    files = "; ".join(f"{name} {d.bytes} bytes sha256 {d.sha256}" for name, d in sorted(digests.items()))
    regions, channels = source.spatial_shape or (None, None)
    return {
        "weights_used": WEIGHTS_USED,
        "weights_warning": None,
        "pooled_node": f"{WEIGHTS_USED}: {found.pooled.name}",
        "pooled_dim": source.dim,
        "spatial_node": f"{WEIGHTS_USED}: {found.spatial.name}" if found.spatial else None,
        "spatial_regions": None if regions is None else int(regions),
        "spatial_channels": None if channels is None else int(channels),
        "preprocessing": f"precomputed features from the dataset folder: {files}",
    }


def register(connect: Connect, features_dir: Path, found: BroughtFiles, revision: int = 0) -> Registered:
    """Validate ``found`` and make it the served features of its backbone (nothing is copied when the
    same files are registered already). Files are hashed and copied with no connection held."""
    backbone = found.backbone
    combined, digests = fingerprint(found, Path(features_dir) / DIGEST_CACHE)
    tag = f"byo-{combined[:16]}"
    with connect() as conn:
        store.ensure_tables(conn)
        catalogue = conn.execute("SELECT item_id FROM item_catalog ORDER BY item_id").fetchnumpy()["item_id"]
        before = store.referenced_shards(conn, backbone)
        current = store.index_weights(conn, backbone)
        missing = store.missing_shards(conn, features_dir, backbone)
    source = open_source(found, catalogue)
    if current is not None and current[0] == tag and current[1] == source.n and not missing and len(before) == 1:
        return Registered(tag, source.n, source.dim, source.spatial_shape, True, None, digests, 0)
    writer = write_shard(source, features_dir, tag)
    rows = pd.DataFrame(
        {"item_id": writer.item_ids, "row": np.arange(len(writer.item_ids)), "content_hash": CONTENT_PREFIX + combined}
    )
    with connect() as conn:
        store.commit_index(
            conn, backbone, tag, writer.shard, rows, provenance(found, source, digests), revision, digests=writer.digests
        )
        # every older row was replaced (same items) or pruned (other weights): their shards go now
        superseded = before - store.referenced_shards(conn, backbone)
        removed = store.remove_unreferenced(conn, features_dir, backbone, superseded)
    return Registered(tag, source.n, source.dim, source.spatial_shape, False, writer.shard, digests, removed)
