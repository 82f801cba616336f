"""Free space checked before large writes, and a full disk reported as such.

A full disk otherwise surfaces far from its cause: a SIGBUS when a memory-mapped file's page
cannot be backed, or torch's ``inline_container.cc ... unexpected pos`` when a checkpoint's zip
stream stops short. Every error raised here is an ``OSError(errno.ENOSPC, ...)`` that names the
file, the bytes it needs and the bytes free.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from visrec_pipeline.atomic import atomic_path


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the filesystem that holds (or will hold) ``path``."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:  # the nearest existing ancestor
        folder = folder.parent
    return shutil.disk_usage(folder).free


def no_space_error(path: str | os.PathLike, needed: int, free: int | None = None) -> OSError:
    if free is None:
        free = free_bytes(path)
    return OSError(
        errno.ENOSPC,
        f"No space left on device: writing {path} needs {_size(int(needed))}, "
        f"{_size(int(free))} free on its filesystem; free some space (or point VISREC_DATA_DIR at a larger disk) "
        "and run again",
        str(path),
    )


def require_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raise the ENOSPC error of :func:`no_space_error` when ``path``'s filesystem has less than ``needed`` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise no_space_error(path, needed, free)


def reserve(path: str | os.PathLike, size: int, *, report_as: str | os.PathLike | None = None) -> None:
    """Allocate the disk blocks of the first ``size`` bytes of the existing file ``path``, so that a
    memory map over it cannot hit a full disk later (which would be a SIGBUS, not an error).
    ``report_as``: the name an error gives (the final name of a temp file)."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space_error(report_as or path, size) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without preallocation
            raise
    finally:
        os.close(fd)


def write_bytes_atomically(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename) after checking the free space;
    a disk that fills up meanwhile still raises the ENOSPC error naming ``path``."""
    path = Path(path)
    require_free_space(path, len(data))
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space_error(path, len(data)) from exc
        raise
    return path
