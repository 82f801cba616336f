"""Issue 14, case 9: an image in the dataset's ``images/`` that links outside the dataset folder is refused.

``item_images`` materialized on a real dataset folder with real images and real symbolic links.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from conftest import write_image
from visrec_pipeline import db
from visrec_pipeline.defs.images import CommonsImageSource, item_images
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings

SYSTEM_FILE = Path("/etc/hostname")


@pytest.mark.skipif(not SYSTEM_FILE.is_file(), reason="needs a system file to link to")
def test_links_leaving_the_dataset_folder_are_corrupt_and_links_inside_it_work(tmp_path, workspace, make_dataset):
    rows = [{"user_id": 1, "item_id": i, "timestamp": 100 + i} for i in (1, 2, 3, 4)]
    make_dataset(workspace.dataset_dir, rows, image_items=[1])
    images = workspace.dataset_dir / "images"
    outside = write_image(tmp_path / "elsewhere" / "2.jpg", 2)  # a valid JPEG, but not the dataset's
    (images / "2.jpg").symlink_to(outside)
    (images / "3.jpg").symlink_to(SYSTEM_FILE)
    inside = write_image(workspace.dataset_dir / "originals" / "four.jpg", 4)
    (images / "4.jpg").symlink_to(Path("..") / "originals" / inside.name)  # relative, inside the folder

    resources = {
        "settings": VisrecSettings(data_dir=str(workspace.data_dir), dataset=workspace.dataset),
        "duckdb": VisrecDuckDB(database=str(workspace.db_path)),
        "commons": CommonsImageSource(api_url="http://127.0.0.1:9/w/api.php", contact="ops@example.org"),
    }
    assert dg.materialize([*INGEST_ASSETS, item_images], resources=resources).success
    with db.connect(workspace.db_path, read_only=True) as conn:
        got = dict(conn.execute("SELECT item_id, (status, reason) FROM item_images").fetchall())
    assert got[1] == ("ok", "") and got[4] == ("ok", "")
    assert got[2] == (
        "corrupt",
        f"2.jpg is a symbolic link to {outside.resolve()}, outside the dataset folder: refused, not opened",
    )
    assert got[3] == (
        "corrupt",
        f"3.jpg is a symbolic link to {SYSTEM_FILE.resolve()}, outside the dataset folder: refused, not opened",
    )


def test_an_images_folder_that_is_itself_a_link_keeps_its_files(tmp_path):
    from visrec_pipeline.images.store import DatasetImages

    real = write_image(tmp_path / "big_disk" / "images" / "7.jpg", 7).parent
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "images").symlink_to(real)  # images/ kept on another disk on purpose
    images = DatasetImages(dataset / "images")
    found = images.find(7)
    assert found == dataset / "images" / "7.jpg" and images.outside_reason(found) is None
