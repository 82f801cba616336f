"""Issue 13: a model failure still yields the report. A real Dagster run on a real DuckDB file:

1. ``model_bpr_mf`` raises (an invalid config): Dagster skips ``evaluation_bpr_mf``, ``recommendations`` and
   ``benchmark_report``; the follow-up run (what the ``report_after_failed_run`` sensor or ``make demo``
   launches) recommends with the model that finished and writes the report naming the failed one.
2. ``bpr_mf``'s checkpoint is damaged after training: ``evaluation_bpr_mf`` fails, ``recommendations``
   still stores ``most_popular``'s items and records bpr_mf's failure, and the follow-up report lists it.
"""

from __future__ import annotations

import dagster as dg

from conftest import write_dataset
from test_pipeline_use_cases import ROWS
from visrec_pipeline import db
from visrec_pipeline.cli import all_assets_job
from visrec_pipeline.defs.after_failure import report_after_failure
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import default_resources
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import checkpoint_path
from visrec_pipeline.pipeline import results_store

MODELS = ("most_popular", "bpr_mf")
REPORT_CONFIG = {"grid_users": 0, "attention_users": 0}


def _run(instance, ws, ops: dict, *, train: bool = True) -> dg.ExecuteJobResult:
    """The models (unless ``train`` is off), their evaluations, recommendations and the report, in process."""
    resources = {
        "settings": {"config": {"data_dir": str(ws.data_dir), "dataset": ws.dataset}},
        "duckdb": {"config": {"database": str(ws.db_path)}},
    }
    return dg.execute_job(
        dg.reconstructable(all_assets_job),
        instance=instance,
        asset_selection=[
            *(dg.AssetKey(f"model_{m}") for m in (MODELS if train else ())),
            *(dg.AssetKey(f"evaluation_{m}") for m in MODELS),
            dg.AssetKey("recommendations"),
            dg.AssetKey("benchmark_report"),
        ],
        run_config={
            "execution": {"config": {"in_process": {}}},
            "resources": resources,
            "ops": {"benchmark_report": {"config": REPORT_CONFIG}, **ops},
        },
        raise_on_error=False,
    )


def _finished(result: dg.ExecuteJobResult) -> set[str]:
    return {e.step_key for e in result.all_events if e.is_step_success}


def test_a_model_failure_still_yields_the_report_naming_it(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", ROWS)
    ws = Workspace.from_settings(tmp_path / "data", str(dataset)).ensure()
    bpr = {"train": {"epochs": 1, "device": "cpu"}, "factors": 8}
    with dg.instance_for_test() as instance:
        assert dg.materialize(INGEST_ASSETS, resources=default_resources(ws), instance=instance).success

        # 1. the model step raises: nothing downstream of it runs in that run
        result = _run(instance, ws, {"model_bpr_mf": {"config": {**bpr, "train": {"epochs": 0}}}})
        assert not result.success
        assert [e.step_key for e in result.get_step_failure_events()] == ["model_bpr_mf"]
        assert {"model_most_popular", "evaluation_most_popular"} <= _finished(result)
        assert not {"recommendations", "benchmark_report"} & _finished(result)
        follow_up = report_after_failure(instance, result.run_id)
        assert follow_up is not None and follow_up.success
        report = (ws.reports_dir / "benchmark.md").read_text()
        table, failed = report.split("## Models that failed")
        assert "| most_popular" in table and "bpr_mf" not in table
        assert "- `bpr_mf`: model_bpr_mf: ValueError: TrainConfig.epochs must be >= 1, got 0" in failed
        with db.connect(ws.db_path, read_only=True) as conn:
            assert conn.execute("SELECT DISTINCT model FROM recommendations").fetchall() == [("most_popular",)]

        # 2. a damaged checkpoint: evaluation fails, recommendations go on without it
        result = _run(instance, ws, {"model_bpr_mf": {"config": bpr}})
        assert result.success
        path = checkpoint_path(ws, "bpr_mf")
        path.write_bytes(path.read_bytes()[:-64] + bytes(64))
        result = _run(instance, ws, {}, train=False)
        assert [e.step_key for e in result.get_step_failure_events()] == ["evaluation_bpr_mf"]
        assert "recommendations" in _finished(result)  # the other model's items are stored
        with db.connect(ws.db_path, read_only=True) as conn:
            assert conn.execute("SELECT DISTINCT model FROM recommendations").fetchall() == [("most_popular",)]
            assert "damaged" in results_store.recommendation_failures(conn)["bpr_mf"]
        follow_up = report_after_failure(instance, result.run_id)
        assert follow_up is not None and follow_up.success
        report = (ws.reports_dir / "benchmark.md").read_text()
        table, failed = report.split("## Models that failed")
        assert "| most_popular" in table and "bpr_mf" not in table
        assert "- `bpr_mf`: evaluation_bpr_mf: CheckpointError:" in failed and "re-materialize model_bpr_mf" in failed
