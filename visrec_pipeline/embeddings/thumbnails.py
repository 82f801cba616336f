"""Thumbnail paths of ``item_images`` rows, resolved inside the workspace (the paths come from a table)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path


def thumbnail_path(root: Path, rel: str | None) -> Path | None:
    """The thumbnail path, only if it stays inside the workspace ``root``."""
    if not rel:
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


class ThumbnailPaths(Mapping):
    """item id -> thumbnail path, resolved on lookup: previews need a few dozen of thousands of rows."""

    def __init__(self, root: Path, rows: list[tuple[int, str]]):
        self._root, self._rel = root, {int(i): p for i, p in rows}

    def __getitem__(self, item_id: int) -> Path | None:
        return thumbnail_path(self._root, self._rel[item_id])

    def __iter__(self) -> Iterator[int]:
        return iter(self._rel)

    def __len__(self) -> int:
        return len(self._rel)
