"""New interaction batches dropped into a dataset's ``incoming/`` folder (no dagster).

Each interactions file ``incoming/<name>.csv`` (or ``.parquet``) is one batch;
its new items' metadata may sit next to it as ``incoming/<name>_items.csv``.
A batch is keyed by a safe form of its name plus the start of its content hash,
so the same bytes delivered again map to the same key (nothing new to do) and
a key never carries raw file-name characters into paths, SQL or Dagster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from visrec_pipeline.ingest.interactions_file import SUFFIXES, file_sha256
from visrec_pipeline.ingest.items_file import ITEMS_FILE_NAME, read_items

INCOMING_DIR = "incoming"
ITEMS_SUFFIX = "_items.csv"
HASH_CHARS = 12
_MAX_STEM = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,%d}-[0-9a-f]{%d}$" % (_MAX_STEM, HASH_CHARS))


@dataclass(frozen=True)
class IncomingFile:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def source_file(self) -> str:
        """How messages and ``raw_interactions.source_file`` name it (relative to the dataset folder)."""
        return f"{INCOMING_DIR}/{self.path.name}"

    @property
    def key(self) -> str:
        return batch_key(self.path.name, self.sha256)


def batch_key(file_name: str, sha256: str) -> str:
    """``<safe stem>-<first 12 hex of the SHA-256>``: a valid partition key and batch id."""
    stem = _UNSAFE.sub("_", Path(file_name).stem).strip("_")[:_MAX_STEM] or "batch"
    return f"{stem}-{sha256[:HASH_CHARS]}"


def key_hash(key: str) -> str:
    """The content-hash part of a batch key (raises on anything that is not one)."""
    if not _KEY.match(key):
        raise ValueError(f"{key!r} is not an incoming batch key (<name>-<12 hex digits>)")
    return key.rsplit("-", 1)[1]


def is_batch_file(path: Path) -> bool:
    """An interactions file: .csv/.parquet, not an items file, not hidden or half-copied (dot files)."""
    name = path.name
    return (
        path.is_file()
        and not name.startswith(".")
        and path.suffix.lower() in SUFFIXES
        and not name.lower().endswith(ITEMS_SUFFIX)
    )


def list_batch_files(incoming_dir: Path) -> list[Path]:
    if not incoming_dir.is_dir():
        return []
    return sorted(p for p in incoming_dir.iterdir() if is_batch_file(p))


def scan_incoming(incoming_dir: Path, known: dict[str, tuple[int, int, str]] | None = None) -> list[IncomingFile]:
    """Every batch file with its hash, in name order.

    ``known`` maps a file name to ``(size, mtime_ns, sha256)`` seen before: an
    unchanged file is not hashed again (the sensor keeps this in its cursor).
    """
    known = known or {}
    out = []
    for path in list_batch_files(incoming_dir):
        st = path.stat()
        seen = known.get(path.name)
        if seen is not None and seen[0] == st.st_size and seen[1] == st.st_mtime_ns:
            sha = seen[2]
        else:
            sha = file_sha256(path)
        out.append(IncomingFile(path, sha))
    return out


def find_batch_file(incoming_dir: Path, key: str) -> IncomingFile | None:
    """The file of ``incoming_dir`` whose content has the key's hash (and name, when several do)."""
    want = key_hash(key)
    matches = [f for f in scan_incoming(incoming_dir) if f.sha256.startswith(want)]
    exact = [f for f in matches if f.key == key]
    return (exact or matches or [None])[0]


def items_file_for(batch_path: Path) -> Path:
    return batch_path.with_name(batch_path.stem + ITEMS_SUFFIX)


def read_catalog_items(dataset_dir: str | Path) -> tuple[pa.Table | None, list[str]]:
    """``items.csv`` and every ``incoming/*_items.csv``, merged (a later file wins for an item listed twice).

    Returns the table (None when there is no items file at all) and the files read, in order.
    """
    dataset_dir = Path(dataset_dir)
    files = []
    if (dataset_dir / ITEMS_FILE_NAME).is_file():
        files.append((dataset_dir / ITEMS_FILE_NAME, ITEMS_FILE_NAME))
    incoming = dataset_dir / INCOMING_DIR
    if incoming.is_dir():
        for p in sorted(incoming.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(ITEMS_SUFFIX):
                files.append((p, f"{INCOMING_DIR}/{p.name}"))
    if not files:
        return None, []
    tables = []
    for order, (path, name) in enumerate(files):
        t = read_items(path, file=name)
        tables.append(t.append_column("file_order", pa.array([order] * t.num_rows, pa.int64())))
    merged = pa.concat_tables(tables)
    # keep each item's row from the last file listing it
    ids = merged.column("item_id").to_numpy()
    order = np.lexsort((-merged.column("file_order").to_numpy(), ids))
    first = np.ones(order.size, bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    merged = merged.take(pa.array(order[first])).drop_columns(["file_order"])
    return merged, [name for _, name in files]
