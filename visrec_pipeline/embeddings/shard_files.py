"""Integrity of the feature store's shard files: SHA-256 recorded when a shard is indexed, checked
before it is read.

Every ``<shard>.{ids,pooled,spatial}.npy`` gets a row of ``embedding_shard_files`` (bytes, SHA-256)
in the transaction that points the index at the shard. Readers check a file before memory-mapping
it; a file whose size or hash differs from the record is refused by name
(:class:`DamagedShardError`), and the embeddings step recomputes the items it held. Hashing a
file costs a full read, so a process hashes each file once: a verified ``(path, size, mtime)`` is
not hashed again by the same process.

Shards indexed before the table existed have no row: readers check only that the file is as long
as its ``.npy`` header says, and the next embeddings run hashes them once and records that hash
(their content at that moment is taken as the reference).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.images.store import file_sha256


class DamagedShardError(ValueError):
    """A feature shard file that is not what was written: truncated, or its bytes changed."""

    def __init__(self, path: Path, backbone: str, problem: str):
        self.path = Path(path)
        self.backbone = backbone
        self.problem = problem
        super().__init__(
            f"feature shard file {self.path} is damaged ({problem}); re-materialize embeddings_{backbone}, "
            "which recomputes the items it held"
        )


# (path, size, mtime_ns) -> SHA-256 this process has verified; small: a few files per feature set
_verified: dict[tuple[str, int, int], str] = {}
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class FileDigest:
    bytes: int
    sha256: str


def digest(path: str | os.PathLike) -> FileDigest:
    """Size and SHA-256 of the file as it is now (which this process then counts as verified)."""
    st = os.stat(path)
    result = FileDigest(st.st_size, file_sha256(path))
    with _verified_lock:
        _verified[(str(path), st.st_size, st.st_mtime_ns)] = result.sha256
    return result


def structure_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with an ``.npy`` file's length against its header (truncated, or trailing
    bytes), or None when it matches; unreadable headers are a problem too."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(fh)
            expected = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = os.fstat(fh.fileno()).st_size
    except (ValueError, EOFError) as exc:
        return f"unreadable .npy header: {exc}"
    if actual != expected:
        return f"{actual:,} bytes, its header says {expected:,}"
    return None


def verify(path: Path, backbone: str, expected: FileDigest | None) -> None:
    """Raise :class:`DamagedShardError` naming ``path`` unless the file matches ``expected`` (or, with
    no record, its own header). ``FileNotFoundError`` when the file is gone."""
    st = os.stat(path)
    if expected is None:
        problem = structure_problem(path)
        if problem:
            raise DamagedShardError(path, backbone, problem)
        return
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if _verified.get(key) == expected.sha256:
            return
    if st.st_size != expected.bytes:
        raise DamagedShardError(path, backbone, f"{st.st_size:,} bytes, {expected.bytes:,} were written")
    if _stamp_matches(path, st, expected.sha256):
        with _verified_lock:
            _verified[key] = expected.sha256
        return
    actual = file_sha256(path)
    if actual != expected.sha256:
        raise DamagedShardError(
            path, backbone, f"SHA-256 {actual[:16]}..., {expected.sha256[:16]}... was recorded when it was written"
        )
    with _verified_lock:
        _verified[key] = actual
    _write_stamp(path, st, actual)


# A full hash of a large shard file (20 GB of feature maps at 100k items) in every step process that
# opens it costs minutes per step. After a full verification the file's identity is kept next to it
# (``<file>.verified.json``: size, mtime, ctime, inode and the hash); a later process that finds the
# same identity trusts the hash. Any write to the file changes its ctime (which no one can set back),
# a replaced file its inode, so a file changed since is hashed again. Only small files skip it.
STAMP_SUFFIX = ".verified.json"
STAMP_MIN_BYTES = 64 * 2**20


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp_matches(path: Path, st: os.stat_result, sha256: str) -> bool:
    if st.st_size < STAMP_MIN_BYTES:
        return False
    try:
        stamp = json.loads(Path(f"{path}{STAMP_SUFFIX}").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("identity") == _identity(st) and stamp.get("sha256") == sha256


def _write_stamp(path: Path, st: os.stat_result, sha256: str) -> None:
    if st.st_size < STAMP_MIN_BYTES:
        return
    try:
        with atomic_path(f"{path}{STAMP_SUFFIX}") as tmp:
            tmp.write_text(json.dumps({"identity": _identity(st), "sha256": sha256}))
    except OSError:  # a read-only store: every process hashes, nothing else changes
        pass


# --- the embedding_shard_files table (created by sql/embeddings_tables.sql) ---------------------


def record(
    conn: duckdb.DuckDBPyConnection, backbone: str, weights_tag: str, shard: str, digests: dict[str, FileDigest]
) -> None:
    """Record the digests of one shard's files (``kind -> digest``); run it inside the caller's transaction."""
    conn.executemany(
        "INSERT OR REPLACE INTO embedding_shard_files VALUES (?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
        [[backbone, weights_tag, shard, kind, d.bytes, d.sha256] for kind, d in sorted(digests.items())],
    )


def recorded(conn: duckdb.DuckDBPyConnection, backbone: str) -> dict[tuple[str, str], FileDigest]:
    """``(shard, kind) -> digest`` of every recorded file of ``backbone``."""
    rows = conn.execute(
        "SELECT shard, kind, bytes, sha256 FROM embedding_shard_files WHERE backbone = ?", [backbone]
    ).fetchall()
    return {(shard, kind): FileDigest(int(n), h) for shard, kind, n, h in rows}


def forget_unreferenced(conn: duckdb.DuckDBPyConnection, backbone: str) -> None:
    """Drop the records of shards the index no longer references (their files are deleted with them)."""
    conn.execute(
        "DELETE FROM embedding_shard_files f WHERE f.backbone = ? AND NOT EXISTS "
        "(SELECT 1 FROM embedding_index e WHERE e.backbone = f.backbone AND e.shard = f.shard)",
        [backbone],
    )

