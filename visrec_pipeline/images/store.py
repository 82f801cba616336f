"""The content-addressed thumbnail store, and finding an item's image in a dataset folder.

A thumbnail lives at ``<store root>/<h[:2]>/<h>.jpg`` where ``h`` is the
SHA-256 of its bytes. With the store root at ``Workspace.image_store``
(``<workspace root>/images``) the path recorded in DuckDB is
``images/<h[:2]>/<h>.jpg``, relative to the workspace root. Paths are only
ever built from a validated hash, never from an item id or a title, so no
input can point the store outside its root. Identical thumbnails are stored
once; writing one again is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from visrec_pipeline.atomic import atomic_open
from visrec_pipeline.images.validate import THUMBNAIL_SIZE

_HASH = re.compile(r"[0-9a-f]{64}")

DATASET_IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_hash(value: str) -> str:
    """``value`` if it is a lowercase SHA-256 hex digest, else ValueError."""
    if not isinstance(value, str) or not _HASH.fullmatch(value):
        raise ValueError(f"not a SHA-256 hex digest: {value!r}")
    return value


class ImageStore:
    """Thumbnails keyed by the SHA-256 of their bytes, under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r})"

    @classmethod
    def for_workspace(cls, workspace) -> "ImageStore":
        """The store of a :class:`visrec_pipeline.paths.Workspace` (its ``image_store`` folder)."""
        return cls(workspace.image_store)

    def path_for(self, content_hash: str) -> Path:
        h = check_hash(content_hash)
        return self.root / h[:2] / f"{h}.jpg"

    def relative_path(self, content_hash: str) -> str:
        """Path recorded in DuckDB: relative to the store root's parent (the workspace root), POSIX form."""
        h = check_hash(content_hash)
        return f"{self.root.name}/{h[:2]}/{h}.jpg"

    def exists(self, content_hash: str) -> bool:
        return self.path_for(content_hash).is_file()

    def put(self, thumbnail: bytes) -> tuple[str, str]:
        """Store ``thumbnail`` bytes; returns ``(content_hash, relative_path)``.

        Idempotent: a file already holding exactly these bytes is left alone;
        a damaged one is replaced. Written via temp file + fsync + rename, so a
        killed writer never leaves a partial file under a valid name.
        """
        if not thumbnail:
            raise ValueError("refusing to store an empty thumbnail")
        h = content_hash(thumbnail)
        target = self.path_for(h)
        try:
            if target.read_bytes() == thumbnail:
                return h, self.relative_path(h)
        except FileNotFoundError:
            pass
        with atomic_open(target, "wb") as fh:
            fh.write(thumbnail)
        return h, self.relative_path(h)

    def verify(self, content_hash: str) -> bool:
        """True when the file exists and its bytes still hash to ``content_hash``."""
        path = self.path_for(content_hash)
        try:
            return file_sha256(path) == content_hash
        except FileNotFoundError:
            return False

    def open(self, content_hash: str, *, at_least: int | None = None) -> Image.Image:
        """The thumbnail as a loaded RGB image (FileNotFoundError naming the hash if absent).
        ``at_least``: decode at the smallest JPEG scale (1/2, 1/4, 1/8) whose sides stay >= it."""
        path = self.path_for(content_hash)
        if not path.is_file():
            raise FileNotFoundError(f"thumbnail {content_hash} not in the image store at {self.root}")
        with Image.open(path, formats=("JPEG",)) as im:
            if at_least is not None:
                im.draft("RGB", (at_least, at_least))
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()

    def load_batch(
        self, hashes: Sequence[str], *, fill_missing: int | None = None, size: int = THUMBNAIL_SIZE
    ) -> np.ndarray:
        """uint8 array ``[len(hashes), size, size, 3]`` of the thumbnails in order.

        A missing thumbnail (or a ``None`` hash) raises FileNotFoundError, unless
        ``fill_missing`` gives a grey level to fill its slot with.
        """
        out = np.empty((len(hashes), size, size, 3), np.uint8)
        for k, h in enumerate(hashes):
            if h is None or (fill_missing is not None and not self.exists(h)):
                if fill_missing is None:
                    raise FileNotFoundError(f"no thumbnail hash at position {k}")
                out[k] = fill_missing
                continue
            im = self.open(h)
            if im.size != (size, size):
                raise ValueError(f"thumbnail {h} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
            out[k] = np.asarray(im)
        return out


def validated_item_id(item_id: object) -> int:
    """``item_id`` as a Python int; TypeError for anything that is not an integer (bools and strings included)."""
    if isinstance(item_id, (bool, np.bool_)) or not isinstance(item_id, (int, np.integer)):
        raise TypeError(f"item id must be an integer, got {type(item_id).__name__} {item_id!r}")
    return int(item_id)


class DatasetImages:
    """The ``images/`` folder of a dataset: ``<item_id>.jpg|.jpeg|.png``, extension case-insensitive.

    The folder is listed once; a lookup formats the validated integer id into
    candidate names and matches them case-insensitively against the listing,
    so neither a raw id string nor anything else from the input becomes a path.
    When several files match one id, ``.jpg`` wins over ``.jpeg`` over ``.png``.
    A file may be a symbolic link as long as it resolves inside the dataset folder
    (the parent of ``images/``) or inside ``images/``' own target: see :meth:`outside_reason`.
    """

    def __init__(self, images_dir: str | os.PathLike):
        self.images_dir = Path(images_dir)
        # where a link may point: the dataset folder, and images/ itself when it is a link elsewhere
        self._allowed_roots = (self.images_dir.parent.resolve(), self.images_dir.resolve())
        names: dict[str, str] = {}
        if self.images_dir.is_dir():
            with os.scandir(self.images_dir) as it:
                for entry in sorted(it, key=lambda e: e.name):
                    if entry.is_file():
                        names.setdefault(entry.name.lower(), entry.name)
        self._names = names

    def __len__(self) -> int:
        return len(self._names)

    def find(self, item_id: object) -> Path | None:
        i = validated_item_id(item_id)
        for ext in DATASET_IMAGE_EXTENSIONS:
            actual = self._names.get(f"{i}{ext}")
            if actual is not None:
                return self.images_dir / actual
        return None

    def find_many(self, item_ids: Iterable[object]) -> list[Path | None]:
        return [self.find(i) for i in item_ids]

    def outside_reason(self, path: Path) -> str | None:
        """Why ``path`` (a file found here) must not be opened: it resolves outside the dataset
        folder, through a symbolic link (a dataset is input, and a link could make the pipeline read
        any file of the machine). None when it stays inside."""
        target = path.resolve()
        if any(target.is_relative_to(root) for root in self._allowed_roots):
            return None
        return f"{path.name} is a symbolic link to {target}, outside the dataset folder: refused, not opened"


def find_dataset_image(images_dir: str | os.PathLike, item_id: object) -> Path | None:
    """One-off lookup of an item's image in a dataset's ``images/`` folder (lists the folder)."""
    return DatasetImages(images_dir).find(item_id)
