"""Is a process of this machine still running? (For runs whose process may have been killed.)

A pid alone is not enough: after a process dies the kernel may give its pid to a new one. Where
``/proc`` exists (Linux) the process's start time tells the two apart, and a zombie (dead, not yet
reaped by its parent) counts as gone.
"""

from __future__ import annotations

import os
from pathlib import Path

# A process seen at time t started before t; /proc's boot time is whole seconds and the clock may
# have been adjusted since, so "started after t" needs this much margin to mean "another process".
START_TIME_SLACK_S = 5.0

_PROC = Path("/proc")


def _boot_time() -> float | None:
    try:
        for line in (_PROC / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _state_and_start(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time in unix seconds or None) from /proc/<pid>/stat; None when gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")"
    fields = text[text.rindex(")") + 2 :].split()
    state, start_ticks = fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    boot = _boot_time()
    started = None if boot is None else boot + start_ticks / os.sysconf("SC_CLK_TCK")
    return state, started


def process_alive(pid: int, *, seen_at: float | None = None) -> bool:
    """True when process ``pid`` of this machine runs (a zombie does not). ``seen_at``: a unix time
    at which that process was known to run; a process with this pid that started clearly later is
    another one, so the one asked about is gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if not (_PROC / "self" / "stat").exists():
        return True  # no /proc (macOS): existence is all there is to know
    found = _state_and_start(pid)
    if found is None:
        return False
    state, started = found
    if state in ("Z", "X"):
        return False
    if seen_at is not None and started is not None and started > seen_at + START_TIME_SLACK_S:
        return False
    return True
