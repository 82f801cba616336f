"""Atomic file writes: write to a temp file in the same folder, fsync, rename.

A temp file is named ``.<target name>.<8 random chars>.tmp[<suffix>]`` and its writer holds an
exclusive ``flock`` on it until it is renamed or removed. A writer killed mid-way leaves the file
behind, but the kernel drops its lock, so :func:`remove_abandoned_temps` can tell a leftover from a
file that a live writer is still filling.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# the names atomic_path creates: a dot, the target's name, mkstemp's 8 random characters, ".tmp",
# then the optional suffix (".npy", ".npz", ".png", ...)
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success it replaces ``target`` atomically.

    ``suffix`` lets writers that infer the format from the extension (numpy, PIL) see it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        try:  # held until this writer is done or dead: the mark of a temp file still being written
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: the temp file is then never taken for a leftover
            pass
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        try:
            if tmp_path.exists():
                tmp_path.unlink()
        finally:
            os.close(fd)


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    with atomic_path(target) as tmp, open(tmp, mode) as fh:
        yield fh


def _remove_if_abandoned(path: Path) -> bool:
    """Remove the temp file unless a live process holds its lock (its writer is still at work)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # renamed or removed meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
        return True
    except OSError:  # held (EWOULDBLOCK), or no locks on this file system: keep it either way
        return False
    finally:
        os.close(fd)  # also releases the lock taken just now


def remove_abandoned_temps(folder: str | os.PathLike, *, older_than: float | None = None) -> list[Path]:
    """Delete the temp files of :func:`atomic_path` under ``folder`` (recursively) that writers killed
    mid-way left behind; returns them.

    A temp file is removed only when no live writer holds its lock and it was last written before
    ``older_than`` (unix seconds; default: now, i.e. the start of the step that owns ``folder`` when
    it calls this first thing), so a writer that has just created its file and not yet locked it is
    never disturbed.
    """
    cutoff = time.time() if older_than is None else older_than
    removed: list[Path] = []
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            if not TEMP_NAME.match(name):
                continue
            path = Path(dirpath) / name
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if _remove_if_abandoned(path):
                removed.append(path)
    return removed
