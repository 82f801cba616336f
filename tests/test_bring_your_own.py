"""Features shipped with the dataset: registered by the real embeddings asset (no images), read
memory-mapped by the models, and malformed files named with their problem."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import split_workspace
from visrec_pipeline import db
from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.defs.embeddings import EMBEDDING_ASSETS
from visrec_pipeline.defs.resources import default_resources
from visrec_pipeline.embeddings import bring_your_own, store
from visrec_pipeline.embeddings.bring_your_own import BroughtFeaturesError
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import load_trained, train_model

N_USERS, N_ITEMS, DIM, REGIONS, CHANNELS = 12, 15, 16, 4, 8
ROWS = [
    {"user_id": 100 + u, "item_id": 10 + (u * 3 + k * 2) % N_ITEMS, "timestamp": 1000 + 10 * k + u}
    for u in range(N_USERS)
    for k in range(6)
]
ASSET = next(a for a in EMBEDDING_ASSETS if a.key.path[-1] == f"embeddings_{FEATURE_BACKBONE}")


def _workspace(tmp_path) -> Workspace:
    """Interactions ingested, catalogue and split built, images synced: the dataset has no image at all."""
    return split_workspace(tmp_path, ROWS, image_items=[])


def _features(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(10, 10 + N_ITEMS, dtype=np.int64))  # file order is not item order
    pooled = rng.standard_normal((N_ITEMS, DIM)).astype(np.float16)
    spatial = rng.standard_normal((N_ITEMS, REGIONS, CHANNELS)).astype(np.float16)
    return ids, pooled, spatial


def _write_npy(ws: Workspace, ids, pooled, spatial=None) -> None:
    folder = ws.dataset_dir / "features"
    folder.mkdir(exist_ok=True)
    np.save(folder / f"{FEATURE_BACKBONE}_ids.npy", ids)
    np.save(folder / f"{FEATURE_BACKBONE}.npy", pooled)
    if spatial is not None:
        np.save(folder / f"{FEATURE_BACKBONE}_spatial.npy", spatial)


def _materialize(ws: Workspace) -> dict:
    result = dg.materialize([ASSET], resources=default_resources(ws))
    assert result.success
    return result.asset_materializations_for_node(ASSET.key.path[-1])[0].metadata


def _served(ws: Workspace, ids, kind: str):
    with db.connect(ws.db_path) as conn:
        return store.open_features(conn, ws.features_dir, FEATURE_BACKBONE, ids, kind)


def test_npy_features_are_registered_without_images_and_models_train_on_them(tmp_path, one_torch_thread):
    ws = _workspace(tmp_path)
    ids, pooled, spatial = _features()
    _write_npy(ws, ids, pooled, spatial)
    md = _materialize(ws)
    assert md["items_served"].value == N_ITEMS and md["reused"].value is False
    assert md["spatial_shape"].value.startswith(f"{REGIONS} x {CHANNELS}")
    order = np.argsort(ids)
    catalogue = ids[order]
    feats, mask = _served(ws, catalogue, "pooled")
    # every catalogue item has features: the shard itself, memory-mapped, in catalogue order
    assert isinstance(feats, np.memmap) and mask.all()
    np.testing.assert_array_equal(feats, pooled[order].astype(np.float32))
    maps, _ = _served(ws, catalogue, "spatial")
    np.testing.assert_array_equal(maps, spatial[order])
    with db.connect(ws.db_path) as conn:
        prov = store.feature_provenance(conn, FEATURE_BACKBONE)
    sha = bring_your_own.fingerprint(bring_your_own.find(ws.dataset_dir, FEATURE_BACKBONE))[1]
    assert prov["weights_used"] == "bring-your-own" and prov["pooled_dim"] == DIM
    assert sha[f"{FEATURE_BACKBONE}.npy"].sha256 in prov["preprocessing"]
    assert str(sha[f"{FEATURE_BACKBONE}.npy"].bytes) in prov["preprocessing"]

    again = _materialize(ws)  # same files: nothing copied
    assert again["reused"].value is True and again["weights_tag"].value == md["weights_tag"].value

    train_model(ws, "vbpr", {"train": {"epochs": 1, "device": "cpu"}, "dim_gamma": 4, "dim_theta": 4})
    train_model(ws, "acf", {"train": {"epochs": 1, "device": "cpu"}, "dim": 4, "attention_dim": 4, "region_pca_dim": 4})
    loaded = load_trained(ws, "acf")
    data = loaded.data
    from visrec_pipeline.recsys.evaluate import holdout_batches

    _, batch = next(iter(holdout_batches(data.holdout, 64)))
    scores = loaded.model.score(batch)
    assert scores.shape == (len(batch.user_idx), N_ITEMS) and torch.isfinite(scores).all()


def test_parquet_features_with_spatial_maps_are_registered(tmp_path):
    ws = _workspace(tmp_path)
    ids, pooled, spatial = _features(1)
    folder = ws.dataset_dir / "features"
    folder.mkdir()
    # the Parquet rows in another order than the spatial rows (which follow the ids file)
    perm = np.random.default_rng(3).permutation(N_ITEMS)
    pd.DataFrame({"item_id": ids[perm], "embedding": list(pooled[perm].astype(np.float32))}).to_parquet(
        folder / f"{FEATURE_BACKBONE}.parquet"
    )
    np.save(folder / f"{FEATURE_BACKBONE}_ids.npy", ids)
    np.save(folder / f"{FEATURE_BACKBONE}_spatial.npy", spatial)
    md = _materialize(ws)
    assert md["items_served"].value == N_ITEMS
    order = np.argsort(ids)
    feats, mask = _served(ws, ids[order], "pooled")
    np.testing.assert_array_equal(np.asarray(feats), pooled[order].astype(np.float32))
    maps, _ = _served(ws, ids[order], "spatial")
    np.testing.assert_array_equal(np.asarray(maps), spatial[order])


def _register(ws: Workspace):
    found = bring_your_own.find(ws.dataset_dir, FEATURE_BACKBONE)
    return bring_your_own.register(lambda: db.connect(ws.db_path), ws.features_dir, found)


@pytest.mark.parametrize(
    "edit, file, problem",
    [
        (lambda i, p, s: (np.r_[i[:-1], i[0]], p, s), "_ids.npy", "duplicate item ids"),
        (lambda i, p, s: (np.r_[i[:-1], 999], p, s), "_ids.npy", r"not in the catalogue.*999"),
        (lambda i, p, s: (i, p[:-1], s), ".npy", "14 rows but .*_ids.npy has 15 ids"),
        (lambda i, p, s: (i, p.astype(np.int32), s), ".npy", "float16 or float32, got int32"),
        (lambda i, p, s: (i, np.where(np.arange(N_ITEMS)[:, None] == 4, np.nan, p), s), ".npy", r"non-finite values in rows \[4\]"),
        (lambda i, p, s: (i, p, s[:, 0]), "_spatial.npy", "spatial maps must have 3 dimensions"),
        (lambda i, p, s: (i.astype(np.float64), p, s), "_ids.npy", "1-d integer array"),
    ],
)
def test_malformed_files_are_named_with_their_problem(tmp_path, edit, file, problem):
    ws = _workspace(tmp_path)
    _write_npy(ws, *edit(*_features()))
    with pytest.raises(BroughtFeaturesError, match=problem) as err:
        _register(ws)
    assert err.value.path.name == f"{FEATURE_BACKBONE}{file}"
    with db.connect(ws.db_path) as conn:
        assert store.feature_provenance(conn, FEATURE_BACKBONE) == {}  # nothing registered


def test_pickled_or_missing_files_are_clear_errors(tmp_path):
    ws = _workspace(tmp_path)
    folder = ws.dataset_dir / "features"
    folder.mkdir()
    np.save(folder / f"{FEATURE_BACKBONE}.npy", np.zeros((N_ITEMS, DIM), np.float32))
    with pytest.raises(BroughtFeaturesError, match="_ids.npy: missing"):
        _register(ws)
    np.save(folder / f"{FEATURE_BACKBONE}_ids.npy", np.array([{"a": 1}] * N_ITEMS, dtype=object), allow_pickle=True)
    with pytest.raises(BroughtFeaturesError, match="not a plain .npy array"):
        _register(ws)
    (folder / f"{FEATURE_BACKBONE}_ids.npy").unlink()
    (folder / f"{FEATURE_BACKBONE}.npy").unlink()
    pd.DataFrame({"item_id": [10, 11], "embedding": [[1.0, 2.0], [1.0]]}).to_parquet(folder / f"{FEATURE_BACKBONE}.parquet")
    with pytest.raises(BroughtFeaturesError, match="embedding lengths differ: row 1 has 1, row 0 has 2"):
        _register(ws)


def test_a_dataset_with_features_and_no_images_fetches_nothing_and_its_checks_pass(tmp_path):
    import shutil

    from visrec_pipeline.defs.images import CommonsImageSource, item_images, item_images_ok_share

    ws = split_workspace(tmp_path, ROWS, sync_images=False)
    shutil.rmtree(ws.dataset_dir / "images", ignore_errors=True)
    ids, pooled, _ = _features()
    _write_npy(ws, ids, pooled)
    # no contact set: Commons would refuse to start, so passing shows nothing tried to reach it
    resources = {**default_resources(ws), "commons": CommonsImageSource(contact="")}
    result = dg.materialize([item_images, item_images_ok_share, *EMBEDDING_ASSETS], resources=resources)
    assert result.success
    md = result.asset_materializations_for_node("item_images")[0].metadata
    assert md["source"].value == "none" and md["brought_features"].value == FEATURE_BACKBONE
    assert md["processed_this_run"].value == 0
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["item_images_ok_share"].passed
    assert "no images expected" in checks["item_images_ok_share"].description
    feats, mask = _served(ws, np.sort(ids), "pooled")
    assert feats.shape == (N_ITEMS, DIM) and bool(np.all(mask))
    for other in EMBEDDING_ASSETS:  # a backbone the folder ships nothing for: an empty materialization
        assert result.asset_materializations_for_node(other.key.path[-1])


def test_unchanged_brought_files_are_not_hashed_again_and_changed_ones_are(tmp_path):
    import json
    import os

    ws = _workspace(tmp_path)
    ids, pooled, _ = _features()
    _write_npy(ws, ids, pooled)
    md = _materialize(ws)
    cache_file = ws.features_dir / bring_your_own.DIGEST_CACHE
    cache = json.loads(cache_file.read_text())
    pooled_file = (ws.dataset_dir / "features" / f"{FEATURE_BACKBONE}.npy").resolve()
    real = cache[str(pooled_file)]["sha256"]
    # a recorded digest is trusted while size, mtime and inode match: plant a marker to see it used
    cache[str(pooled_file)]["sha256"] = "0" * 64
    cache_file.write_text(json.dumps(cache))
    found = bring_your_own.find(ws.dataset_dir, FEATURE_BACKBONE)
    assert bring_your_own.fingerprint(found, cache_file)[1][pooled_file.name].sha256 == "0" * 64
    # the file written again (new mtime): hashed again, the cache corrected
    st = pooled_file.stat()
    os.utime(pooled_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert bring_your_own.fingerprint(found, cache_file)[1][pooled_file.name].sha256 == real
    assert json.loads(cache_file.read_text())[str(pooled_file)]["sha256"] == real
    cache_file.write_text("{not json")  # a damaged cache: everything hashed, nothing lost
    again = _materialize(ws)
    assert again["reused"].value is True and again["weights_tag"].value == md["weights_tag"].value


def test_a_model_that_trains_on_pixels_stops_at_once_when_no_item_has_an_image(tmp_path):
    from visrec_pipeline.model_io import NoImagesError

    ws = _workspace(tmp_path)
    ids, pooled, _ = _features()
    _write_npy(ws, ids, pooled)
    _materialize(ws)
    with pytest.raises(NoImagesError, match=f"none of the {N_ITEMS} items has an ok image"):
        train_model(ws, "dvbpr", {"preset": "cpu"})
