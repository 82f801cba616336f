"""The Dagster code location: every module of ``visrec_pipeline/defs/``, loaded by folder, plus the
executor (multiprocess, releasing dead runs' pool slots first) and the ``visrec_all`` job.

``dg`` (``[tool.dg]`` in pyproject.toml), ``dagster dev`` (workspace.yaml), the CLI, the tests and
the forkserver of the multiprocess executor all import this module.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._record import replace

from visrec_pipeline.defs.dead_runs import releasing_dead_runs
from visrec_pipeline.defs.resources import MAX_CONCURRENT_STEPS

# Each step runs in a process forked from a server that has already imported this module (torch,
# the pipeline and the loaded location), so a step starts in well under a second. Every run (CLI or
# UI) first frees the pool slots of runs killed earlier (defs/dead_runs.py), so it never waits on them.
EXECUTOR = releasing_dead_runs(
    dg.multiprocess_executor.configured(
        {
            "max_concurrent": MAX_CONCURRENT_STEPS,
            "start_method": {"forkserver": {"preload_modules": ["visrec_pipeline.definitions"]}},
        }
    )
)

ALL_ASSETS_JOB = dg.define_asset_job(
    "visrec_all",
    # one job has one partitions definition: the per-batch partitioned assets run on their own; tuning
    # runs on demand (job visrec_tuning), so the demo's cost stays what it was
    selection=dg.AssetSelection.all()
    - dg.AssetSelection.tag("visrec/partitioned", "batch")
    - dg.AssetSelection.groups("tuning"),
    description="Materialize the whole pipeline: ingest, images, features, training data, models, evaluation, report.",
)


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """The whole location. ``resources`` replaces the ones ``defs/resources.py`` binds (tests point
    them at a temporary workspace)."""
    location = dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=EXECUTOR, jobs=[ALL_ASSETS_JOB]),
    )
    # Definitions.merge refuses two values for one resource key, so an override replaces the field
    return location if resources is None else replace(location, resources=resources)


defs = build_definitions()


@dg.definitions
def code_location() -> dg.Definitions:
    """What ``dg dev``, ``dg check defs`` and ``dagster dev`` load (a ``@dg.definitions`` function is
    preferred over a module-level ``Definitions``). It hands back ``defs``, built once at import, so a
    step process forked from the preloaded forkserver reconstructs its job without loading the folder again."""
    return defs
