"""Where a dataset is read from and where every artefact of the pipeline goes.

Two settings decide everything: ``VISREC_DATASET`` (``demo`` or a path to a
dataset folder) and ``VISREC_DATA_DIR`` (default ``./data``). Each dataset gets
its own workspace ``<data_dir>/<dataset name>/`` so runs on different datasets
never mix artefacts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEMO_DATASET = "demo"
DEFAULT_DATA_DIR = "./data"
INIT_CACHE_ENV = "VISREC_INIT_CACHE_DIR"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def env_data_dir() -> str:
    return os.environ.get("VISREC_DATA_DIR") or DEFAULT_DATA_DIR


def env_dataset() -> str:
    return os.environ.get("VISREC_DATASET") or DEMO_DATASET


def dataset_name(dataset: str) -> str:
    """A filesystem-safe name for the workspace of ``dataset``."""
    if dataset == DEMO_DATASET:
        return DEMO_DATASET
    name = Path(dataset).expanduser().resolve().name
    return _SAFE_NAME.sub("_", name) or "dataset"


@dataclass(frozen=True)
class Workspace:
    """All paths of one dataset's workspace. Creating one touches nothing on disk."""

    data_dir: Path
    dataset: str

    @classmethod
    def from_settings(cls, data_dir: str | os.PathLike, dataset: str) -> "Workspace":
        return cls(Path(data_dir).expanduser().resolve(), dataset)

    @classmethod
    def from_env(cls) -> "Workspace":
        return cls.from_settings(env_data_dir(), env_dataset())

    @property
    def is_demo(self) -> bool:
        return self.dataset == DEMO_DATASET

    @property
    def dataset_dir(self) -> Path:
        """The input folder: interactions, images/, items.csv, incoming/."""
        if self.is_demo:
            return self.data_dir / "datasets" / DEMO_DATASET
        return Path(self.dataset).expanduser().resolve()

    @property
    def root(self) -> Path:
        return self.data_dir / dataset_name(self.dataset)

    @property
    def db_path(self) -> Path:
        return self.root / "visrec.duckdb"

    @property
    def image_store(self) -> Path:
        return self.root / "images"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def triples_dir(self) -> Path:
        return self.root / "triples"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def previews_dir(self) -> Path:
        """The last few preview grids shown in asset metadata, kept to skip re-rendering unchanged ones."""
        return self.root / "previews"

    @property
    def init_cache_dir(self) -> Path:
        """Seeded random initialisations of the backbones, shared by every dataset under data_dir
        (``VISREC_INIT_CACHE_DIR`` moves it, e.g. to share it between data dirs)."""
        override = os.environ.get(INIT_CACHE_ENV)
        return Path(override).expanduser().resolve() if override else self.data_dir / "cache" / "random_init"

    @property
    def incoming_dir(self) -> Path:
        return self.dataset_dir / "incoming"

    def ensure(self) -> "Workspace":
        for p in (self.root, self.image_store, self.features_dir, self.models_dir, self.triples_dir, self.reports_dir):
            p.mkdir(parents=True, exist_ok=True)
        return self
