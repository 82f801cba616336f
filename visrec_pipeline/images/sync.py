"""Bring every catalogued item's image into the store, resumably.

:func:`sync_item_images` reads ``item_catalog`` joined with ``item_images``,
picks the items that need work (never attempted; failed ones when
``retry_failed``; ``ok`` rows whose thumbnail file has gone; folder items
marked ``missing`` whose file has since appeared), and processes them in
chunks: decode/resize/encode runs in a small worker pool, each chunk's rows
are upserted in one transaction. A run killed half-way keeps every committed
chunk; the next run resumes with the rest, and rows are keyed by ``item_id``
so nothing is ever duplicated. Thumbnails written by an uncommitted chunk are
harmless (content-addressed, rewritten identically).

Plain Python (DuckDB, pandas, Pillow); the Dagster asset is a thin wrapper.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import duckdb
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.images.commons import CommonsClient, CommonsError, MissingFile
from visrec_pipeline.images.store import DatasetImages, ImageStore
from visrec_pipeline.images.table import catalogue_with_images, ensure_table, upsert_rows
from visrec_pipeline.images.validate import ImageLimits, ImageStatus
from visrec_pipeline.images.worker import ItemImageRow, thumbnail_bytes_to_store, thumbnail_file_to_store

DEFAULT_CHUNK_SIZE = 200
DEFAULT_WORKERS = 2
_MAX_UNDECODED_DOWNLOADS = 8

PoolKind = Literal["thread", "process"]


# ---------------------------------------------------------------- sources


class ImageSource(Protocol):
    name: str

    def submit(
        self, items: pd.DataFrame, pool: Executor, store: ImageStore, limits: ImageLimits
    ) -> list["Future | _SizedFuture | ItemImageRow"]:
        """Start work for ``items`` (columns item_id, title); rows known at once may be returned directly."""
        ...


class FolderImageSource:
    """Images from a dataset's ``images/<item_id>.<jpg|jpeg|png>``."""

    name = "folder"

    def __init__(self, images_dir: str | Path):
        self.images_dir = Path(images_dir)
        self.images = DatasetImages(self.images_dir)

    def has_image(self, item_id: int) -> bool:
        return self.images.find(item_id) is not None

    def submit(self, items, pool, store, limits):
        out: list[Future | ItemImageRow] = []
        for item_id in items["item_id"].tolist():
            path = self.images.find(item_id)
            if path is None:
                out.append(
                    ItemImageRow(
                        item_id,
                        ImageStatus.MISSING.value,
                        f"no {item_id}.jpg, .jpeg or .png in the dataset's images/ folder",
                        source=self.name,
                    )
                )
            elif (outside := self.images.outside_reason(path)) is not None:
                out.append(ItemImageRow(item_id, ImageStatus.CORRUPT.value, outside, source=self.name))
            else:
                out.append(pool.submit(thumbnail_file_to_store, item_id, str(path), str(store.root), limits, self.name))
        return out


class CommonsImageFetcher:
    """Images from Wikimedia Commons by file title.

    API lookups and downloads run in series on the calling thread (Wikimedia
    asks clients not to parallelise); decoding runs in the pool meanwhile.
    ``orig_width``/``orig_height`` come from ``imageinfo`` (the original file),
    not from the downloaded thumbnail.
    """

    name = "commons"

    def __init__(self, client: CommonsClient, *, verify_original: bool = False):
        self.client = client
        self.verify_original = verify_original

    def submit(self, items, pool, store, limits):
        ids = items["item_id"].tolist()
        titles = items["title"].tolist()
        asked = [t for t in titles if isinstance(t, str) and t.strip()]
        try:
            infos = self.client.image_info(asked)
        except CommonsError as exc:  # the whole lookup failed: every item of the chunk gets the reason
            reason = f"imageinfo lookup failed: {exc.reason}"
            return [ItemImageRow(i, exc.status.value, reason, source=self.name) for i in ids]
        out: list[Future | _SizedFuture | ItemImageRow] = []
        inflight: deque[Future] = deque()
        for item_id, title in zip(ids, titles):
            if not (isinstance(title, str) and title.strip()):
                reason = "no title in item_catalog to look up on Commons"
                out.append(ItemImageRow(item_id, "missing", reason, source=self.name))
                continue
            info = infos.get(title)
            if info is None or isinstance(info, MissingFile):
                reason = info.reason if info is not None else "not returned by the API"
                out.append(ItemImageRow(item_id, "missing", f"{title}: {reason}", source=self.name))
                continue
            try:
                data = self.client.download(info, verify_original=self.verify_original)
            except CommonsError as exc:
                out.append(
                    ItemImageRow(item_id, exc.status.value, exc.reason, None, None, info.width, info.height, self.name)
                )
                continue
            future = pool.submit(thumbnail_bytes_to_store, item_id, data, str(store.root), limits, self.name)
            out.append(_SizedFuture(future, info.width, info.height))
            inflight.append(future)
            while len(inflight) > _MAX_UNDECODED_DOWNLOADS:  # bound the downloaded bytes held in memory
                inflight.popleft().result()
        return out


class _SizedFuture:
    """A pending row whose orig_width/orig_height are replaced by the original file's."""

    def __init__(self, future: Future, width: int, height: int):
        self.future, self.width, self.height = future, width, height

    def result(self) -> ItemImageRow:
        row: ItemImageRow = self.future.result()
        if self.width and self.height:
            return dataclasses.replace(row, orig_width=self.width, orig_height=self.height)
        return row


# ---------------------------------------------------------------- what to (re)process


def pending_items(
    conn: duckdb.DuckDBPyConnection,
    workspace_root: Path,
    *,
    retry_failed: bool = False,
    folder: FolderImageSource | None = None,
) -> pd.DataFrame:
    """``item_id, title, why`` of the items this run should (re)process, in item_id order."""
    df = catalogue_with_images(conn)
    if df.empty:
        return pd.DataFrame({"item_id": pd.Series(dtype="int64"), "title": pd.Series(dtype="object"), "why": []})
    status = df["status"]
    why = pd.Series(pd.NA, index=df.index, dtype="object")
    why[status.isna()] = "new"
    failed = status.notna() & (status != "ok")
    if retry_failed:
        why[failed] = "retry"
    ok = status == "ok"
    if ok.any():
        gone = [not (workspace_root / p).is_file() for p in df.loc[ok, "path"].tolist()]
        why[df.index[ok][gone]] = "thumbnail file gone"
    if folder is not None and not retry_failed:
        cand = df.index[(status == "missing") & (df["source"] == "folder")]
        appeared = [folder.has_image(int(i)) for i in df.loc[cand, "item_id"].tolist()]
        why[cand[appeared]] = "image appeared"
    todo = df[why.notna()].assign(why=why[why.notna()])
    return todo[["item_id", "title", "why"]].reset_index(drop=True)


# ---------------------------------------------------------------- the sync


@dataclass
class SyncReport:
    source: str
    pending: int
    processed: int = 0
    chunks: int = 0
    elapsed_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # this run's outcomes
    failures: list[ItemImageRow] = field(default_factory=list)  # this run's, first few
    ok_examples: list[tuple[int, str]] = field(default_factory=list)  # this run's (item_id, hash), first few

    @property
    def images_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0


def make_pool(kind: PoolKind, workers: int) -> Executor:
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumbnail")
    if kind == "process":
        # never fork a process that may hold threads (Dagster, DuckDB); forkserver starts clean
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"))
    raise ValueError(f"pool kind must be 'thread' or 'process', got {kind!r}")


def sync_item_images(
    connect: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]],
    source: ImageSource,
    store: ImageStore,
    *,
    workspace_root: Path,
    limits: ImageLimits = ImageLimits(),
    retry_failed: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int = DEFAULT_WORKERS,
    pool_kind: PoolKind = "thread",
    on_chunk: Callable[[int, SyncReport], None] | None = None,
    keep_examples: int = 16,
) -> SyncReport:
    """Process every pending item of ``item_catalog`` with ``source``; commit every ``chunk_size`` items.

    ``connect()`` opens a DuckDB connection (held only to read the pending list
    and to commit each chunk). ``on_chunk(chunk_index, report)`` runs after each
    commit (progress logging).
    """
    if chunk_size <= 0 or workers <= 0:
        raise ValueError("chunk_size and workers must be positive")
    with connect() as conn:
        if not db.table_exists(conn, "item_catalog"):
            raise RuntimeError("table item_catalog does not exist: materialize the item_catalog asset first")
        ensure_table(conn)
        folder = source if isinstance(source, FolderImageSource) else None
        todo = pending_items(conn, workspace_root, retry_failed=retry_failed, folder=folder)
    report = SyncReport(source=source.name, pending=len(todo))
    if todo.empty:
        return report
    store.root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with make_pool(pool_kind, workers) as pool:
        for k, lo in enumerate(range(0, len(todo), chunk_size)):
            chunk = todo.iloc[lo : lo + chunk_size]
            pending = source.submit(chunk, pool, store, limits)
            rows = [p if isinstance(p, ItemImageRow) else p.result() for p in pending]
            with connect() as conn, db.transaction(conn):
                upsert_rows(conn, rows)
            report.processed += len(rows)
            report.chunks += 1
            for r in rows:
                report.counts[r.status] = report.counts.get(r.status, 0) + 1
                if r.status == "ok":
                    if len(report.ok_examples) < keep_examples:
                        report.ok_examples.append((r.item_id, r.content_hash))
                elif len(report.failures) < keep_examples:
                    report.failures.append(r)
            report.elapsed_s = time.perf_counter() - start
            if on_chunk is not None:
                on_chunk(k, report)
    report.elapsed_s = time.perf_counter() - start
    return report
