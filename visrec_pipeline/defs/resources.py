"""Typed Dagster resources shared by every asset: settings and DuckDB access."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field

from visrec_pipeline import db
from visrec_pipeline.distributed.cluster import ComputeSettings
from visrec_pipeline.ingest.interactions_file import DEFAULT_FUTURE_TOLERANCE_S
from visrec_pipeline.ingest.shrink_guard import DEFAULT_MAX_SHRINK_SHARE, ShrinkPolicy
from visrec_pipeline.paths import Workspace, env_data_dir, env_dataset

# Bulk writers (ingest, images) declare this pool; dagster_home/dagster.yaml limits it to
# one step at a time across all runs. Every other step holds the file only briefly and
# waits out a lock in VisrecDuckDB.get_connection (see docs/DESIGN.md, "One writer").
DUCKDB_POOL = "duckdb"


# Steps the multiprocess executor runs at once (definitions.py); each gets its share of the cores.
MAX_CONCURRENT_STEPS = 2


def step_threads(requested: int, cpus: int | None, in_step_subprocess: bool) -> int | None:
    """Intra-op threads for torch in a step: ``requested`` when > 0; otherwise (auto), in a step
    subprocess of the multiprocess executor, the step's share of the cores, else None (torch's
    default). Two steps each running one OpenMP thread per core oversubscribe the CPU and their
    spinning threads slow both several-fold (measured: the CPU demo's trainings took 3-5x longer)."""
    if requested > 0:
        return requested
    if not in_step_subprocess:
        return None
    return max(1, (cpus or 1) // MAX_CONCURRENT_STEPS)


ALLOW_SHRINKING_ENV = "VISREC_ALLOW_SHRINKING"
MAX_SHRINK_SHARE_ENV = "VISREC_MAX_SHRINK_SHARE"
FUTURE_TOLERANCE_ENV = "VISREC_FUTURE_TOLERANCE_HOURS"


def env_flag(name: str) -> bool:
    """A yes/no environment variable: 1/true/yes/on (any case) is yes, unset or empty is no."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


class VisrecSettings(dg.ConfigurableResource):
    """Which dataset to run on, where artefacts go and what input is accepted (defaults: the env vars)."""

    data_dir: str = Field(
        default_factory=env_data_dir,
        description="Folder for the DuckDB file, image store, features, models and reports (VISREC_DATA_DIR).",
    )
    dataset: str = Field(
        default_factory=env_dataset,
        description="'demo' for the bundled generated dataset, or a path to a dataset folder (VISREC_DATASET).",
    )

    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads per step; 0 = auto: the step's share of the cores when steps run in "
        "parallel subprocesses, torch's default when the run executes in one process.",
    )

    allow_shrinking: bool = Field(
        default_factory=lambda: env_flag(ALLOW_SHRINKING_ENV),
        description="Load an interactions batch with no data rows, or one that removes more than max_shrink_share "
        f"of raw_interactions (e.g. a smaller interactions.csv); refused otherwise ({ALLOW_SHRINKING_ENV}).",
    )
    max_shrink_share: float = Field(
        default_factory=lambda: env_number(MAX_SHRINK_SHARE_ENV, DEFAULT_MAX_SHRINK_SHARE),
        ge=0.0,
        le=1.0,
        description="Largest share of raw_interactions rows one batch may remove without allow_shrinking "
        f"({MAX_SHRINK_SHARE_ENV}).",
    )
    future_tolerance_hours: float = Field(
        default_factory=lambda: env_number(FUTURE_TOLERANCE_ENV, DEFAULT_FUTURE_TOLERANCE_S / 3600),
        ge=0.0,
        description="Interaction timestamps later than now plus this many hours are refused as malformed "
        f"({FUTURE_TOLERANCE_ENV}).",
    )

    @property
    def workspace(self) -> Workspace:
        return Workspace.from_settings(self.data_dir, self.dataset)

    @property
    def shrink_policy(self) -> ShrinkPolicy:
        return ShrinkPolicy(self.allow_shrinking, self.max_shrink_share)

    @property
    def future_tolerance_s(self) -> float:
        return self.future_tolerance_hours * 3600

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import multiprocessing

        threads = step_threads(self.torch_threads, os.cpu_count(), multiprocessing.parent_process() is not None)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)


COMPUTE_ENV = "VISREC_COMPUTE"
RAY_ADDRESS_ENV = "VISREC_RAY_ADDRESS"


class ComputeResource(dg.ConfigurableResource):
    """Where the heavy steps run (feature extraction, training, evaluation): in the step's process
    (``local``, the default) or on a Ray cluster (``ray``). Defaults come from VISREC_COMPUTE and
    VISREC_RAY_ADDRESS. Everything else about the pipeline is the same on both."""

    engine: str = Field(
        default_factory=lambda: os.environ.get(COMPUTE_ENV, "").strip() or "local",
        description=f"'local' (in the step's process) or 'ray' ({COMPUTE_ENV}).",
    )
    address: str = Field(
        default_factory=lambda: os.environ.get(RAY_ADDRESS_ENV, "").strip() or "auto",
        description="The Ray cluster: 'auto' (the cluster this machine joined with `ray start`), 'ray://host:10001', "
        f"'host:port' of a head, or 'local:N' for a private cluster of N worker processes per step ({RAY_ADDRESS_ENV}).",
    )
    workers: int = Field(default=0, ge=0, description="Parallel Ray tasks or actors per step (0: one per cluster CPU).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each Ray task or actor declares.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs each Ray task or actor declares (0: CPU only).")

    @property
    def settings(self) -> ComputeSettings:
        return ComputeSettings(
            engine=self.engine, address=self.address, workers=self.workers,
            cpus_per_worker=self.cpus_per_worker, gpus_per_worker=self.gpus_per_worker,
        )


class VisrecDuckDB(DuckDBResource):
    """dagster-duckdb's resource, waiting out another process's file lock instead of failing.

    Connections are always closed, also when the body raises.
    """

    lock_timeout_s: float = Field(default=600.0, description="How long to wait for another writer's lock.")

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        conn = db.open_with_retry(
            self.database,
            config={"custom_user_agent": "visrec-pipeline", **self.connection_config},
            timeout_s=self.lock_timeout_s,
        )
        try:
            yield conn
        finally:
            conn.close()


def default_resources(workspace: Workspace | None = None) -> dict[str, dg.ConfigurableResource]:
    ws = workspace or Workspace.from_env()
    return {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
        "compute": ComputeResource(),
    }


@dg.definitions
def defs() -> dg.Definitions:
    """Every resource of the code location, bound here once: settings and DuckDB from the
    environment, the Commons client for item images. Built when the location loads, so the
    environment of the loading process decides the workspace."""
    # images.py imports this module for the pool and the resource types
    from visrec_pipeline.defs.images import CommonsImageSource

    return dg.Definitions(resources={**default_resources(), "commons": CommonsImageSource()})
