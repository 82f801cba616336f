"""Issue 14, case 3: a damaged feature shard file is named, refused by readers and recomputed by the
embeddings step (real JPEGs, a real DuckDB file, a real backbone with random weights)."""

from __future__ import annotations

import os

import dagster as dg
import numpy as np
import pytest
from torchvision import models

from visrec_pipeline import db
from visrec_pipeline.defs.embeddings import embedding_asset
from visrec_pipeline.defs.resources import default_resources
from visrec_pipeline.embeddings import store
from visrec_pipeline.embeddings.backbones import BackboneSpec
from visrec_pipeline.images.store import file_sha256
from visrec_pipeline.paths import Workspace

from test_embeddings_assets import ok_images  # noqa: E402  (tests/ is on sys.path: real thumbnails + item_images rows)

# a small backbone made by the product's factory; its random initialisation is cached per session
SPEC = BackboneSpec("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "avgpool", "layer4")
ASSET = embedding_asset(SPEC)
CONFIG = {"weights": "random", "device": "cpu", "precision": "fp32", "batch_size": 8, "num_workers": 0, "neighbour_queries": 1, "neighbours": 1}
ITEMS = np.arange(1, 7)


def materialize(ws: Workspace) -> dict:
    result = dg.materialize(
        [ASSET], resources=default_resources(ws), run_config={"ops": {"embeddings_resnet18": {"config": CONFIG}}}
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("embeddings_resnet18")
    return {k: v.value for k, v in mat.metadata.items()}


def shard_file(ws: Workspace, kind: str):
    (path,) = (ws.features_dir / "resnet18").rglob(f"*.{kind}.npy")
    return path


def recorded_hashes(ws: Workspace) -> dict:
    with db.connect(ws.db_path, read_only=True) as conn:
        return {k: h for k, h in conn.execute("SELECT kind, sha256 FROM embedding_shard_files").fetchall()}


@pytest.fixture()
def ws(tmp_path, one_torch_thread) -> Workspace:
    ws = Workspace.from_settings(tmp_path / "data", "demo").ensure()
    ok_images(ws, ITEMS.tolist())
    return ws


def test_truncated_and_same_size_corrupted_shards_are_named_refused_and_recomputed(ws):
    materialize(ws)
    good, _ = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", ITEMS)

    # 1. a truncated pooled file (a full disk, a killed copy): every reader names it and says how to fix it
    pooled = shard_file(ws, "pooled")
    pooled.write_bytes(pooled.read_bytes()[: pooled.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged") as refused:
        store.load_pooled(ws.db_path, ws.features_dir, "resnet18", ITEMS)
    assert str(pooled) in str(refused.value) and "re-materialize embeddings_resnet18" in str(refused.value)
    # the embeddings step itself is not broken by it: it names the file, recomputes its items and tidies it
    md = materialize(ws)
    assert md["computed"] == len(ITEMS) and md["reused"] == 0
    assert list(md["damaged_shard_files"].values()) == [str(pooled)]
    assert not pooled.exists() and shard_file(ws, "pooled") != pooled  # the damaged shard is gone, a new one serves
    again, mask = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", ITEMS)
    assert mask.all()
    np.testing.assert_allclose(again, good, rtol=1e-5, atol=1e-6)

    # 2. same size, 64 bytes changed in place: used silently before, refused by name now
    pooled, spatial = shard_file(ws, "pooled"), shard_file(ws, "spatial")
    for path in (pooled, spatial):
        with open(path, "r+b") as fh:
            fh.seek(path.stat().st_size - 200)
            fh.write(bytes(64))  # some of the last row's values become zeros
    for load, path in ((store.load_pooled, pooled), (store.load_spatial, spatial)):
        with pytest.raises(ValueError, match="SHA-256") as refused:
            load(ws.db_path, ws.features_dir, "resnet18", ITEMS)
        assert str(path) in str(refused.value) and "re-materialize embeddings_resnet18" in str(refused.value)
    md = materialize(ws)
    assert md["computed"] == len(ITEMS) and list(md["damaged_shard_files"].values()) == [str(pooled)]
    np.testing.assert_allclose(store.load_pooled(ws.db_path, ws.features_dir, "resnet18", ITEMS)[0], good, rtol=1e-5, atol=1e-6)
    assert len(list((ws.features_dir / "resnet18").rglob("*.npy"))) == 3  # one shard: ids, pooled, spatial
    assert recorded_hashes(ws) == {k: file_sha256(shard_file(ws, k)) for k in ("ids", "pooled", "spatial")}


def test_shards_indexed_before_hashes_are_hashed_once_by_the_next_run(ws):
    materialize(ws)
    # a database written before embedding_shard_files existed
    with db.connect(ws.db_path) as conn:
        conn.execute("DROP TABLE IF EXISTS embedding_shard_files")
    pooled = shard_file(ws, "pooled")
    features, mask = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", ITEMS)
    assert mask.all()  # readers keep working on its shards (their headers are checked)

    md = materialize(ws)
    assert md["computed"] == 0 and md["reused"] == len(ITEMS)  # nothing recomputed: hashed once, recorded
    assert shard_file(ws, "pooled") == pooled
    assert recorded_hashes(ws) == {k: file_sha256(shard_file(ws, k)) for k in ("ids", "pooled", "spatial")}
    with open(pooled, "r+b") as fh:
        fh.seek(pooled.stat().st_size - 200)
        fh.write(bytes(64))
    with pytest.raises(ValueError, match=f"{pooled}.*SHA-256"):
        store.load_pooled(ws.db_path, ws.features_dir, "resnet18", ITEMS)


def test_a_verified_large_shard_is_trusted_by_later_processes_until_it_changes(tmp_path, monkeypatch):
    import json

    from visrec_pipeline.embeddings import shard_files

    monkeypatch.setattr(shard_files, "STAMP_MIN_BYTES", 0)  # the threshold only: every file is "large" here
    path = tmp_path / "s.pooled.npy"
    np.save(path, np.arange(4096, dtype=np.float32).reshape(64, 64))
    digest = shard_files.digest(path)
    shard_files._verified.clear()  # a new process: nothing verified in memory
    shard_files.verify(path, "bb", digest)  # full hash, identity recorded beside the file
    stamp = json.loads((tmp_path / f"s.pooled.npy{shard_files.STAMP_SUFFIX}").read_text())
    assert stamp["sha256"] == digest.sha256

    # the stamp is what a later process trusts: one naming another hash for this identity is believed ...
    fake = shard_files.FileDigest(digest.bytes, "f" * 64)
    stamp["sha256"] = fake.sha256
    (tmp_path / f"s.pooled.npy{shard_files.STAMP_SUFFIX}").write_text(json.dumps(stamp))
    shard_files._verified.clear()
    shard_files.verify(path, "bb", fake)
    # ... until the file changes: same size, mtime set back, but its ctime moved: hashed again, refused
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    shard_files._verified.clear()
    with pytest.raises(shard_files.DamagedShardError, match="SHA-256"):
        shard_files.verify(path, "bb", digest)
