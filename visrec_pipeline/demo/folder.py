"""Replace a whole folder atomically: build in a temp sibling, rename into place, under a lock.

``fcntl.flock`` (POSIX): the lock is released by the kernel when its holder dies,
so a killed generation never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive flock on ``.<name>.lock`` next to ``out_dir`` (released when the process dies)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove_leftovers(out_dir: Path) -> None:
    """Temp siblings of a killed generation; safe because the caller holds the folder lock."""
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for p in out_dir.parent.glob(f"{prefix}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def make_temp_sibling(out_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Put the finished ``tmp`` at ``out_dir``; an existing ``out_dir`` is moved aside and deleted."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"demo dataset target {out_dir} exists and is not a folder")
    # New batches a user dropped into incoming/ are theirs: carry them over.
    incoming = out_dir / "incoming"
    if incoming.is_dir() and not incoming.is_symlink():
        os.replace(incoming, tmp / "incoming")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / "dataset")
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
