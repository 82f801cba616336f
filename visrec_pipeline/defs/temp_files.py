"""Temp files of killed runs, removed by the next run of the step that owns their folder.

A helper (defines no Dagster objects): each asset that writes files through ``atomic.py`` calls
:func:`remove_leftover_temps` on its folders when it starts.
"""

from __future__ import annotations

import os

import dagster as dg

from visrec_pipeline.atomic import remove_abandoned_temps


def remove_leftover_temps(context: dg.AssetExecutionContext, *folders: str | os.PathLike) -> int:
    """Remove the temp files under ``folders`` that no live writer holds (see ``atomic.py``); logs and
    returns how many."""
    removed = [path for folder in folders for path in remove_abandoned_temps(folder)]
    if removed:
        shown = ", ".join(str(p) for p in removed[:3]) + (" ..." if len(removed) > 3 else "")
        context.log.info(f"removed {len(removed)} temp file(s) left by an interrupted run: {shown}")
    return len(removed)
