"""Shared fixtures: a temporary workspace and a writer of tiny, real dataset folders."""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from visrec_pipeline.paths import INIT_CACHE_ENV, Workspace


@pytest.fixture(scope="session", autouse=True)
def _shared_init_cache(tmp_path_factory: pytest.TempPathFactory):
    """One random-init cache for the whole run: each test's own data dir would otherwise write
    (and fsync) its own 100-350 MB copy of the same ResNet-50 / AlexNet initialisation."""
    mp = pytest.MonkeyPatch()
    mp.setenv(INIT_CACHE_ENV, str(tmp_path_factory.mktemp("random_init")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Model tests train small models: one intra-op thread is faster than two on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A workspace under ``tmp_path``: VISREC_DATA_DIR=tmp/data, VISREC_DATASET=tmp/dataset (created empty)."""
    data_dir = tmp_path / "data"
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    monkeypatch.setenv("VISREC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("VISREC_DATASET", str(dataset_dir))
    return Workspace.from_env()


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 32)) -> Path:
    """A real image (format from the suffix) with a colour and a band that depend on ``seed``."""
    r, g, b = (int(255 * c) for c in colorsys.hsv_to_rgb((seed * 0.137) % 1.0, 0.7, 0.9))
    im = Image.new("RGB", size, (r, g, b))
    band = Image.new("RGB", (size[0], max(1, size[1] // 4)), (255 - r, 255 - g, 255 - b))
    im.paste(band, (0, (seed * 7) % max(1, size[1] - band.size[1])))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def write_dataset(
    folder: Path,
    interactions: pd.DataFrame | Iterable[Mapping] | str,
    *,
    fmt: str = "csv",
    items: pd.DataFrame | Iterable[Mapping] | str | None = None,
    image_items: Iterable[int] | None = None,
    image_ext: str = "jpg",
) -> Path:
    """Write a dataset folder (layout of docs/DESIGN.md) and return it.

    ``interactions``: rows (``user_id,item_id,timestamp[,evaluation]``) or the
    raw text of ``interactions.csv`` (for malformed files). ``fmt``: ``csv`` or
    ``parquet``. ``items``: rows or raw text of ``items.csv``. One real image
    ``images/<item_id>.<image_ext>`` is written per item of ``image_items``
    (default: every item of the interactions rows; none for raw text).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(interactions, str):
        if fmt != "csv":
            raise ValueError("raw text interactions are written as CSV only")
        (folder / "interactions.csv").write_text(interactions)
        item_ids: list[int] = []
    else:
        df = pd.DataFrame(list(interactions) if not isinstance(interactions, pd.DataFrame) else interactions)
        if fmt == "csv":
            df.to_csv(folder / "interactions.csv", index=False)
        elif fmt == "parquet":
            df.to_parquet(folder / "interactions.parquet", index=False)
        else:
            raise ValueError(f"unknown format {fmt!r}")
        item_ids = sorted({int(i) for i in df["item_id"]}) if "item_id" in df else []
    if items is not None:
        if isinstance(items, str):
            (folder / "items.csv").write_text(items)
        else:
            pd.DataFrame(list(items) if not isinstance(items, pd.DataFrame) else items).to_csv(
                folder / "items.csv", index=False
            )
    for item_id in image_items if image_items is not None else item_ids:
        write_image(folder / "images" / f"{int(item_id)}.{image_ext}", int(item_id))
    return folder


@pytest.fixture
def make_dataset() -> Callable[..., Path]:
    """``make_dataset(folder, interactions, **kw)``: see ``write_dataset``."""
    return write_dataset


def split_workspace(root: Path, rows, *, image_items: Iterable[int] | None = None, sync_images: bool = True) -> Workspace:
    """A workspace over a dataset folder of ``rows`` with the library steps the upstream assets run:
    interactions ingested, catalogue and split built, and (``sync_images``) the folder's images synced."""
    from visrec_pipeline import db
    from visrec_pipeline.images.store import ImageStore
    from visrec_pipeline.images.sync import FolderImageSource, sync_item_images
    from visrec_pipeline.ingest import build_catalog, build_interactions, build_split, ingest_batch

    dataset = write_dataset(Path(root) / "dataset", rows, image_items=image_items)
    ws = Workspace.from_settings(Path(root) / "data", str(dataset)).ensure()
    with db.connect(ws.db_path) as conn:
        ingest_batch(conn, "initial", dataset / "interactions.csv")
        build_interactions(conn)
        build_catalog(conn, None)
        build_split(conn)
    if sync_images:
        sync_item_images(
            lambda: db.connect(ws.db_path),
            FolderImageSource(ws.dataset_dir / "images"),
            ImageStore.for_workspace(ws),
            workspace_root=ws.root,
            workers=1,
        )
    return ws


@pytest.fixture(scope="session")
def ray_cluster():
    """A private Ray cluster of this machine for the whole run: a head and two worker processes
    (nodes of one CPU each) on loopback; this test process is connected to it as the driver."""
    import ray

    from visrec_pipeline.distributed.cluster import ComputeSettings, ray_session

    with ray_session(ComputeSettings(engine="ray", address="local:2")) as address:
        yield address
    assert not ray.is_initialized()
