"""``item_images`` with the Commons source, end to end against a local Commons emulator on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from http_fixtures import HTML_PAGE, FakeCommons, Reply, jpeg_bytes, png_bytes
from visrec_pipeline import db
from visrec_pipeline.defs.images import CommonsImageSource, ItemImagesConfig, item_images, item_images_files_intact
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.images.store import file_sha256
from visrec_pipeline.paths import Workspace

CONTACT = "visrec-tests@example.org"
CATALOG_DDL = (
    "CREATE TABLE item_catalog (item_id BIGINT PRIMARY KEY, title VARCHAR, creator VARCHAR, url VARCHAR, "
    "first_seen BIGINT)"
)
MAX_BYTES = 200_000


@pytest.fixture
def fake():
    with FakeCommons() as server:
        yield server


def setup_catalog(tmp_path: Path, titles: dict[int, str | None]) -> Workspace:
    dataset = tmp_path / "commons_dataset"  # no images/ folder: source=auto means Commons
    dataset.mkdir()
    ws = Workspace.from_settings(tmp_path / "data", str(dataset))
    with db.connect(ws.db_path) as conn:
        conn.execute(CATALOG_DDL)
        conn.executemany("INSERT INTO item_catalog VALUES (?, ?, 'someone', NULL, 0)", [[i, t] for i, t in titles.items()])
    return ws


def run(ws: Workspace, fake: FakeCommons, **config) -> dg.ExecuteInProcessResult:
    source = CommonsImageSource(
        api_url=fake.api_url, contact=CONTACT, max_retries=2, backoff_base_s=0.01, max_bytes=MAX_BYTES
    )
    return dg.materialize(
        [item_images, item_images_files_intact],
        resources={
            "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
            "duckdb": VisrecDuckDB(database=str(ws.db_path)),
            "commons": source,
        },
        run_config=dg.RunConfig(ops={"item_images": ItemImagesConfig(**config)}),
    )


def rows(ws: Workspace) -> dict[int, tuple]:
    with db.connect(ws.db_path, read_only=True) as conn:
        got = conn.execute(
            "SELECT item_id, status, reason, content_hash, path, orig_width, orig_height, source FROM item_images"
        ).fetchall()
    return {r[0]: r[1:] for r in got}


def test_commons_source_end_to_end(tmp_path, fake):
    thumb = jpeg_bytes(330, 248, seed=1)
    good = fake.add_file("Good photo.jpg", jpeg_bytes(1200, 900, seed=1), "image/jpeg", 1200, 900, thumb=thumb)
    fake.add_file("Small.png", png_bytes(200, 150), "image/png", 200, 150)  # thumbnail = original, sha1-checked
    page = fake.add_file("Page.jpg", HTML_PAGE, "image/jpeg", 640, 480)
    flaky = fake.add_file("Flaky.jpg", jpeg_bytes(300, 300, seed=4), "image/jpeg", 300, 300)
    fake.add_file("Scan.tif", b"II*\x00", "image/tiff", 5000, 4000)
    big = jpeg_bytes(1200, 900, seed=6)
    assert len(big) > MAX_BYTES // 4
    huge = fake.add_file("Huge.jpg", big * 5, "image/jpeg", 9000, 7000, thumb=big * 5)  # thumbnail over max_bytes
    slow = fake.add_file("Slow.jpg", jpeg_bytes(320, 240, seed=7), "image/jpeg", 320, 240)
    titles = {
        1: "File:Good_photo.jpg",
        2: "Small.png",  # bare file name
        3: None,
        4: "File:Never uploaded.jpg",
        5: page,
        6: flaky,
        7: "File:Scan.tif",
        8: huge,
        9: slow,
    }
    ws = setup_catalog(tmp_path, titles)
    fake.script(fake.file_path(flaky), *[Reply(500)] * 3)  # 1 try + 2 retries, all failing
    fake.script(fake.file_path(slow), Reply(429, {"Retry-After": "1"}))

    start = time.monotonic()
    result = run(ws, fake)
    assert time.monotonic() - start >= 1.0  # waited out Retry-After
    got = rows(ws)
    status = {i: r[0] for i, r in got.items()}
    assert status == {
        1: "ok", 2: "ok", 3: "missing", 4: "missing", 5: "corrupt",
        6: "http_error", 7: "corrupt", 8: "too_large", 9: "ok",
    }
    assert (got[1][4], got[1][5]) == (1200, 900)  # the original's size from imageinfo, not the thumbnail's
    assert "no title" in got[3][1] and "no such file" in got[4][1] and "HTML" in got[5][1]
    assert "HTTP 500" in got[6][1] and (got[6][4], got[6][5]) == (300, 300)
    assert "image/tiff" in got[7][1] and "bytes" in got[8][1]
    assert {r[6] for r in got.values()} == {"commons"}
    for i in (1, 2, 9):
        assert file_sha256(ws.root / got[i][3]) == got[i][2]
    # the thumbnail (not the original) of the big photo was fetched; the tiff never
    assert fake.requests_to(fake.thumb_path(good, 330)) and not fake.requests_to(fake.file_path(good))
    assert not fake.requests_to(fake.file_path("File:Scan.tif"))
    api = fake.requests_to(fake.API_PATH)
    assert len(api) == 1 and all(r.headers["User-Agent"].startswith("visrec-pipeline/") for r in fake.log)

    (mat,) = result.asset_materializations_for_node("item_images")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["source"] == "commons" and md["processed_this_run"] == 9 and md["http_retries"] >= 3
    assert md["status_ok"] == 3 and md["status_http_error"] == 1
    assert all(e.passed for e in result.get_asset_check_evaluations())

    # a re-run asks Commons nothing; retrying the failures fixes the now-healthy flaky file
    n_requests = len(fake.log)
    again = run(ws, fake)
    assert len(fake.log) == n_requests
    (mat,) = again.asset_materializations_for_node("item_images")
    assert mat.metadata["processed_this_run"].value == 0

    retried = run(ws, fake, retry_failed=True)
    got = rows(ws)
    assert got[6][0] == "ok" and got[8][0] == "too_large" and got[3][0] == "missing"
    (mat,) = retried.asset_materializations_for_node("item_images")
    assert mat.metadata["processed_this_run"].value == 6


def test_commons_source_needs_contact_info(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("VISREC_COMMONS_CONTACT", raising=False)
    ws = setup_catalog(tmp_path, {1: "File:A.jpg"})
    with pytest.raises(Exception, match="User-Agent policy"):
        dg.materialize(
            [item_images],
            resources={
                "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
                "duckdb": VisrecDuckDB(database=str(ws.db_path)),
                "commons": CommonsImageSource(api_url=fake.api_url),
            },
        )
    assert fake.log == []


def test_resource_refuses_non_standard_width():
    with pytest.raises(Exception, match="standard widths"):
        CommonsImageSource(contact=CONTACT, thumb_width=500)
    assert CommonsImageSource(contact=CONTACT, thumb_width=250).client().thumb_width == 250
