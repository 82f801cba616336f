"""``item_images`` with the dataset-folder source: real files, real DuckDB, ``dg.materialize``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from http_fixtures import bomb_png_bytes, jpeg_bytes, png_rgba_bytes, truncated
from visrec_pipeline import db
from visrec_pipeline.defs.images import (
    MIN_IMAGE_SHARE_ENV,
    CommonsImageSource,
    ItemImagesConfig,
    item_images,
    item_images_files_intact,
    item_images_ok_share,
)
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.images.store import ImageStore, file_sha256
from visrec_pipeline.images.sync import FolderImageSource, sync_item_images
from visrec_pipeline.paths import Workspace

REPO = Path(__file__).resolve().parent.parent
ASSETS = [item_images, item_images_ok_share, item_images_files_intact]
CATALOG_DDL = (
    "CREATE TABLE item_catalog (item_id BIGINT PRIMARY KEY, title VARCHAR, creator VARCHAR, url VARCHAR, "
    "first_seen BIGINT)"
)


def make_workspace(tmp_path: Path, files: dict[str, bytes], item_ids: list[int]) -> Workspace:
    dataset = tmp_path / "my_dataset"
    (dataset / "images").mkdir(parents=True)
    for name, data in files.items():
        (dataset / "images" / name).write_bytes(data)
    ws = Workspace.from_settings(tmp_path / "data", str(dataset))
    with db.connect(ws.db_path) as conn:
        conn.execute(CATALOG_DDL)
        conn.executemany(
            "INSERT INTO item_catalog VALUES (?, ?, NULL, NULL, 0)", [[i, f"File:Item {i}.jpg"] for i in item_ids]
        )
    return ws


def resources(ws: Workspace) -> dict:
    return {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
        # the folder source never talks to Commons; an unreachable endpoint proves it
        "commons": CommonsImageSource(api_url="http://127.0.0.1:9/w/api.php", contact="ops@example.org"),
    }


def materialize(ws: Workspace, assets=ASSETS, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources=resources(ws),
        run_config=dg.RunConfig(ops={"item_images": ItemImagesConfig(**config)}),
        raise_on_error=True,
    )


def rows(ws: Workspace) -> dict[int, tuple]:
    with db.connect(ws.db_path, read_only=True) as conn:
        got = conn.execute(
            "SELECT item_id, status, reason, content_hash, path, orig_width, orig_height, source, updated_at "
            "FROM item_images ORDER BY item_id"
        ).fetchall()
    return {r[0]: r[1:] for r in got}


def checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def metadata(result: dg.ExecuteInProcessResult) -> dict:
    (mat,) = result.asset_materializations_for_node("item_images")
    return {k: v.value for k, v in mat.metadata.items()}


GOOD = jpeg_bytes(640, 480, seed=1)
FILES = {
    "1.jpg": GOOD,
    "2.png": png_rgba_bytes(200, 300),
    "3.jpg": truncated(jpeg_bytes(640, 480, seed=3)),
    "4.jpg": b"this is a text file pretending to be a JPEG\n",
    "5.png": bomb_png_bytes(20000, 20000),
    # 6: no file at all
    "7.JPG": jpeg_bytes(300, 200, seed=7, exif_orientation=6),
    "8.jpeg": GOOD,  # same bytes as item 1: one stored thumbnail
}
IDS = [1, 2, 3, 4, 5, 6, 7, 8]


def test_folder_source_records_every_status(tmp_path):
    ws = make_workspace(tmp_path, FILES, IDS)
    result = materialize(ws)
    got = rows(ws)
    assert set(got) == set(IDS)
    status = {i: r[0] for i, r in got.items()}
    assert status == {1: "ok", 2: "ok", 3: "corrupt", 4: "corrupt", 5: "too_large", 6: "missing", 7: "ok", 8: "ok"}
    assert "truncated" in got[3][1] and "not a JPEG" in got[4][1] and "decompression bomb" in got[5][1]
    assert "6.jpg" in got[6][1]
    assert {r[6] for r in got.values()} == {"folder"}
    store = ImageStore.for_workspace(ws)
    for i in (1, 2, 7, 8):
        _, _, h, rel, *_ = got[i]
        assert rel == f"images/{h[:2]}/{h}.jpg" and file_sha256(ws.root / rel) == h
        assert store.open(h).size == (256, 256)
    assert got[1][2] == got[8][2]  # identical images share one thumbnail
    assert (got[1][4], got[1][5]) == (640, 480) and (got[7][4], got[7][5]) == (200, 300)
    assert got[3][2] is None and got[3][4] == 640  # failures keep the size read from the header

    md = metadata(result)
    assert md["source"] == "folder" and md["processed_this_run"] == 8
    assert md["status_ok"] == 4 and md["status_corrupt"] == 2 and md["status_missing"] == 1
    assert md["status_too_large"] == 1 and md["status_http_error"] == 0 and md["status_pending"] == 0
    assert md["throughput_images_per_s"] > 0
    assert "truncated" in md["failures"] and "| item_id | status | reason | source |" in md["failures"]
    assert md["sample_thumbnails"].startswith("![sample thumbnails](data:image/png;base64,")
    # 4 of 8 ok: below the default floor of 0.9; every stored file intact
    assert checks(result) == {"item_images_ok_share": False, "item_images_files_intact": True}


def test_rerun_processes_nothing_and_floor_comes_from_env(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path, FILES, IDS)
    materialize(ws)
    before = rows(ws)
    monkeypatch.setenv(MIN_IMAGE_SHARE_ENV, "0.5")
    again = materialize(ws)
    assert metadata(again)["processed_this_run"] == 0
    assert rows(ws) == before  # same rows, same updated_at
    assert checks(again)["item_images_ok_share"] is True
    monkeypatch.setenv(MIN_IMAGE_SHARE_ENV, "1.5")
    with pytest.raises(Exception, match=MIN_IMAGE_SHARE_ENV):
        materialize(ws)


def test_retry_failed_new_files_and_lost_thumbnails(tmp_path):
    ws = make_workspace(tmp_path, FILES, IDS)
    materialize(ws)
    first = rows(ws)
    images = Path(ws.dataset_dir) / "images"
    (images / "3.jpg").write_bytes(jpeg_bytes(640, 480, seed=3))  # repaired
    (images / "6.png").write_bytes(jpeg_bytes(100, 100, seed=6))  # appeared (a JPEG named .png is fine)

    result = materialize(ws)  # no retry: only the newly appeared image
    got = rows(ws)
    assert metadata(result)["processed_this_run"] == 1
    assert got[6][0] == "ok" and got[3][0] == "corrupt"

    result = materialize(ws, retry_failed=True)  # the failed ones: 3, 4, 5
    got = rows(ws)
    assert metadata(result)["processed_this_run"] == 3
    assert got[3][0] == "ok" and got[4][0] == "corrupt" and got[5][0] == "too_large"
    assert got[4][7] > first[4][7] and got[1] == first[1]  # retried rows updated, ok rows untouched

    # a thumbnail lost from the store: the check sees it, the next run rebuilds it
    lost = ws.root / got[2][3]
    lost.unlink()
    only_checks = dg.materialize(ASSETS, resources=resources(ws), selection=dg.AssetSelection.all_asset_checks())
    assert checks(only_checks) == {"item_images_ok_share": False, "item_images_files_intact": False}
    result = materialize(ws)
    assert metadata(result)["processed_this_run"] == 1 and lost.is_file()
    assert checks(result)["item_images_files_intact"] is True

    lost.write_bytes(b"tampered")  # a damaged file is reported by its hash
    only_checks = dg.materialize(ASSETS, resources=resources(ws), selection=dg.AssetSelection.all_asset_checks())
    assert checks(only_checks)["item_images_files_intact"] is False


def test_killed_run_resumes_without_duplicates(tmp_path):
    ids = list(range(1, 13))
    files = {f"{i}.jpg": jpeg_bytes(200 + 10 * i, 180, seed=i) for i in ids}
    ws = make_workspace(tmp_path, files, ids)
    marker = tmp_path / "first_chunk_committed"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from visrec_pipeline import db
        from visrec_pipeline.images.store import ImageStore
        from visrec_pipeline.images.sync import FolderImageSource, sync_item_images

        def hold(chunk, report):
            Path({str(marker)!r}).write_text(str(report.processed))
            time.sleep(120)  # killed here, between two committed chunks

        sync_item_images(
            lambda: db.connect({str(ws.db_path)!r}),
            FolderImageSource({str(Path(ws.dataset_dir) / "images")!r}),
            ImageStore({str(ws.image_store)!r}),
            workspace_root=Path({str(ws.root)!r}),
            chunk_size=5,
            on_chunk=hold,
        )
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the sync process exited early"
            assert time.monotonic() < deadline, "the first chunk was never committed"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    partial = rows(ws)
    assert sorted(partial) == [1, 2, 3, 4, 5] and {r[0] for r in partial.values()} == {"ok"}

    result = materialize(ws, chunk_size=5)
    assert metadata(result)["processed_this_run"] == 7
    got = rows(ws)
    assert sorted(got) == ids and {r[0] for r in got.values()} == {"ok"}
    assert all(got[i] == partial[i] for i in partial)  # committed rows were not redone
    with db.connect(ws.db_path, read_only=True) as conn:
        n, distinct = conn.execute("SELECT count(*), count(DISTINCT item_id) FROM item_images").fetchone()
    assert n == distinct == 12
    assert checks(result) == {"item_images_ok_share": True, "item_images_files_intact": True}


def test_thread_and_process_pools_store_identical_thumbnails(tmp_path):
    ids = [1, 2]  # the process pool costs a worker start-up (~1 s); two images are enough to compare
    ws = make_workspace(tmp_path, {f"{i}.jpg": jpeg_bytes(300, 200, seed=i) for i in ids}, ids)
    outcomes = {}
    for kind in ("thread", "process"):
        with db.connect(ws.db_path) as conn:
            conn.execute("DROP TABLE IF EXISTS item_images")
        report = sync_item_images(
            lambda: db.connect(ws.db_path),
            FolderImageSource(Path(ws.dataset_dir) / "images"),
            ImageStore(ws.image_store),
            workspace_root=ws.root,
            pool_kind=kind,
            workers=1 if kind == "process" else 2,
        )
        assert report.counts == {"ok": 2}
        outcomes[kind] = {i: r[2] for i, r in rows(ws).items()}
    assert outcomes["thread"] == outcomes["process"]


def test_sync_without_catalog_fails_clearly(tmp_path):
    dbp = tmp_path / "v.duckdb"
    with pytest.raises(RuntimeError, match="item_catalog"):
        sync_item_images(
            lambda: db.connect(dbp), FolderImageSource(tmp_path), ImageStore(tmp_path / "images"), workspace_root=tmp_path
        )


def test_folder_source_required_but_absent_fails_clearly(tmp_path):
    ws = make_workspace(tmp_path, {}, [1])
    (Path(ws.dataset_dir) / "images").rmdir()
    with pytest.raises(dg.Failure, match="no images/ folder"):
        materialize(ws, source="folder")
