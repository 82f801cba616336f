"""Typed Dagster resources shared by every asset: settings and DuckDB access."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field

from visrec_pipeline import db
from visrec_pipeline.paths import Workspace, env_data_dir, env_dataset

# Bulk writers (ingest, images) declare this pool; dagster_home/dagster.yaml limits it to
# one step at a time across all runs. Every other step holds the file only briefly and
# waits out a lock in VisrecDuckDB.get_connection (see docs/DESIGN.md, "One writer").
DUCKDB_POOL = "duckdb"


class VisrecSettings(dg.ConfigurableResource):
    """Which dataset to run on and where artefacts go (defaults: the env vars)."""

    data_dir: str = Field(
        default_factory=env_data_dir,
        description="Folder for the DuckDB file, image store, features, models and reports (VISREC_DATA_DIR).",
    )
    dataset: str = Field(
        default_factory=env_dataset,
        description="'demo' for the bundled generated dataset, or a path to a dataset folder (VISREC_DATASET).",
    )

    @property
    def workspace(self) -> Workspace:
        return Workspace.from_settings(self.data_dir, self.dataset)


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
    }
