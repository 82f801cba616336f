"""The feature store: ``.npy`` shards on disk, indexed by the DuckDB table ``embedding_index``.

Layout: ``<features_dir>/<backbone>/<weights tag made file-safe>/<shard>.{ids,pooled,spatial}.npy``
with pooled features float32 ``[n, d]``, spatial maps float16 ``[n, regions, channels]`` and the
item ids ``int64 [n]`` (a cross-check of the index). Every extraction run writes a NEW shard
(temp files renamed into place once complete), then points the index rows at it in one
transaction; shards nobody references any more are deleted afterwards. Readers memory-map the
shards (``np.load(mmap_mode='r', allow_pickle=False)``) and only serve rows whose image is still
``ok`` with the same content hash, computed with the backbone's current weights. Every shard file's
size and SHA-256 are recorded with the index rows and checked before the file is read
(:mod:`~visrec_pipeline.embeddings.shard_files`); the free space is checked and the disk blocks
reserved before a shard is written, so a full disk is an ``OSError(ENOSPC)``, not a SIGBUS.
"""

from __future__ import annotations

import errno
import re
import sys
import time
import uuid
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import duckdb
import numpy as np
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.diskspace import no_space_error, require_free_space, reserve
from visrec_pipeline.embeddings import shard_files
from visrec_pipeline.embeddings.feature_rows import FeatureRows
from visrec_pipeline.embeddings.shard_files import DamagedShardError, FileDigest

KINDS = ("ids", "pooled", "spatial")
_SHARD = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_BACKBONE = re.compile(r"^[a-z0-9_]+$")
ORPHAN_AGE_S = 3600.0  # unreferenced shards older than this are leftovers of failed runs


class FeaturesNotFoundError(LookupError):
    """No features were ever computed for a backbone in this database."""


def ensure_tables(conn: duckdb.DuckDBPyConnection) -> None:
    db.run_sql(conn, "embeddings_tables")


def safe_tag(weights_tag: str) -> str:
    return _UNSAFE.sub("_", weights_tag.replace("=", "-")).strip("._") or "untagged"


def shard_path(features_dir: str | Path, backbone: str, weights_tag: str, shard: str, kind: str) -> Path:
    # Names come from the index; never trust them as path fragments without checking.
    if not _BACKBONE.match(backbone) or not _SHARD.match(shard) or kind not in KINDS:
        raise ValueError(f"invalid feature shard reference {backbone!r}/{shard!r}/{kind!r}")
    return Path(features_dir) / backbone / safe_tag(weights_tag) / f"{shard}.{kind}.npy"


CALIBRATION_PREFIX = "int8_calibration"


def calibration_path(features_dir: str | Path, backbone: str, weights_tag: str, revision: int) -> Path:
    """Where the int8 calibration images of one feature set live (see embeddings/int8.py): next to its
    shards, kept while the set has any and removed with them."""
    if not _BACKBONE.match(backbone):
        raise ValueError(f"invalid backbone name {backbone!r}")
    return Path(features_dir) / backbone / safe_tag(weights_tag) / f"{CALIBRATION_PREFIX}.r{int(revision)}.npy"


def new_shard_name() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


class ShardWriter:
    """Writes one new shard (one row per entry of ``item_ids``) through memory-mapped temp files.

    Use as a context manager: on a clean exit the files are fsynced and renamed into place
    (``shard`` and ``digests`` are then set); on an error they are removed. Rows never written stay zero.
    """

    HEADER_BYTES = 4096  # an upper bound of one .npy header, for the free-space check

    def __init__(self, features_dir: str | Path, backbone: str, weights_tag: str, item_ids: np.ndarray):
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.name = new_shard_name()
        self._paths = {k: shard_path(features_dir, backbone, weights_tag, self.name, k) for k in KINDS}
        self._stack = ExitStack()
        self._arrays: dict[str, np.memmap] = {}
        self.shard: str | None = None
        self.digests: dict[str, FileDigest] = {}  # kind -> size and SHA-256 of the files written

    def __enter__(self) -> "ShardWriter":
        self._stack.__enter__()
        return self

    def _open(self, kind: str, shape: tuple[int, ...], dtype) -> np.memmap:
        final = self._paths[kind]
        tmp = self._stack.enter_context(atomic_path(final, suffix=".npy"))
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise no_space_error(final, int(np.prod(shape)) * np.dtype(dtype).itemsize) from exc
            raise
        self._arrays[kind] = arr
        # the file is sparse so far: a page written later on a full disk would be a SIGBUS
        reserve(tmp, tmp.stat().st_size, report_as=final)
        return arr

    def _require_space(self, pooled_row: tuple[int, ...], spatial_row: tuple[int, ...] | None) -> None:
        row_bytes = 4 * int(np.prod(pooled_row)) + 8 + (2 * int(np.prod(spatial_row)) if spatial_row else 0)
        require_free_space(self._paths["pooled"], len(self.item_ids) * row_bytes + 3 * self.HEADER_BYTES)

    def write(self, positions: np.ndarray, pooled: np.ndarray, spatial: np.ndarray | None) -> None:
        n = len(self.item_ids)
        if "pooled" not in self._arrays:
            self._require_space(pooled.shape[1:], None if spatial is None else spatial.shape[1:])
            self._open("pooled", (n, *pooled.shape[1:]), np.float32)
            if spatial is not None:
                self._open("spatial", (n, *spatial.shape[1:]), np.float16)
        self._arrays["pooled"][positions] = pooled
        if spatial is not None:
            self._arrays["spatial"][positions] = spatial

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and self._arrays:
                self._open("ids", self.item_ids.shape, np.int64)[:] = self.item_ids
            for kind in list(self._arrays):
                self._arrays.pop(kind).flush()  # and unmap, before the files are renamed or removed
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.__exit__(exc_type, exc, tb)
        if exc_type is None and self._paths["pooled"].exists():
            # read back once (from the page cache): the reference every later read is checked against
            self.digests = {k: shard_files.digest(p) for k, p in self._paths.items() if p.exists()}
            self.shard = self.name
        return False


# --- index maintenance (the writer side) -------------------------------------------------------


def referenced_shards(conn: duckdb.DuckDBPyConnection, backbone: str) -> set[tuple[str, str]]:
    rows = conn.execute("SELECT DISTINCT weights_tag, shard FROM embedding_index WHERE backbone = ?", [backbone])
    return {(t, s) for t, s in rows.fetchall()}


def missing_shards(conn: duckdb.DuckDBPyConnection, features_dir: str | Path, backbone: str) -> list[str]:
    """Referenced shards whose pooled file is gone (their items must be recomputed)."""
    return sorted(
        s for t, s in referenced_shards(conn, backbone) if not shard_path(features_dir, backbone, t, s, "pooled").is_file()
    )


@dataclass(frozen=True)
class ShardCheck:
    """The shards one backbone's index references, checked file by file against their records."""

    damaged: dict[str, DamagedShardError]  # shard -> the first damaged (or vanished) file found in it
    first_digests: dict[tuple[str, str], dict[str, FileDigest]]  # (tag, shard) -> digests of unrecorded shards

    @property
    def damaged_shards(self) -> list[str]:
        return sorted(self.damaged)


def check_shards(
    features_dir: str | Path,
    backbone: str,
    referenced: Iterable[tuple[str, str]],
    records: dict[tuple[str, str], FileDigest],
) -> ShardCheck:
    """Hash every file of the ``referenced`` ``(weights_tag, shard)`` and compare with ``records``
    (:func:`shard_files.recorded`); shards with no record (indexed before hashes were recorded) are
    checked against their ``.npy`` headers and hashed for recording. Reads whole files: call it with
    no connection held. A shard whose pooled file is gone is left to :func:`missing_shards`."""
    damaged: dict[str, DamagedShardError] = {}
    first: dict[tuple[str, str], dict[str, FileDigest]] = {}
    for tag, shard in sorted(referenced):
        paths = {k: shard_path(features_dir, backbone, tag, shard, k) for k in KINDS}
        if not paths["pooled"].is_file():
            continue
        kinds = [k for k in KINDS if (shard, k) in records]
        try:
            if kinds:
                for kind in kinds:
                    if not paths[kind].is_file():
                        raise DamagedShardError(paths[kind], backbone, "the file is gone")
                    shard_files.verify(paths[kind], backbone, records[(shard, kind)])
            else:
                if not paths["ids"].is_file():
                    raise DamagedShardError(paths["ids"], backbone, "the file is gone")
                present = [k for k in KINDS if paths[k].is_file()]
                for kind in present:
                    shard_files.verify(paths[kind], backbone, None)
                first[(tag, shard)] = {k: shard_files.digest(paths[k]) for k in present}
        except DamagedShardError as exc:
            damaged[shard] = exc
    return ShardCheck(damaged, first)


def todo_items(
    conn: duckdb.DuckDBPyConnection,
    features_dir: str | Path,
    backbone: str,
    weights_tag: str,
    revision: int = 0,
    damaged_shards: Iterable[str] = (),
) -> pd.DataFrame:
    """``item_id, content_hash, path`` of the ok images needing features under ``weights_tag`` at
    ``revision`` (the items of ``damaged_shards`` included)."""
    missing = sorted(set(missing_shards(conn, features_dir, backbone)) | set(damaged_shards))
    return db.query_df(
        conn,
        "embeddings_todo",
        {"backbone": backbone, "weights_tag": weights_tag, "missing_shards": missing, "revision": int(revision)},
    )


def commit_index(
    conn: duckdb.DuckDBPyConnection,
    backbone: str,
    weights_tag: str,
    shard: str | None,
    rows: pd.DataFrame,
    provenance: dict,
    revision: int = 0,
    *,
    digests: dict[str, FileDigest] | None = None,
    unusable_shards: Iterable[str] = (),
    first_digests: dict[tuple[str, str], dict[str, FileDigest]] | None = None,
    shards: Mapping[str, dict[str, FileDigest]] | None = None,
) -> int:
    """Point the index at the new shard's ``rows`` (``item_id, row, content_hash``), drop rows of
    other weights, of items no longer ok and of ``unusable_shards`` (gone or damaged: the rows of
    their items that were not recomputed), record the new shard's file ``digests``, the
    ``first_digests`` of shards indexed before digests were recorded, and provenance; one
    transaction. Returns rows dropped.

    Several new shards (written by distributed workers): ``shard`` None, ``rows`` with a ``shard``
    column naming one of ``shards`` (new shard -> its file digests)."""
    if shards is not None:
        if shard is not None or digests is not None:
            raise ValueError("give either one shard (shard, digests) or several (shards), not both")
        unknown = set(rows["shard"]) - set(shards) if len(rows) else set()
        if unknown:
            raise ValueError(f"index rows point at shards that were not written: {sorted(unknown)[:5]}")
    elif len(rows) and not shard:
        raise ValueError("index rows given without the shard that holds them")
    ensure_tables(conn)
    if shards is None:
        rows = rows.assign(shard=shard or "")
    new_rows = rows.assign(backbone=backbone, weights_tag=weights_tag, revision=int(revision))[
        ["backbone", "weights_tag", "item_id", "shard", "row", "content_hash", "revision"]
    ]
    conn.register("_new_embedding_rows", new_rows)
    try:
        with db.transaction(conn):
            before = conn.execute("SELECT count(*) FROM embedding_index WHERE backbone = ?", [backbone]).fetchone()[0]
            db.run_sql(conn, "embeddings_prune", {"backbone": backbone, "weights_tag": weights_tag})
            unusable = sorted(set(unusable_shards))
            if unusable:
                conn.execute(
                    "DELETE FROM embedding_index WHERE backbone = ? AND list_contains(?::VARCHAR[], shard)",
                    [backbone, unusable],
                )
            pruned = before - conn.execute(
                "SELECT count(*) FROM embedding_index WHERE backbone = ?", [backbone]
            ).fetchone()[0]
            if len(new_rows):
                conn.execute(
                    "INSERT OR REPLACE INTO embedding_index "
                    '(backbone, weights_tag, item_id, shard, "row", content_hash, computed_at, revision) '
                    'SELECT backbone, weights_tag, item_id, shard, "row", content_hash, now()::TIMESTAMP, revision '
                    "FROM _new_embedding_rows"
                )
                if digests:
                    shard_files.record(conn, backbone, weights_tag, shard, digests)
                for name, files in (shards or {}).items():
                    shard_files.record(conn, backbone, weights_tag, name, files)
            for (tag, old_shard), old_digests in (first_digests or {}).items():
                shard_files.record(conn, backbone, tag, old_shard, old_digests)
            p = provenance
            conn.execute(
                "INSERT OR REPLACE INTO embedding_provenance VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
                [
                    backbone,
                    weights_tag,
                    p["weights_used"],
                    p.get("weights_warning"),
                    p["pooled_node"],
                    p["pooled_dim"],
                    p.get("spatial_node"),
                    p.get("spatial_regions"),
                    p.get("spatial_channels"),
                    p["preprocessing"],
                ],
            )
    finally:
        conn.unregister("_new_embedding_rows")
    return int(pruned)


def remove_unreferenced(
    conn: duckdb.DuckDBPyConnection,
    features_dir: str | Path,
    backbone: str,
    superseded: Iterable[tuple[str, str]] = (),
    orphan_age_s: float = ORPHAN_AGE_S,
) -> int:
    """Delete shard files the index no longer references: at once for shards this run superseded,
    after ``orphan_age_s`` for anything else (a concurrent writer's shard may not be committed yet)."""
    shard_files.forget_unreferenced(conn, backbone)
    referenced = {(safe_tag(t), s) for t, s in referenced_shards(conn, backbone)}
    referenced_tags = {t for t, _ in referenced}
    superseded = {(safe_tag(t), s) for t, s in superseded}
    root = Path(features_dir) / backbone
    if not root.is_dir():
        return 0
    removed = 0
    now = time.time()
    for tag_dir in (d for d in root.iterdir() if d.is_dir()):
        for f in tag_dir.iterdir():
            shard = f.name.split(".", 1)[0]
            key = (tag_dir.name, shard)
            if key in referenced or (shard == CALIBRATION_PREFIX and tag_dir.name in referenced_tags):
                continue
            stale = key in superseded or now - f.stat().st_mtime > orphan_age_s
            if stale and f.is_file():
                f.unlink(missing_ok=True)
                removed += 1
        if not any(tag_dir.iterdir()):
            tag_dir.rmdir()
    return removed


def compact(
    connect: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]],
    features_dir: str | Path,
    backbone: str,
    *,
    max_shards: int = 20,
    chunk: int = 4096,
) -> str | None:
    """When the current weights' rows are spread over more than ``max_shards`` shards, copy them
    into one new shard (no connection held while copying) and repoint the index rows that did not
    change meanwhile. Returns the new shard name, or None if there was nothing to do. The old
    shards are left for :func:`remove_unreferenced`."""
    with connect() as conn:
        prov = conn.execute("SELECT weights_tag FROM embedding_provenance WHERE backbone = ?", [backbone]).fetchone()
        if prov is None:
            return None
        tag = prov[0]
        rows = conn.execute(
            'SELECT item_id, shard, "row" FROM embedding_index WHERE backbone = ? AND weights_tag = ? ORDER BY item_id',
            [backbone, tag],
        ).df()
        records = shard_files.recorded(conn, backbone)
    if rows["shard"].nunique() <= max_shards:
        return None
    item_ids = rows["item_id"].to_numpy(np.int64)
    with ShardWriter(features_dir, backbone, tag, item_ids) as writer:
        for shard, group in rows.groupby("shard", sort=True):
            # checked first: a damaged shard copied into a new one would get a valid hash
            pooled = _map_checked(features_dir, backbone, tag, shard, "pooled", records)
            spath = shard_path(features_dir, backbone, tag, shard, "spatial")
            spatial = _map_checked(features_dir, backbone, tag, shard, "spatial", records) if spath.exists() else None
            dst_all = group.index.to_numpy()
            src_all = group["row"].to_numpy(np.int64)
            for lo in range(0, len(src_all), chunk):
                src, dst = src_all[lo : lo + chunk], dst_all[lo : lo + chunk]
                writer.write(dst, np.asarray(pooled[src]), None if spatial is None else np.asarray(spatial[src]))
    moved = rows.rename(columns={"shard": "old_shard", "row": "old_row"}).assign(
        new_row=np.arange(len(item_ids), dtype=np.int64)
    )
    with connect() as conn:
        conn.register("_compacted_rows", moved)
        try:
            with db.transaction(conn):
                conn.execute(
                    'UPDATE embedding_index SET shard = ?, "row" = m.new_row FROM _compacted_rows m '
                    "WHERE embedding_index.backbone = ? AND embedding_index.weights_tag = ? "
                    "AND embedding_index.item_id = m.item_id AND embedding_index.shard = m.old_shard "
                    'AND embedding_index."row" = m.old_row',
                    [writer.shard, backbone, tag],
                )
                shard_files.record(conn, backbone, tag, writer.shard, writer.digests)
        finally:
            conn.unregister("_compacted_rows")
    return writer.shard


def replace_clusters(conn: duckdb.DuckDBPyConnection, backbone: str, item_ids: np.ndarray, clusters: np.ndarray) -> None:
    """Replace ``backbone``'s rows of ``visual_clusters`` with ``item_ids[i] -> clusters[i]`` in one transaction."""
    frame = pd.DataFrame({"backbone": backbone, "item_id": item_ids, "cluster": clusters.astype(np.int32)})
    conn.register("_new_clusters", frame)
    try:
        with db.transaction(conn):
            conn.execute("DELETE FROM visual_clusters WHERE backbone = ?", [backbone])
            conn.execute("INSERT INTO visual_clusters SELECT backbone, item_id, cluster FROM _new_clusters")
    finally:
        conn.unregister("_new_clusters")


# --- readers ---------------------------------------------------------------------------------


def feature_provenance(conn: duckdb.DuckDBPyConnection, backbone: str) -> dict:
    """Weights tag/warning, dimensions and served item count of ``backbone``'s features; ``{}`` if never computed."""
    if not db.table_exists(conn, "embedding_provenance"):
        return {}
    df = conn.execute("SELECT * FROM embedding_provenance WHERE backbone = ?", [backbone]).df()
    if df.empty:
        return {}
    rec = {k: (None if pd.isna(v) else v) for k, v in df.iloc[0].to_dict().items()}
    rec["n_items"] = int(
        conn.execute(
            "SELECT count(*) FROM embedding_index WHERE backbone = ? AND weights_tag = ?", [backbone, rec["weights_tag"]]
        ).fetchone()[0]
    )
    for k in ("pooled_dim", "spatial_regions", "spatial_channels"):
        if rec.get(k) is not None:
            rec[k] = int(rec[k])
    return rec


def index_weights(conn: duckdb.DuckDBPyConnection, backbone: str) -> tuple[str | None, int] | None:
    """(a weights tag of ``backbone``'s index rows, their count); None when there is no index table."""
    if not db.table_exists(conn, "embedding_index"):
        return None
    tag, n = conn.execute(
        "SELECT any_value(weights_tag), count(*) FROM embedding_index WHERE backbone = ?", [backbone]
    ).fetchone()
    return tag, int(n)


def index_weights_tags(conn: duckdb.DuckDBPyConnection) -> list:
    """Every distinct weights tag in the index (any backbone); empty when there is no index table."""
    if not db.table_exists(conn, "embedding_index"):
        return []
    return [r[0] for r in conn.execute("SELECT DISTINCT weights_tag FROM embedding_index").fetchall()]


def _provenance_or_raise(conn: duckdb.DuckDBPyConnection, backbone: str) -> dict:
    prov = feature_provenance(conn, backbone)
    if not prov:
        raise FeaturesNotFoundError(f"no features for backbone {backbone!r}: materialize embeddings_{backbone} first")
    return prov


def _served_rows(conn: duckdb.DuckDBPyConnection, backbone: str) -> pd.DataFrame:
    if not db.table_exists(conn, "item_images"):
        raise FeaturesNotFoundError("table item_images is missing: features are served only for current ok images")
    return db.query_df(conn, "embeddings_served", {"backbone": backbone})


@dataclass(frozen=True)
class FeatureSnapshot:
    """The served rows of one backbone at one moment: read it with a connection, gather without one."""

    backbone: str
    features_dir: Path
    provenance: dict
    served: pd.DataFrame  # item_id (sorted), weights_tag, shard, row
    digests: dict[tuple[str, str], FileDigest] = field(default_factory=dict)  # (shard, kind) -> recorded digest

    @property
    def item_ids(self) -> np.ndarray:
        return self.served["item_id"].to_numpy(np.int64)

    def pooled(self, item_ids) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.provenance["pooled_dim"],)
        return _gather(self, _ids(item_ids), "pooled", shape, np.float32)

    def iter_pooled(self, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(item_ids, pooled float32 [n, d])`` of every served item in chunks, shard by shard, read
        straight from the memory maps (no gather into one array: for a scan over all items)."""
        if self.served.empty:
            return
        shape = (self.provenance["pooled_dim"],)
        for (tag, shard), group in self.served.groupby(["weights_tag", "shard"], sort=False):
            group = group.sort_values("row", kind="stable")
            rows, ids = group["row"].to_numpy(np.int64), group["item_id"].to_numpy(np.int64)
            arr = _open_shard(self, tag, shard, "pooled", shape, rows, ids)
            for lo in range(0, len(rows), chunk):
                yield ids[lo : lo + chunk], arr[rows[lo : lo + chunk]]

    def spatial(self, item_ids) -> tuple[np.ndarray, np.ndarray]:
        if self.provenance.get("spatial_regions") is None:
            raise FeaturesNotFoundError(f"backbone {self.backbone!r} stores no spatial features")
        shape = (self.provenance["spatial_regions"], self.provenance["spatial_channels"])
        return _gather(self, _ids(item_ids), "spatial", shape, np.float16)


    def row_shape(self, kind: str) -> tuple[int, ...]:
        prov = self.provenance
        if kind == "pooled":
            return (int(prov["pooled_dim"]),)
        if prov.get("spatial_regions") is None:
            raise FeaturesNotFoundError(f"backbone {self.backbone!r} stores no spatial features")
        return int(prov["spatial_regions"]), int(prov["spatial_channels"])

    def open(self, item_ids, kind: str):
        """See :func:`open_features` (this snapshot's rows; no connection needed)."""
        item_ids = _ids(item_ids)
        shape, dtype = self.row_shape(kind), (np.float32 if kind == "pooled" else np.float16)
        served = self.served
        have = served["item_id"].to_numpy(np.int64)  # sorted by the query
        pos = np.minimum(np.searchsorted(have, item_ids), max(len(have) - 1, 0))
        found = (have[pos] == item_ids) if len(have) else np.zeros(len(item_ids), bool)
        keys = pd.MultiIndex.from_arrays([served["weights_tag"], served["shard"]])
        codes, uniques = pd.factorize(keys)
        shard_of = np.where(found, codes[pos] if len(have) else -1, -1).astype(np.int32)
        rows = np.where(found, served["row"].to_numpy(np.int64)[pos] if len(have) else 0, 0)
        shards = [tuple(u) for u in uniques]
        for s in np.unique(shard_of[shard_of >= 0]).tolist():  # the ids file holds what the index says
            at = np.flatnonzero(shard_of == s)
            order = np.argsort(rows[at], kind="stable")
            _open_shard(self, *shards[s], kind, shape, rows[at][order], item_ids[at][order])
        if len(item_ids) and found.all() and len(shards) == 1 and np.array_equal(rows, rows[0] + np.arange(len(rows))):
            whole = _open_shard(self, *shards[0], kind, shape, rows[:1], item_ids[:1])
            return whole[rows[0] : rows[0] + len(rows)], found  # a memmap view: nothing read yet

        def opener(s: int) -> np.ndarray:
            tag, shard = shards[s]
            return _map_checked(self.features_dir, self.backbone, tag, shard, kind, self.digests)

        return FeatureRows(shard_of, rows, shape, dtype, opener, len(shards)), found


def _ids(item_ids) -> np.ndarray:
    return np.asarray(item_ids, dtype=np.int64).reshape(-1)


def snapshot(conn_or_path, features_dir, backbone: str) -> FeatureSnapshot:
    """Read the index (``conn_or_path``: an open DuckDB connection or the database path)."""
    if isinstance(conn_or_path, duckdb.DuckDBPyConnection):
        return _snapshot(conn_or_path, features_dir, backbone)
    with db.connect(conn_or_path) as conn:
        return _snapshot(conn, features_dir, backbone)


def _snapshot(conn: duckdb.DuckDBPyConnection, features_dir, backbone: str) -> FeatureSnapshot:
    prov, served = _provenance_or_raise(conn, backbone), _served_rows(conn, backbone)
    # a database not yet touched by an embeddings run of this version has no digests: headers are checked
    digests = shard_files.recorded(conn, backbone) if db.table_exists(conn, "embedding_shard_files") else {}
    return FeatureSnapshot(backbone, Path(features_dir), prov, served, digests)


def _gather(snap: FeatureSnapshot, item_ids: np.ndarray, kind: str, shape, dtype):
    served = snap.served
    out = np.zeros((len(item_ids), *shape), dtype=dtype)
    mask = np.zeros(len(item_ids), dtype=bool)
    if served.empty or len(item_ids) == 0:
        return out, mask
    have = served["item_id"].to_numpy(np.int64)  # sorted by the query
    pos = np.minimum(np.searchsorted(have, item_ids), len(have) - 1)
    found = have[pos] == item_ids
    src = pos[found]
    sel = pd.DataFrame(
        {
            "weights_tag": served["weights_tag"].to_numpy()[src],
            "shard": served["shard"].to_numpy()[src],
            "row": served["row"].to_numpy(np.int64)[src],
            "dst": np.flatnonzero(found),
        }
    )
    for (tag, shard), group in sel.groupby(["weights_tag", "shard"], sort=False):
        group = group.sort_values("row", kind="stable")  # sequential reads from the memory map
        rows = group["row"].to_numpy(np.int64)
        dst = group["dst"].to_numpy(np.int64)
        out[dst] = _open_shard(snap, tag, shard, kind, shape, rows, item_ids[dst])[rows]
        mask[dst] = True
    return out, mask


def _map_checked(features_dir, backbone: str, tag: str, shard: str, kind: str, records) -> np.ndarray:
    """A shard file memory-mapped after checking it against its recorded digest (or its header)."""
    path = shard_path(features_dir, backbone, tag, shard, kind)
    shard_files.verify(path, backbone, records.get((shard, kind)))
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _open_shard(snap: FeatureSnapshot, tag: str, shard: str, kind: str, shape, rows, expected_ids) -> np.ndarray:
    """The memory-mapped ``kind`` array of a shard, after checking both files and that ``rows`` hold ``expected_ids``."""
    features_dir, backbone = snap.features_dir, snap.backbone
    ids = _map_checked(features_dir, backbone, tag, shard, "ids", snap.digests)
    if rows.max() >= len(ids) or not np.array_equal(ids[rows], expected_ids):
        raise ValueError(f"feature shard {backbone}/{shard} does not hold the items the index says (corrupt store)")
    arr = _map_checked(features_dir, backbone, tag, shard, kind, snap.digests)
    if arr.shape[1:] != tuple(shape):
        raise ValueError(f"feature shard {backbone}/{shard} {kind} has shape {arr.shape[1:]}, expected {tuple(shape)}")
    return arr


def _load(conn_or_path, features_dir, backbone: str, item_ids, kind: str) -> tuple[np.ndarray, np.ndarray]:
    # A shard can be compacted away between reading the index and opening the file: read again once.
    for attempt in (1, 2):
        snap = snapshot(conn_or_path, features_dir, backbone)
        try:
            return snap.pooled(item_ids) if kind == "pooled" else snap.spatial(item_ids)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def load_pooled(db_path, features_dir, backbone: str, item_ids) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features float32 ``[n, d]`` aligned with ``item_ids`` and a bool mask ``[n]``; items
    without current features get zeros and False. ``db_path`` may also be an open DuckDB connection."""
    return _load(db_path, features_dir, backbone, item_ids, "pooled")


def load_spatial(db_path, features_dir, backbone: str, item_ids) -> tuple[np.ndarray, np.ndarray]:
    """Spatial maps float16 ``[n, regions, channels]`` (ResNet-50: 49 x 2048) and a bool mask ``[n]``."""
    return _load(db_path, features_dir, backbone, item_ids, "spatial")


def open_features(conn_or_path, features_dir, backbone: str, item_ids, kind: str = "pooled"):
    """``(rows, mask)``: ``backbone``'s ``kind`` (``pooled`` or ``spatial``) features aligned with
    ``item_ids``, read without gathering them into memory, and a bool mask ``[n]`` (False: no
    current features; such rows read as zeros).

    ``rows`` is the shard's read-only ``np.memmap`` itself when the requested items are one
    contiguous run of rows of one shard in the same order (every catalogue item has features and
    the shards are compacted, or the features were brought with the dataset); otherwise a
    :class:`~visrec_pipeline.embeddings.feature_rows.FeatureRows` that reads only the rows a call
    asks for. Both have ``shape``, ``dtype``, ``ndim`` and numpy indexing; scan them with
    :func:`visrec_pipeline.recsys.row_blocks.iter_row_blocks`."""
    if kind not in ("pooled", "spatial"):
        raise ValueError(f"unknown feature kind {kind!r}: pooled or spatial")
    for attempt in (1, 2):  # a shard compacted away between the index read and the open: read again once
        snap = snapshot(conn_or_path, features_dir, backbone)
        try:
            return snap.open(item_ids, kind)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _provenance_from(conn_or_path, backbone: str) -> dict:
    if isinstance(conn_or_path, duckdb.DuckDBPyConnection):
        return _provenance_or_raise(conn_or_path, backbone)
    with db.connect(conn_or_path) as conn:
        return _provenance_or_raise(conn, backbone)


def feature_dim(db_path, backbone: str) -> int:
    """Dimension of ``backbone``'s pooled features."""
    return int(_provenance_from(db_path, backbone)["pooled_dim"])


def spatial_shape(db_path, backbone: str) -> tuple[int, int] | None:
    """``(regions, channels)`` of ``backbone``'s spatial maps, or None if it stores none."""
    prov = _provenance_from(db_path, backbone)
    if prov.get("spatial_regions") is None:
        return None
    return int(prov["spatial_regions"]), int(prov["spatial_channels"])


def served_item_ids(db_path, backbone: str) -> np.ndarray:
    """Sorted ids of the items whose features are currently served."""
    return snapshot(db_path, ".", backbone).item_ids
