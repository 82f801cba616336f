"""The models' read path of the feature store: a memory map of the shard when rows are aligned, lazy
rows otherwise; never a gather of the whole array."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from visrec_pipeline import db
from visrec_pipeline.embeddings import store
from visrec_pipeline.embeddings.feature_rows import FeatureRows
from visrec_pipeline.recsys.row_blocks import iter_row_blocks

BACKBONE, TAG = "resnet50", "t"
PROV = {"weights_used": "test", "pooled_node": "p", "pooled_dim": None, "spatial_node": None, "preprocessing": "none"}


def _database(tmp_path, item_ids) -> str:
    path = str(tmp_path / "v.duckdb")
    with db.connect(path) as conn:
        frame = pd.DataFrame({"item_id": np.asarray(item_ids, np.int64), "status": "ok", "content_hash": "h"})
        conn.execute("CREATE TABLE item_images AS SELECT item_id, status, content_hash FROM frame")
        store.ensure_tables(conn)
    return path


def _shard(features_dir, ids: np.ndarray, dim: int, fill=None) -> str:
    """Shard files written as a store writer would, but sparse (no bytes written): a 2 GB shape costs nothing."""
    shard = store.new_shard_name()
    paths = {k: store.shard_path(features_dir, BACKBONE, TAG, shard, k) for k in store.KINDS}
    paths["ids"].parent.mkdir(parents=True, exist_ok=True)
    np.save(paths["ids"], ids)
    pooled = np.lib.format.open_memmap(paths["pooled"], mode="w+", dtype=np.float32, shape=(len(ids), dim))
    if fill is not None:
        pooled[:] = fill
    pooled.flush()
    del pooled
    return shard


def _commit(path, shard, ids, dim) -> None:
    rows = pd.DataFrame({"item_id": ids, "row": np.arange(len(ids)), "content_hash": "h"})
    with db.connect(path) as conn:
        store.commit_index(conn, BACKBONE, TAG, shard, rows, {**PROV, "pooled_dim": dim})


def _traced_peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_aligned_rows_are_the_shards_memory_map_not_a_copy(tmp_path):
    n, dim = 20_000, 25_000  # 2 GB of float32 in a sparse file
    ids = np.arange(100, 100 + n, dtype=np.int64)
    path, features = _database(tmp_path, ids), tmp_path / "features"
    shard = _shard(features, ids, dim)
    _commit(path, shard, ids, dim)
    (rows, mask), peak = _traced_peak(lambda: store.open_features(path, features, BACKBONE, ids, "pooled"))
    assert isinstance(rows, np.memmap) and rows.shape == (n, dim) and mask.all()
    assert str(rows.filename) == str(store.shard_path(features, BACKBONE, TAG, shard, "pooled").resolve())
    assert not rows.flags.writeable
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MB allocated to open a 2 GB feature array"


def test_unaligned_rows_are_read_lazily_and_match_the_gather(tmp_path):
    dim = 6
    first, second = np.arange(0, 40, 2, dtype=np.int64), np.arange(1, 41, 2, dtype=np.int64)
    path, features = _database(tmp_path, np.r_[first, second]), tmp_path / "features"
    rng = np.random.default_rng(0)
    for ids in (first, second):  # two shards, interleaved item ids
        values = rng.standard_normal((len(ids), dim)).astype(np.float32)
        _commit(path, _shard(features, ids, dim, values), ids, dim)
    wanted = np.r_[np.arange(0, 41), 999][::-1]  # 41 and 999 have no features
    lazy, mask = store.open_features(path, features, BACKBONE, wanted, "pooled")
    gathered, gmask = store.load_pooled(path, features, BACKBONE, wanted)
    assert isinstance(lazy, FeatureRows) and lazy.shape == gathered.shape
    np.testing.assert_array_equal(mask, gmask)
    assert not mask[0] and not mask[1]
    np.testing.assert_array_equal(np.asarray(lazy), gathered)
    np.testing.assert_array_equal(lazy[[5, 0, 5]], gathered[[5, 0, 5]])
    np.testing.assert_array_equal(lazy[3], gathered[3])
    np.testing.assert_array_equal(lazy[2:9], gathered[2:9])
    np.testing.assert_array_equal(lazy[np.array([4, 7]), np.array([1, 5])], gathered[[4, 7], [1, 5]])
    blocks = [b for _, b in iter_row_blocks(lazy, 10)]
    np.testing.assert_array_equal(np.concatenate(blocks), gathered)


def test_lazy_rows_of_a_large_store_allocate_only_what_is_asked(tmp_path):
    n, dim = 20_000, 25_000
    ids = np.arange(n, dtype=np.int64)
    path, features = _database(tmp_path, ids), tmp_path / "features"
    _commit(path, _shard(features, ids, dim), ids, dim)
    wanted = ids[::-1]  # reversed: not one run of rows in order
    (lazy, _), peak = _traced_peak(lambda: store.open_features(path, features, BACKBONE, wanted, "pooled"))
    assert isinstance(lazy, FeatureRows) and peak < 32 * 2**20
    block, peak = _traced_peak(lambda: lazy[:100])
    assert block.shape == (100, dim) and peak < 2 * block.nbytes + 2**20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_a_scan_of_a_memory_map_does_not_keep_its_pages(tmp_path):
    arr = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(16_384, 4096))
    arr[:] = 1.0  # 256 MB of real pages
    arr.flush()
    del arr
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    before = _rss_mb()
    total = sum(float(block[:, 0].sum()) for _, block in iter_row_blocks(mapped, 1024))
    assert total == 16_384
    assert _rss_mb() - before < 64, "the scan kept the file's pages mapped"


def test_feature_rows_reject_bad_indices():
    rows = FeatureRows(np.zeros(3, np.int32), np.arange(3), (2,), np.float32, lambda s: np.ones((3, 2), np.float32), 1)
    with pytest.raises(IndexError):
        rows[3]
    with pytest.raises(IndexError):
        rows[np.array([0.5])]
    assert rows[-1].tolist() == [1.0, 1.0] and rows.ndim == 2 and len(rows) == 3
