"""The embeddings assets and visual_clusters under dagster.materialize, on real JPEGs and a real DuckDB file."""

from __future__ import annotations

import base64
import hashlib
import io

import dagster as dg
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from visrec_pipeline import db
from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.defs.embeddings import defs as embeddings_defs, embedding_asset, embedding_coverage_check, visual_clusters
from visrec_pipeline.defs.resources import default_resources
from visrec_pipeline.embeddings import int8, store
from visrec_pipeline.embeddings.backbones import BACKBONES, BackboneSpec
from visrec_pipeline.paths import Workspace

# A small backbone built by the same factory (what adding ResNet-18 to the registry gives).
RESNET18 = BackboneSpec("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "avgpool", "layer4")
EMB18 = embedding_asset(RESNET18)
CHECK18 = embedding_coverage_check(EMB18, RESNET18)
FAST = {"weights": "random", "device": "cpu", "batch_size": 4, "num_workers": 0, "neighbour_queries": 2, "neighbours": 2}


def write_thumbnail(ws: Workspace, seed: int, size: int = 40) -> tuple[str, str]:
    """A real JPEG stored content-addressed like item_images does; returns (hash, path relative to root)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((5, 5, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    h = hashlib.sha256(data).hexdigest()
    path = ws.image_store / h[:2] / f"{h}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return h, str(path.relative_to(ws.root))


def set_images(ws: Workspace, rows: list[tuple[int, str, str | None, str | None]]) -> None:
    """Upsert item_images rows (item_id, status, content_hash, path) as the item_images asset would."""
    with db.connect(ws.db_path) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS item_images (item_id BIGINT PRIMARY KEY, status VARCHAR, reason VARCHAR, "
            "content_hash VARCHAR, path VARCHAR, orig_width INTEGER, orig_height INTEGER, source VARCHAR, "
            "updated_at TIMESTAMP)"
        )
        for item_id, status, h, path in rows:
            conn.execute(
                "INSERT OR REPLACE INTO item_images VALUES (?, ?, ?, ?, ?, 40, 40, 'test', now()::TIMESTAMP)",
                [item_id, status, None if status == "ok" else f"{status} in test", h, path],
            )


def ok_images(ws: Workspace, ids) -> None:
    set_images(ws, [(i, "ok", *write_thumbnail(ws, i)) for i in ids])


def materialize(ws: Workspace, asset, **config) -> dg.MaterializeResult:
    result = dg.materialize(
        [asset],
        resources=default_resources(ws),
        run_config={"ops": {asset.key.path[-1]: {"config": {**FAST, **config}}}},
    )
    assert result.success
    return result.asset_materializations_for_node(asset.key.path[-1])[0].metadata


def value(md, key):
    return md[key].value


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    return Workspace.from_settings(tmp_path / "data", "demo").ensure()


def test_incremental_materializations(ws):
    ok_images(ws, range(1, 7))
    set_images(ws, [(7, "corrupt", None, None), (8, "missing", None, None)])
    md = materialize(ws, EMB18)
    assert value(md, "computed") == 6 and value(md, "reused") == 0 and value(md, "skipped_not_ok") == 2
    assert value(md, "pooled_dim") == 512 and value(md, "weights_tag") == "random:seed=0"
    assert "corrupt" in md["image_status"].value
    png = base64.b64decode(md["similar_images"].value.split("base64,", 1)[1].rstrip(")"))
    assert Image.open(io.BytesIO(png)).size[0] > 100  # 2 queries x (query + 2 neighbours)
    f1, m1 = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.arange(1, 9))
    assert m1.tolist() == [True] * 6 + [False, False] and f1.shape == (8, 512) and not f1[6:].any()

    # nothing new: nothing computed, features unchanged
    md = materialize(ws, EMB18)
    assert value(md, "computed") == 0 and value(md, "reused") == 6
    np.testing.assert_array_equal(store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.arange(1, 9))[0], f1)

    # three new items: exactly three rows computed
    ok_images(ws, [10, 11, 12])
    md = materialize(ws, EMB18)
    assert value(md, "computed") == 3 and value(md, "reused") == 6 and value(md, "items_served") == 9

    # a changed image (new content hash), a removed item, an item no longer ok, an unreadable "ok" file
    h, path = write_thumbnail(ws, 1001)
    (ws.root / "images" / "bad.jpg").write_bytes(b"truncated")
    set_images(ws, [(2, "ok", h, path), (3, "http_error", None, None), (13, "ok", "feed", "images/bad.jpg")])
    with db.connect(ws.db_path) as conn:
        conn.execute("DELETE FROM item_images WHERE item_id = 4")
    # (this run makes a third shard; with max_shards=2 the store compacts them into one)
    md = materialize(ws, EMB18, max_shards=2)
    assert value(md, "computed") == 1 and value(md, "failed_to_read") == 1 and "13" in md["read_failures"].value
    assert value(md, "index_rows_dropped") == 2  # items 3 and 4
    f2, m2 = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.array([1, 2, 3, 4, 13, 5, 10]))
    assert m2.tolist() == [True, True, False, False, False, True, True]
    np.testing.assert_array_equal(f2[0], f1[0])
    np.testing.assert_array_equal(f2[5], f1[4])
    assert not np.allclose(f2[1], f1[1])
    assert value(md, "shards") == 1 and value(md, "compacted_into") != "no compaction"
    assert len(list((ws.features_dir / "resnet18").rglob("*.npy"))) == 3  # ids, pooled, spatial of one shard

    # the coverage check sees the unreadable item (8 ok images, 7 served)
    run = dg.materialize([EMB18, CHECK18], resources=default_resources(ws), selection=dg.AssetSelection.checks(CHECK18))
    check = run.get_asset_check_evaluations()[0]
    assert not check.passed and check.metadata["ok_images"].value == 8 and check.metadata["served"].value == 7

    # other weights: everything readable recomputed, old shards deleted
    md = materialize(ws, EMB18, seed=1)
    assert value(md, "computed") == 7 and value(md, "weights_tag") == "random:seed=1"
    assert [p.name for p in (ws.features_dir / "resnet18").iterdir()] == ["random_seed-1"]
    with db.connect(ws.db_path) as conn:
        assert store.feature_provenance(conn, "resnet18")["weights_tag"] == "random:seed=1"
        n_rows = conn.execute("SELECT count(*), count(DISTINCT item_id) FROM embedding_index").fetchone()
    assert n_rows == (7, 7)


@pytest.mark.skipif(int8.unavailable_reason() is not None, reason="no int8 here")
def test_int8_materializations_calibrate_once_and_store_the_calibration_with_the_features(ws):
    ok_images(ws, range(1, 7))
    md = materialize(ws, EMB18, precision="int8")
    assert value(md, "precision") == "int8" and value(md, "graph") == "int8+onednn" and value(md, "computed") == 6
    calibration = store.calibration_path(ws.features_dir, "resnet18", "random:seed=0", RESNET18.revision)
    assert "first 6 images of this run" in value(md, "int8_calibration") and calibration.exists()
    first = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.arange(1, 7))[0]

    # new images, a later run: the stored calibration, the same quantized model
    ok_images(ws, [7, 8])
    md = materialize(ws, EMB18, precision="int8")
    assert value(md, "computed") == 2 and value(md, "int8_calibration").startswith("6 stored images")
    np.testing.assert_array_equal(store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.arange(1, 7))[0], first)
    assert calibration.exists()  # shard tidying leaves it while its feature set lives


def test_resnet50_features_spatial_maps_and_visual_clusters(ws):
    ok_images(ws, range(1, 7))
    emb = next(a for a in embeddings_defs.assets if a.key == dg.AssetKey(f"embeddings_{FEATURE_BACKBONE}"))
    result = dg.materialize(
        [emb, visual_clusters],
        resources=default_resources(ws),
        run_config={
            "ops": {
                "embeddings_resnet50": {"config": {**FAST, "num_workers": 2, "batch_size": 3}},
                "visual_clusters": {"config": {"k": 3, "seed": 0, "device": "cpu"}},
            }
        },
    )
    assert result.success
    md = result.asset_materializations_for_node("embeddings_resnet50")[0].metadata
    assert value(md, "computed") == 6 and value(md, "num_workers") == 2
    assert value(md, "pooled_dim") == 2048 and value(md, "spatial_shape").startswith("49 x 2048")
    ids = np.arange(1, 8)
    spatial, mask = store.load_spatial(ws.db_path, ws.features_dir, "resnet50", ids)
    assert spatial.dtype == np.float16 and spatial.shape == (7, 49, 2048) and mask.tolist() == [True] * 6 + [False]
    pooled, _ = store.load_pooled(ws.db_path, ws.features_dir, "resnet50", ids)
    np.testing.assert_allclose(spatial[:6].astype(np.float32).mean(1), pooled[:6], rtol=5e-3, atol=5e-3)
    assert store.feature_dim(ws.db_path, "resnet50") == 2048

    cmd = result.asset_materializations_for_node("visual_clusters")[0].metadata
    assert value(cmd, "items") == 6 and value(cmd, "k") == 3 and "cluster_samples" in cmd
    assert value(cmd, "mode") == "refitted"
    with db.connect(ws.db_path) as conn:
        first = conn.execute("SELECT item_id, cluster FROM visual_clusters ORDER BY item_id").fetchall()
    assert len(first) == 6 and {c for _, c in first} == {0, 1, 2}
    # same seed, same clusters (table replaced, not appended)
    rerun = dg.materialize(
        [visual_clusters], resources=default_resources(ws), run_config={"ops": {"visual_clusters": {"config": {"k": 3}}}}
    )
    assert value(rerun.asset_materializations_for_node("visual_clusters")[0].metadata, "mode") == "assigned to the last fit"
    with db.connect(ws.db_path) as conn:
        again = conn.execute("SELECT item_id, cluster FROM visual_clusters ORDER BY item_id").fetchall()
    assert again == first
    # refit_share 0: always a fresh fit, which (same seed, same items) gives the same clusters
    refit = dg.materialize(
        [visual_clusters],
        resources=default_resources(ws),
        run_config={"ops": {"visual_clusters": {"config": {"k": 3, "refit_share": 0.0}}}},
    )
    assert value(refit.asset_materializations_for_node("visual_clusters")[0].metadata, "mode") == "refitted"
    with db.connect(ws.db_path) as conn:
        assert conn.execute("SELECT item_id, cluster FROM visual_clusters ORDER BY item_id").fetchall() == first


def test_missing_item_images_table_is_a_clear_error(ws):
    with pytest.raises(Exception, match="materialize the item_images asset first"):
        dg.materialize([EMB18], resources=default_resources(ws), run_config={"ops": {"embeddings_resnet18": {"config": FAST}}})


def test_definitions_cover_every_registered_backbone():
    keys = {a.key for a in embeddings_defs.assets}
    assert {dg.AssetKey(f"embeddings_{n}") for n in BACKBONES} | {dg.AssetKey("visual_clusters")} <= keys
    for a in embeddings_defs.assets:
        assert a.group_names_by_key[a.key] == "features"
        assert a.code_versions_by_key[a.key]
        assert dg.AssetKey("item_images") in a.asset_deps[a.key] or a.key == dg.AssetKey("visual_clusters")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_features_match_cpu(ws):
    ok_images(ws, range(1, 5))
    cpu = materialize(ws, EMB18, device="cpu", precision="fp32")
    f_cpu, _ = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.arange(1, 5))
    with db.connect(ws.db_path) as conn:
        conn.execute("DELETE FROM embedding_index")
    md = materialize(ws, EMB18, device="cuda", precision="auto", num_workers=2)
    assert value(md, "device").startswith("cuda") and value(md, "computed") == 4 and value(cpu, "computed") == 4
    f_gpu, _ = store.load_pooled(ws.db_path, ws.features_dir, "resnet18", np.arange(1, 5))
    cos = (f_cpu * f_gpu).sum(1) / np.linalg.norm(f_cpu, axis=1) / np.linalg.norm(f_gpu, axis=1)
    assert cos.min() > 0.99
