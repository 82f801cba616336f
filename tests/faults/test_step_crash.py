"""Issue 14, case 10: a model step process killed by the OS is reported with its signal and peak
memory, and the report still runs for the models that finished, naming the failed one.

A real multiprocess run (one OS process per step) on a real DuckDB file; the test kills the
``model_bpr_mf`` step's process with SIGKILL, as the kernel's out-of-memory killer would, taking
its pid from Dagster's own event (``STEP_WORKER_STARTED``). A DuckDB lock held by the test keeps
the model steps waiting in their first connect until the kill, so nothing depends on timing."""

from __future__ import annotations

import os
import signal
import threading
import time

import dagster as dg
import duckdb
from dagster._core.events import DagsterEventType

from conftest import write_dataset
from test_pipeline_use_cases import ROWS
from visrec_pipeline.cli import all_assets_job
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import default_resources
from visrec_pipeline.paths import Workspace

MODELS = ("most_popular", "bpr_mf")
KILLED = "bpr_mf"
TIMEOUT_S = 120


def step_pid(instance: dg.DagsterInstance, job_name: str, step_key: str) -> int | None:
    """The pid of ``step_key``'s process once the step has started, from the newest run of ``job_name``."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name), limit=1)
    if not runs:
        return None
    pid, started = None, False
    for record in instance.all_logs(runs[0].run_id):
        event = record.dagster_event
        if event is None or event.step_key != step_key:
            continue
        if event.event_type == DagsterEventType.STEP_WORKER_STARTED:
            pid = int(event.event_specific_data.metadata["pid"].value)
        started = started or event.event_type == DagsterEventType.STEP_START
    return pid if started else None


def kill_when_started(instance, step_key: str, lock: duckdb.DuckDBPyConnection, killed: dict) -> None:
    """SIGKILL the process of ``step_key`` (waiting for the lock) once it started, then release the lock."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            pid = step_pid(instance, "visrec_all", step_key)
            if pid is not None:
                time.sleep(1.0)  # the step body has begun and waits for the lock
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.1)
    finally:
        lock.close()


def test_a_killed_model_step_is_named_with_its_signal_and_the_report_covers_the_others(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", ROWS)
    ws = Workspace.from_settings(tmp_path / "data", str(dataset)).ensure()
    resources = {
        "settings": {"config": {"data_dir": str(ws.data_dir), "dataset": ws.dataset}},
        "duckdb": {"config": {"database": str(ws.db_path)}},
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize(INGEST_ASSETS, resources=default_resources(ws), instance=instance).success

        lock = duckdb.connect(str(ws.db_path))  # the steps wait for this process's lock
        killed: dict = {}
        killer = threading.Thread(
            target=kill_when_started,
            args=(instance, f"model_{KILLED}", lock, killed),
        )
        killer.start()
        result = dg.execute_job(
            dg.reconstructable(all_assets_job),
            instance=instance,
            asset_selection=[
                *(dg.AssetKey(f"model_{m}") for m in MODELS),
                *(dg.AssetKey(f"evaluation_{m}") for m in MODELS),
                dg.AssetKey("benchmark_report"),
            ],
            run_config={"resources": resources, "ops": {"benchmark_report": {"config": {"grid_users": 0, "attention_users": 0}}}},
            raise_on_error=False,
        )
        killer.join()
        assert killed, "the model step never started"
        assert not result.success
        (failure,) = result.get_step_failure_events()
        assert failure.step_key == f"model_{KILLED}"
        assert failure.step_failure_data.error.cls_name == "ChildProcessCrashException"
        assert "benchmark_report" not in {e.step_key for e in result.all_events if e.is_step_start}
        assert "evaluation_most_popular" in {e.step_key for e in result.all_events if e.is_step_success}
        assert not (ws.reports_dir / "benchmark.md").exists()

        from visrec_pipeline.defs.after_failure import report_after_failed_run, run_follow_up

        # the sensor (or `make demo`, without the daemon) follows the failed run
        run = instance.get_run_by_id(result.run_id)
        (run_failure,) = instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
        context = dg.build_run_status_sensor_context(
            sensor_name=report_after_failed_run.name,
            dagster_instance=instance,
            dagster_run=run,
            dagster_event=run_failure.get_dagster_event(),
        ).for_run_failure()
        request = report_after_failed_run(context)
        assert isinstance(request, dg.RunRequest) and request.asset_selection == [dg.AssetKey("benchmark_report")]

        # the failed run now says why the step died: the signal and its peak memory
        engine = [r.get_dagster_event().message for r in instance.all_logs(result.run_id, of_type=DagsterEventType.ENGINE_EVENT)]
        (cause,) = [m for m in engine if m.startswith(f"model_{KILLED} failed:")]
        assert "killed by signal 9 (SIGKILL)" in cause and "out of memory" in cause and "peak memory" in cause

        report_run = run_follow_up(instance, request)
        assert report_run.success
        report = (ws.reports_dir / "benchmark.md").read_text()
        assert "most_popular" in report.split("## Models that failed")[0]  # the finished model's row
        failed_section = report.split("## Models that failed")[1]
        assert f"- `{KILLED}`: model_{KILLED}: its process was killed by signal 9 (SIGKILL)" in failed_section
        assert "ACF attention" not in report  # the failed run's own report config (attention_users: 0) is kept
        assert "peak memory" in failed_section
        assert KILLED not in report.split("## Models that failed")[0]
