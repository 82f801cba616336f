"""Feature extraction on a private Ray cluster (visrec_pipeline.distributed.embeddings) against the
local path, on real thumbnails synced into a real workspace, and the embeddings asset on Ray."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import models

from conftest import split_workspace
from visrec_pipeline import db
from visrec_pipeline.defs.embeddings import embedding_asset
from visrec_pipeline.defs.resources import ComputeResource, default_resources
from visrec_pipeline.distributed.cluster import ComputeSettings
from visrec_pipeline.distributed.embeddings import (
    WeightsSource,
    _ShardExtractor,
    extract_on_ray,
    state_fingerprint,
    weights_source,
)
from visrec_pipeline.embeddings import store, update
from visrec_pipeline.embeddings.backbones import BackboneSpec
from visrec_pipeline.embeddings.extract import load_backbone
from visrec_pipeline.embeddings.shard_files import FileDigest
from visrec_pipeline.paths import Workspace

# the smallest backbone the tests use (see tests/test_embeddings.py)
RESNET18 = BackboneSpec("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "avgpool", "layer4")
ASSET = embedding_asset(RESNET18)
OPTIONS = {"device": "cpu", "precision": "fp32", "batch_size": 4}
ROWS = [{"user_id": 100 + u, "item_id": 10 + (u * 3 + k) % 9, "timestamp": 1000 + 10 * k + u} for u in range(6) for k in range(4)]
BROKEN_ITEM = 13


def _workspace(root: Path) -> Workspace:
    """Nine items with synced thumbnails; item 13's stored file is then truncated (an ok row, unreadable bytes)."""
    ws = split_workspace(root, ROWS)
    with db.connect(ws.db_path) as conn:
        (rel,) = conn.execute("SELECT path FROM item_images WHERE item_id = ?", [BROKEN_ITEM]).fetchone()
    (ws.root / rel).write_bytes((ws.root / rel).read_bytes()[:40])
    return ws


def _features(features_dir: Path, tag: str, rows: pd.DataFrame, kind: str) -> dict[int, np.ndarray]:
    """item id -> its row of ``kind`` read straight from the shard files of an extraction."""
    out = {}
    for shard, group in rows.groupby("shard"):
        arr = np.load(store.shard_path(features_dir, "resnet18", tag, shard, kind), allow_pickle=False)
        ids = np.load(store.shard_path(features_dir, "resnet18", tag, shard, "ids"), allow_pickle=False)
        for item_id, row in zip(group["item_id"], group["row"]):
            assert ids[row] == item_id
            out[int(item_id)] = arr[row].astype(np.float32).reshape(-1)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_ray_extraction_equals_local_reports_failures_and_commits_every_item_once(ray_cluster, tmp_path):
    ws = _workspace(tmp_path)
    backbone = load_backbone(RESNET18, "random", init_cache_dir=ws.init_cache_dir)
    plan = update.plan(lambda: db.connect(ws.db_path), ws.features_dir, backbone)
    assert len(plan.todo) == 9
    local = update.extract(backbone, plan, ws.root, tmp_path / "local_features", num_workers=0, **OPTIONS)

    seen = []
    settings = ComputeSettings(engine="ray", address=ray_cluster, workers=2)
    fresh = load_backbone(RESNET18, "random", init_cache_dir=ws.init_cache_dir)  # as loaded: its weights are fingerprinted
    with pytest.raises(ValueError, match="already ran"):
        extract_on_ray(backbone, plan, ws.root, ws.features_dir, settings, init_cache_dir=ws.init_cache_dir, **OPTIONS)
    on_ray = extract_on_ray(
        fresh, plan, ws.root, ws.features_dir, settings, init_cache_dir=ws.init_cache_dir,
        progress=lambda done, total, rate: seen.append((done, total)), progress_every_s=0.2, **OPTIONS,
    )
    ray_x = on_ray.extraction
    # one batch and one shard per worker, each written by its own actor
    assert on_ray.workers == on_ray.actors_used == 2 and on_ray.shards == 2 and len(ray_x.shards) == 2
    assert seen[-1] == (9, 9) and all(d <= t for d, t in seen)

    # the broken image is reported, by item, as the local path reports it
    assert [i for i, _ in ray_x.failures] == [i for i, _ in local.failures] == [BROKEN_ITEM]
    assert ray_x.stats.n_ok == local.stats.n_ok == 8
    tag = backbone.weights.tag
    for kind in ("pooled", "spatial"):
        mine = _features(ws.features_dir, tag, ray_x.rows, kind)
        ref = _features(tmp_path / "local_features", tag, local.rows, kind)
        assert sorted(mine) == sorted(ref) and BROKEN_ITEM not in mine
        assert min(_cosine(mine[i], ref[i]) for i in ref) > 0.9999

    committed = update.commit(
        lambda: db.connect(ws.db_path), ws.features_dir, backbone, plan, ray_x, update.provenance(backbone), max_shards=20
    )
    with db.connect(ws.db_path) as conn:
        index = conn.execute('SELECT item_id, shard, "row" FROM embedding_index WHERE backbone = ?', ["resnet18"]).df()
        recorded = {s for s, _ in conn.execute("SELECT DISTINCT shard, kind FROM embedding_shard_files").fetchall()}
    good = sorted(set(plan.todo["item_id"]) - {BROKEN_ITEM})
    assert sorted(index["item_id"]) == good  # every good item exactly once, the broken one not at all
    assert set(index["shard"]) == set(ray_x.shards) == recorded and committed.n_shards == 2
    pooled, mask = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", good)  # digests verified on read
    assert mask.all()
    ref = _features(tmp_path / "local_features", tag, local.rows, "pooled")
    assert min(_cosine(pooled[k], ref[i]) for k, i in enumerate(good)) > 0.9999


def test_commit_of_several_shards_refuses_rows_of_a_shard_not_written(tmp_path):
    with db.connect(tmp_path / "x.duckdb") as conn:
        rows = pd.DataFrame({"item_id": [1, 2], "shard": ["a", "b"], "row": [0, 0], "content_hash": ["h1", "h2"]})
        prov = {"weights_used": "x", "pooled_node": "p", "pooled_dim": 2, "preprocessing": "none"}
        digest = {"pooled": FileDigest(1, "0" * 64)}
        with pytest.raises(ValueError, match="not written"):
            store.commit_index(conn, "toy", "t", None, rows, prov, shards={"a": digest})
        with pytest.raises(ValueError, match="not both"):
            store.commit_index(conn, "toy", "t", "a", rows, prov, digests=digest, shards={"a": digest, "b": digest})


def test_an_actor_with_other_weights_than_the_driver_refuses_to_run(tmp_path):
    backbone = load_backbone(RESNET18, "random", seed=0, init_cache_dir=tmp_path)
    source = weights_source(backbone, tmp_path)
    assert source.file is not None and source.fingerprint == state_fingerprint(backbone.model)
    other = load_backbone(RESNET18, "random", seed=1, init_cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="not the driver's"):
        _ShardExtractor(
            RESNET18, WeightsSource(source.file, 0, state_fingerprint(other.model)), str(tmp_path), "t", "", 1, {}, None
        )


def _materialize(ws: Workspace, compute: ComputeResource) -> dict:
    result = dg.materialize(
        [ASSET],
        resources={**default_resources(ws), "compute": compute},
        run_config={"ops": {ASSET.key.path[-1]: {"config": {**OPTIONS, "weights": "random", "num_workers": 0, "neighbour_queries": 0}}}},
    )
    assert result.success
    return result.asset_materializations_for_node(ASSET.key.path[-1])[0].metadata


def test_the_embeddings_asset_on_ray_gives_the_local_features(ray_cluster, tmp_path):
    local_ws, ray_ws = _workspace(tmp_path / "local"), _workspace(tmp_path / "ray")
    local_md = _materialize(local_ws, ComputeResource(engine="local"))
    ray_md = _materialize(ray_ws, ComputeResource(engine="ray", address=ray_cluster))
    assert local_md["engine"].value == "local" and ray_md["engine"].value == "ray"
    assert ray_md["ray_workers"].value == 2 and ray_md["images_per_s"].value > 0
    assert ray_md["computed"].value == local_md["computed"].value == 8
    assert ray_md["failed_to_read"].value == 1 and str(BROKEN_ITEM) in ray_md["read_failures"].value
    ids = np.arange(10, 19)
    want, want_mask = store.load_pooled(local_ws.db_path, local_ws.features_dir, "resnet18", ids)
    got, got_mask = store.load_pooled(ray_ws.db_path, ray_ws.features_dir, "resnet18", ids)
    assert got_mask.tolist() == want_mask.tolist() == [i != BROKEN_ITEM for i in ids]
    cos = (got * want).sum(1)[want_mask] / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))[want_mask]
    assert cos.min() > 0.9999


def test_workers_that_load_other_weights_than_the_driver_fail_the_run_and_leave_no_shard(ray_cluster, tmp_path):
    ws = _workspace(tmp_path)
    weights = tmp_path / "weights.pt"
    torch.save(load_backbone(RESNET18, "random", seed=0).model.state_dict(), weights)
    backbone = load_backbone(RESNET18, str(weights))
    plan = update.plan(lambda: db.connect(ws.db_path), ws.features_dir, backbone)
    # the file changes after the step loaded it (or a node reads another file at that path)
    torch.save(load_backbone(RESNET18, "random", seed=1).model.state_dict(), weights)
    settings = ComputeSettings(engine="ray", address=ray_cluster, workers=2)
    with pytest.raises(Exception, match="not the driver's"):
        extract_on_ray(backbone, plan, ws.root, ws.features_dir, settings, wait_for_actors_s=120, **OPTIONS)
    assert not list(ws.features_dir.rglob("*.npy"))
