"""Issue 14, case 7: temp files of a killed writer are removed by the next run of the step owning the folder.

Temp files are named as ``visrec_pipeline/atomic.py`` names them; the concurrent writer is a real
process holding ``atomic_path`` open, then killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from torchvision import models

from visrec_pipeline.defs.embeddings import embedding_asset
from visrec_pipeline.defs.images import CommonsImageSource, item_images
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import ComputeResource, VisrecDuckDB, VisrecSettings
from visrec_pipeline.embeddings.backbones import BackboneSpec
from visrec_pipeline.paths import Workspace

ROWS = [{"user_id": u, "item_id": i, "timestamp": 100 * u + i} for u in (1, 2) for i in (10, 11, 12)]
# a small backbone through the factory of the registered ones (the asset code is the same)
RESNET18 = BackboneSpec("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "avgpool", "layer4")
TEN_MINUTES_AGO = time.time() - 600

WRITER = r"""
import sys, time
from visrec_pipeline.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a thumbnail")
    print(tmp, flush=True)
    time.sleep(600)
"""


def _resources(ws: Workspace) -> dict:
    return {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
        "commons": CommonsImageSource(api_url="http://127.0.0.1:9/w/api.php", contact="ops@example.org"),
        "compute": ComputeResource(),
    }


def _leftover(path: Path) -> Path:
    """A temp file a killed writer left, last written ten minutes ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
    os.utime(path, (TEN_MINUTES_AGO, TEN_MINUTES_AGO))
    return path


def _item_images(ws: Workspace) -> dict:
    result = dg.materialize([item_images], resources=_resources(ws))
    (mat,) = result.asset_materializations_for_node("item_images")
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.mark.timeout(240)
def test_item_images_removes_a_killed_writers_temp_files_and_keeps_a_live_ones(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    assert dg.materialize(INGEST_ASSETS, resources=_resources(workspace)).success
    store = workspace.image_store
    killed = [
        _leftover(store / "ab" / f".{'ab' * 32}.jpg.k1ll3d0x.tmp"),
        _leftover(store / "cd" / f".{'cd' * 32}.jpg.a_b_c_d9.tmp"),
    ]
    kept = [_leftover(store / "ab" / "notes.tmp"), _leftover(store / ".hidden")]  # not temp names of atomic.py
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store / "ef" / f"{'ef' * 32}.jpg")], stdout=subprocess.PIPE, text=True
    )
    try:
        live = Path(writer.stdout.readline().strip())
        os.utime(live, (TEN_MINUTES_AGO, TEN_MINUTES_AGO))  # old, but its writer still holds it

        metadata = _item_images(workspace)
        assert [p.exists() for p in killed] == [False, False]
        assert all(p.exists() for p in kept) and live.exists()
        assert metadata["temp_files_removed"] == 2 and metadata["status_ok"] == 3

        writer.send_signal(signal.SIGKILL)  # killed mid-write: its temp file stays behind, unlocked
        writer.wait(timeout=30)
        assert live.exists()
        metadata = _item_images(workspace)
        assert not live.exists() and metadata["temp_files_removed"] == 1
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


@pytest.mark.timeout(240)
def test_embeddings_remove_half_written_feature_shards(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    features = workspace.features_dir / RESNET18.name
    killed = [
        _leftover(features / "random-seed0" / ".20240101T000000-0123abcd.pooled.npy.x1y2z3w4.tmp.npy"),
        _leftover(features / "random-seed0" / ".20240101T000000-0123abcd.spatial.npy.q9r8s7t6.tmp.npy"),
    ]
    emb = embedding_asset(RESNET18)
    fast = {"weights": "random", "device": "cpu", "batch_size": 4, "num_workers": 0, "neighbour_queries": 0}
    result = dg.materialize(
        [*INGEST_ASSETS, item_images, emb],
        resources=_resources(workspace),
        run_config={"ops": {emb.key.path[-1]: {"config": fast}}},
    )
    assert result.success
    assert [p.exists() for p in killed] == [False, False]
    assert sorted(p.name.split(".", 1)[1] for p in features.rglob("*.npy")) == [
        "ids.npy",
        "pooled.npy",
        "spatial.npy",
    ]  # the new shard, complete, and nothing else


def test_a_temp_file_written_after_the_step_started_is_kept(tmp_path):
    from visrec_pipeline.atomic import remove_abandoned_temps

    step_started = time.time() - 60
    fresh = tmp_path / "ab" / ".x.jpg.n3wf1l3s.tmp"  # unlocked: its writer may not have locked it yet
    fresh.parent.mkdir()
    fresh.write_bytes(b"just created")
    old = _leftover(tmp_path / ".y.npz.0ldf1l3s.tmp.npz")
    assert remove_abandoned_temps(tmp_path, older_than=step_started) == [old]
    assert fresh.exists() and not old.exists()
