"""A running step's peak memory, kept in a small file that outlives a step the OS kills (no dagster).

A process the kernel kills when memory runs out (SIGKILL) gets no chance to say how much it held.
So a thread of the step writes the process's peak resident set size (``ru_maxrss``) when the step
starts and then every second; the file is removed when the step ends by itself (well or with an
error), so a file left behind belongs to a step that was killed, and holds its peak up to the
last sample.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SAMPLE_EVERY_S = 1.0


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def machine_memory() -> dict[str, int]:
    """``total_bytes`` and ``available_bytes`` of this machine (Linux ``/proc/meminfo``; empty elsewhere):
    with the peak, they tell a step killed for memory from one killed for another reason."""
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out["total_bytes" if key == "MemTotal" else "available_bytes"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _write(path: Path) -> None:
    record = {"pid": os.getpid(), "peak_rss_bytes": peak_rss_bytes(), "sampled_at": time.time(), **machine_memory()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # no fsync: the file has to survive the process, not the machine


@contextmanager
def recording(path: str | os.PathLike, every_s: float = SAMPLE_EVERY_S) -> Iterator[Path]:
    """Keep ``path`` holding this process's pid and peak RSS while the body runs; removed afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            try:
                _write(path)
            except OSError:
                pass  # a full disk must not fail the step over a memory note

    thread = threading.Thread(target=sample, name="step-memory", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def read(path: str | os.PathLike) -> dict | None:
    """The last sample a killed step left (``pid``, ``peak_rss_bytes``, ``sampled_at``, and on Linux the
    machine's ``total_bytes``/``available_bytes`` then), or None."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
