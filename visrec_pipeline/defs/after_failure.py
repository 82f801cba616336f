"""After a run whose model steps failed: say why (a crash: the signal and the peak memory), and
still build the report for the models that finished.

Dagster never runs a step downstream of a failed one, so a model step killed by the OS (out of
memory) left its run with a bare ``ChildProcessCrashException`` and without ``recommendations`` and
``benchmark_report``. For such a run (a failed ``model_<name>`` or ``evaluation_<name>`` step), :func:`follow_up_request`:

- adds an engine event to the failed run per failed step, naming the cause: e.g. "killed
  by signal 9 (SIGKILL), ... out of memory; peak memory 3.1 GiB (resident, last sampled 12:00:03)",
  from Dagster's crash event and the file :func:`recording_step_memory` keeps during the step;
- requests a run of job ``visrec_report`` with what the failed run planned of ``recommendations``
  (for the models that did not fail) and ``benchmark_report`` (which lists the finished models and
  names the failed ones with their cause), under the failed run's resource config.

``make demo`` runs it right after a failed run (:func:`report_after_failure`, from cli.py); with the
daemon (``make ui``), the sensor ``report_after_failed_run`` does it for any failed run (switched
off by default, like every sensor of the project).
"""

from __future__ import annotations

import re
import time
from contextlib import AbstractContextManager
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType

from visrec_pipeline import step_memory
from visrec_pipeline.recsys.registry import MODEL_SPECS

REPORT_JOB_NAME = "visrec_report"
REPORT_ASSETS = ("recommendations", "benchmark_report")
FOLLOWS_TAG = "visrec/report_after_run"
MEMORY_FOLDER = "visrec_step_memory"

REPORT_JOB = dg.define_asset_job(
    REPORT_JOB_NAME,
    selection=dg.AssetSelection.assets(*REPORT_ASSETS),
    description="Recommendations and the benchmark report alone: what runs after a run whose model steps failed.",
)

_SIGNAL = re.compile(r"terminated by signal (\d+) \((\w+)\)")
_EXIT = re.compile(r"exited with code (-?\d+)")


def memory_file(instance: dg.DagsterInstance, run_id: str, step_key: str) -> Path:
    """Where step ``step_key`` of run ``run_id`` keeps its peak memory (the instance's storage)."""
    return Path(instance.storage_directory()) / MEMORY_FOLDER / f"{run_id}.{step_key}.json"


def recording_step_memory(context: dg.AssetExecutionContext) -> AbstractContextManager[Path]:
    """Wrap a heavy step's body: its peak memory is known even if the OS kills it."""
    step_key = context.get_step_execution_context().step.key
    return step_memory.recording(memory_file(context.instance, context.run_id, step_key))


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _crash_cause(instance: dg.DagsterInstance, run_id: str, step_key: str, engine_messages: list[str]) -> str:
    signal = next((m for m in map(_SIGNAL.search, engine_messages) if m), None)
    if signal:
        number, name = signal.groups()
        cause = f"its process was killed by signal {number} ({name})"
        if name == "SIGKILL":
            cause += ": likely out of memory (the kernel's OOM killer sends SIGKILL)"
    else:
        code = next((m for m in map(_EXIT.search, engine_messages) if m), None)
        cause = f"its process exited with code {code.group(1)}" if code else "its process died without a Python error"
    path = memory_file(instance, run_id, step_key)
    sample = step_memory.read(path)
    if sample:
        at = time.strftime("%H:%M:%S", time.localtime(sample["sampled_at"]))
        cause += f"; peak memory {_size(int(sample['peak_rss_bytes']))} (resident, last sampled {at}"
        if "available_bytes" in sample and "total_bytes" in sample:
            cause += f", when the machine had {_size(int(sample['available_bytes']))} of {_size(int(sample['total_bytes']))} available"
        cause += ")"
    else:
        cause += "; its peak memory was not recorded"
    return cause


def failure_causes(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """``step_key -> cause`` of every failed step of run ``run_id``: the signal and peak memory of a
    crashed step process, else the error's first line."""
    records = instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.ENGINE_EVENT})
    engine: dict[str, list[str]] = {}
    failures: dict[str, dg.DagsterEvent] = {}
    for record in records:
        event = record.get_dagster_event()
        if event.step_key is None:
            continue
        if event.event_type == DagsterEventType.ENGINE_EVENT:
            engine.setdefault(event.step_key, []).append(event.message or "")
        else:
            failures[event.step_key] = event
    causes = {}
    for step_key, event in failures.items():
        error = event.step_failure_data.error
        if error is not None and error.cls_name == "ChildProcessCrashException":
            causes[step_key] = _crash_cause(instance, run_id, step_key, engine.get(step_key, []))
        else:
            # an error raised by the asset's code comes wrapped in Dagster's own: name the asset's
            while error is not None and error.cls_name == "DagsterExecutionStepExecutionError" and error.cause:
                error = error.cause
            first_line = (error.message.strip().splitlines() or [""])[0] if error is not None else "failed"
            cls_name = error.cls_name if error is not None else "error"
            first_line = first_line.removeprefix(f"{cls_name}: ")  # the message may already start with it
            causes[step_key] = f"{cls_name}: {first_line}"
    return causes


def _planned_steps(instance: dg.DagsterInstance, run: dg.DagsterRun) -> set[str]:
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return set(plan.step_keys_to_execute or [s.key for s in plan.steps])


def _started_steps(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    records = instance.all_logs(run_id, of_type={DagsterEventType.STEP_START})
    return {r.get_dagster_event().step_key for r in records}


def follow_up_request(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dg.RunRequest | None:
    """The ``visrec_report`` run for failed run ``run`` (None when no model step failed or no report
    step was left out), after recording each failed model step's cause on ``run``."""
    if run.job_name == REPORT_JOB_NAME:
        return None  # never a follow-up of a follow-up
    failed: dict[str, str] = {}  # model name -> "<step>: <cause>"
    for step_key, cause in sorted(failure_causes(instance, run.run_id).items()):
        kind, _, name = step_key.partition("_")
        if kind in ("model", "evaluation") and name in MODEL_SPECS and name not in failed:
            failed[name] = f"{step_key}: {cause}"
            instance.report_engine_event(f"{step_key} failed: {cause}", dagster_run=run, step_key=step_key)
            memory_file(instance, run.run_id, step_key).unlink(missing_ok=True)  # its peak is in the event now
    if not failed:
        return None
    left_out = sorted((_planned_steps(instance, run) & set(REPORT_ASSETS)) - _started_steps(instance, run.run_id))
    if not left_out:
        return None
    run_config = run.run_config if isinstance(run.run_config, dict) else {}
    # the failed run's own config of these steps (and of its resources), plus what the failure adds
    ops = {k: {"config": dict(run_config.get("ops", {}).get(k, {}).get("config", {}))} for k in left_out}
    if "recommendations" in left_out:
        ops["recommendations"]["config"]["models"] = [n for n in MODEL_SPECS if n not in failed]
    if "benchmark_report" in left_out:
        ops["benchmark_report"]["config"]["failed_models"] = dict(sorted(failed.items()))
    resources = run_config.get("resources")
    return dg.RunRequest(
        run_key=run.run_id,
        asset_selection=[dg.AssetKey(k) for k in left_out],
        run_config={"ops": ops, **({"resources": resources} if resources else {})},
        tags={FOLLOWS_TAG: run.run_id},
    )


@dg.run_failure_sensor(
    name="report_after_failed_run",
    request_job=REPORT_JOB,
    description="After a run whose model steps failed (e.g. killed when memory ran out): records why on the "
    "failed run and runs recommendations and the benchmark report for the models that finished.",
)
def report_after_failed_run(context: dg.RunFailureSensorContext):
    request = follow_up_request(context.instance, context.dagster_run)
    return request if request is not None else dg.SkipReason("no model step failed, or no report step was left out")


def report_job():
    """Module-level so Dagster can reconstruct the report job in step subprocesses."""
    from visrec_pipeline.definitions import defs as location

    return location.resolve_job_def(REPORT_JOB_NAME)


def run_follow_up(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.ExecuteJobResult:
    """Execute a :func:`follow_up_request` in this process (the daemon launches the sensor's)."""
    return dg.execute_job(
        dg.reconstructable(report_job),
        instance=instance,
        run_config=request.run_config,
        tags=request.tags,
        asset_selection=request.asset_selection,
        raise_on_error=False,
    )


def report_after_failure(instance: dg.DagsterInstance, run_id: str) -> dg.ExecuteJobResult | None:
    """What the sensor does, without the daemon: for ``make demo`` after its run failed."""
    run = instance.get_run_by_id(run_id)
    request = follow_up_request(instance, run) if run is not None else None
    return run_follow_up(instance, request) if request is not None else None


defs = dg.Definitions(jobs=[REPORT_JOB], sensors=[report_after_failed_run])
