"""Helpers of the ingest fault tests: the resources of a temp workspace with given settings, and the
message of the one failed step of a run."""

from __future__ import annotations

import dagster as dg

from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.paths import Workspace


def ingest_resources(ws: Workspace, **settings) -> dict:
    return {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset, **settings),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
    }


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success, "the run succeeded"
    (event,) = result.get_step_failure_events()
    return event.event_specific_data.user_failure_data.description
