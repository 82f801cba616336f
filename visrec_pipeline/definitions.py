"""The Dagster code location: every asset, check, job, sensor and resource.

Each ``visrec_pipeline.defs.<module>`` exposes ``defs`` (a ``dg.Definitions``);
they are merged here with the shared resources and the executor.
"""

from __future__ import annotations

import importlib

import dagster as dg

from visrec_pipeline.defs.resources import MAX_CONCURRENT_STEPS, default_resources

_MODULES = (
    "ingest",
    "images",
    "embeddings",
    "triples",
    "models",
    "report",
    "refresh",
)

# Each step runs in a process forked from a server that has already imported
# torch and the pipeline, so a step starts in well under a second.
EXECUTOR = dg.multiprocess_executor.configured(
    {
        "max_concurrent": MAX_CONCURRENT_STEPS,
        "start_method": {"forkserver": {"preload_modules": ["visrec_pipeline.definitions"]}},
    }
)


def _module_defs() -> list[dg.Definitions]:
    found = []
    for name in _MODULES:
        try:
            module = importlib.import_module(f"visrec_pipeline.defs.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"visrec_pipeline.defs.{name}":
                raise
            continue
        found.append(module.defs)
    return found


ALL_ASSETS_JOB = dg.define_asset_job(
    "visrec_all",
    # one job has one partitions definition: the per-batch partitioned assets run on their own
    selection=dg.AssetSelection.all() - dg.AssetSelection.tag("visrec/partitioned", "batch"),
    description="Materialize the whole pipeline: ingest, images, features, training data, models, evaluation, report.",
)


def all_resources() -> dict:
    from visrec_pipeline.defs.images import CommonsImageSource

    return {**default_resources(), "commons": CommonsImageSource()}


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    return dg.Definitions.merge(
        *_module_defs(),
        dg.Definitions(resources=resources or all_resources(), executor=EXECUTOR, jobs=[ALL_ASSETS_JOB]),
    )


defs = build_definitions()
