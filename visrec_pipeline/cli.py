"""Command line entry points: ``python -m visrec_pipeline.cli demo``.

``demo`` materializes the whole asset graph on ``VISREC_DATASET`` (the bundled
demo data when unset) into the Dagster instance at ``DAGSTER_HOME``, so the
runs, metadata and lineage are visible in the UI afterwards, then prints the
benchmark table and where every output lives.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_ASSETS_JOB = "visrec_all"


def _ensure_dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    return home


def all_assets_job():
    """Module-level so Dagster can reconstruct the job in step subprocesses."""
    from visrec_pipeline.definitions import defs

    return defs.resolve_job_def(ALL_ASSETS_JOB)


def demo_run_config(on_gpu: bool) -> dict:
    """Op config for a CPU demo run: DVBPR's small CPU preset and epoch caps that keep the
    whole demo within minutes. On a GPU (or your own data) the models' own defaults apply."""
    if on_gpu:
        return {}
    from visrec_pipeline.recsys.models.dvbpr import DEMO_OVERRIDES

    caps = {
        "model_dvbpr": copy.deepcopy(DEMO_OVERRIDES),
        **{f"model_{name}": {"train": {"epochs": n}} for name, n in DEMO_EPOCHS.items()},
    }
    return {"ops": {op: {"config": cfg} for op, cfg in caps.items()}}


# On a CPU, a dataset of the user's own gets every trained model's training capped at this many minutes
# (``TrainConfig.max_minutes``; the best validated weights so far are kept), so a first run ends in
# predictable time whatever the data size. VISREC_TRAIN_MINUTES sets it; 0 trains to the models' own
# epochs and early stopping. The bundled demo has epoch caps instead (DEMO_EPOCHS).
DEFAULT_TRAIN_MINUTES_CPU = 8.0


def train_minutes_from_env(environ=os.environ) -> float:
    raw = environ.get("VISREC_TRAIN_MINUTES", "").strip()
    if not raw:
        return DEFAULT_TRAIN_MINUTES_CPU
    try:
        minutes = float(raw)
    except ValueError:
        raise SystemExit(f"VISREC_TRAIN_MINUTES must be a number of minutes (0: no limit), got {raw!r}") from None
    if not minutes >= 0:
        raise SystemExit(f"VISREC_TRAIN_MINUTES must be >= 0 (0: no limit), got {raw!r}")
    return minutes


def user_data_run_config(on_gpu: bool, minutes: float) -> dict:
    """Op config for a run on the user's own data: on a CPU, every model with a training loop gets
    ``train.max_minutes`` (nothing on a GPU, or with ``minutes`` 0)."""
    if on_gpu or minutes <= 0:
        return {}
    import dataclasses

    from visrec_pipeline.recsys.registry import MODEL_SPECS

    trained = [
        name for name, spec in MODEL_SPECS.items()
        if "train" in {f.name for f in dataclasses.fields(spec.config_cls)}
    ]
    return {"ops": {f"model_{name}": {"config": {"train": {"max_minutes": minutes}}} for name in trained}}


# the CPU demo's epoch caps, shared by the demo run and the tuning run
DEMO_EPOCHS = {"vbpr": 15, "bpr_mf": 20, "acf": 8, "curatornet": 6, "curatornet_random": 6}
TUNING_JOB = "visrec_tuning"


def tuning_run_config(on_gpu: bool) -> dict:
    """Op config of ``visrec_tuning`` on the CPU demo: every trial capped at the demo's epochs."""
    if on_gpu:
        return {}
    return {"ops": {f"tuning_{name}": {"config": {"max_epochs": n}} for name, n in DEMO_EPOCHS.items()}}


def tuning_job():
    from visrec_pipeline.definitions import defs

    return defs.resolve_job_def(TUNING_JOB)


def run_tuning(in_process: bool = False) -> int:
    """``visrec_tuning`` (every tuning_<model> but DVBPR's) on ``VISREC_DATASET``, its upstream assets
    already materialized (``make demo``)."""
    import dagster as dg
    import torch

    from visrec_pipeline.paths import Workspace

    home = _ensure_dagster_home()
    ws = Workspace.from_env()
    run_config: dict = {"execution": {"config": {"in_process": {}}}} if in_process else {}
    if ws.is_demo:
        run_config.update(tuning_run_config(torch.cuda.is_available()))
    print(f"visrec-pipeline tuning: dataset={ws.dataset!r} DAGSTER_HOME={home}", flush=True)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(tuning_job), instance=instance, run_config=run_config, raise_on_error=False
        )
    print(f"Run {result.run_id} {'succeeded' if result.success else 'FAILED'} in {time.perf_counter() - started:.1f} s")
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            print(f"FAILED step {event.step_key}: {event.event_specific_data.error.message.strip()}", file=sys.stderr)
    return 0 if result.success else 1


@contextmanager
def run_compute() -> Iterator[str | None]:
    """Where the run's heavy steps go (VISREC_COMPUTE, VISREC_RAY_ADDRESS): with ``ray`` and
    ``local:N``, one private Ray cluster for the whole run, whose address the step processes inherit
    (they read the compute resource's defaults from the environment). Yields a line to print, or None."""
    from visrec_pipeline.defs.resources import RAY_ADDRESS_ENV, ComputeResource
    from visrec_pipeline.distributed.cluster import cluster_for_run

    settings = ComputeResource().settings
    if not settings.distributed:
        yield None
        return
    with cluster_for_run(settings) as used:
        if used.address == settings.address:
            yield f"  compute: Ray cluster at {used.address}"
            return
        before = os.environ.get(RAY_ADDRESS_ENV)
        os.environ[RAY_ADDRESS_ENV] = used.address
        try:
            yield f"  compute: a private Ray cluster of {settings.address.partition(':')[2] or 2} worker processes at {used.address}"
        finally:
            if before is None:
                os.environ.pop(RAY_ADDRESS_ENV, None)
            else:
                os.environ[RAY_ADDRESS_ENV] = before


def run_demo(in_process: bool = False) -> int:
    import dagster as dg

    from visrec_pipeline.defs.dead_runs import release_dead_runs
    from visrec_pipeline.paths import Workspace

    home = _ensure_dagster_home()
    ws = Workspace.from_env()
    print(f"visrec-pipeline: dataset={ws.dataset!r} data_dir={ws.data_dir} DAGSTER_HOME={home}", flush=True)
    started = time.perf_counter()
    import torch

    run_config: dict = {"execution": {"config": {"in_process": {}}}} if in_process else {}
    if ws.is_demo:
        run_config.update(demo_run_config(torch.cuda.is_available()))
    else:
        minutes = train_minutes_from_env()
        user_config = user_data_run_config(torch.cuda.is_available(), minutes)
        if user_config:
            print(f"  on a CPU: each model's training is capped at {minutes:g} min, keeping its best validated "
                  "weights (VISREC_TRAIN_MINUTES=0: no cap)", flush=True)
        run_config.update(user_config)
    with run_compute() as compute_note, dg.DagsterInstance.get() as instance:
        if compute_note:
            print(compute_note, flush=True)
        # a demo killed earlier must not keep this one waiting for its pool slots (the run's executor
        # does it too, and keeps doing it while the run lasts; here it is said on the console first)
        for gone in release_dead_runs(instance):
            print(gone.message, flush=True)
        result = dg.execute_job(
            dg.reconstructable(all_assets_job), instance=instance, run_config=run_config, raise_on_error=False
        )
        elapsed = time.perf_counter() - started
        failed = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        checks = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        causes, follow_up = {}, None
        if not result.success:
            from visrec_pipeline.defs.after_failure import failure_causes, report_after_failure

            # a crashed step's signal and peak memory; then the report of the models that finished
            causes = failure_causes(instance, result.run_id)
            follow_up = report_after_failure(instance, result.run_id)
    for event in failed:
        cause = causes.get(event.step_key) or event.event_specific_data.error.message.strip()
        print(f"FAILED step {event.step_key}: {cause}", file=sys.stderr)
    if follow_up is not None:
        print(f"Report of the models that finished: run {follow_up.run_id} "
              f"{'succeeded' if follow_up.success else 'FAILED'}", file=sys.stderr)
    failed_checks = [
        e.event_specific_data for e in checks if not e.event_specific_data.passed
    ]
    report = ws.reports_dir / "benchmark.md"
    if report.exists():
        print("\n" + report.read_text())
    print(f"\nRun {result.run_id} {'succeeded' if result.success else 'FAILED'} in {elapsed:.1f} s")
    print(f"  asset checks: {len(checks) - len(failed_checks)} passed, {len(failed_checks)} failed")
    for c in failed_checks:
        print(f"    failed check {c.asset_key.to_user_string()}:{c.check_name} ({c.severity.value})")
    print(f"  DuckDB database : {ws.db_path}")
    print(f"  image store     : {ws.image_store}")
    print(f"  features        : {ws.features_dir}")
    print(f"  model checkpoints: {ws.models_dir}")
    print(f"  reports         : {ws.reports_dir}")
    print("  open the UI with `make ui` and browse http://127.0.0.1:3000 (Assets -> lineage, metadata, checks)")
    return 0 if result.success else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visrec_pipeline.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize the whole asset graph on VISREC_DATASET")
    demo.add_argument("--in-process", action="store_true", help="run every step in this process")
    tune = sub.add_parser("tune", help="run every tuning_<model> asset but DVBPR's (job visrec_tuning)")
    tune.add_argument("--in-process", action="store_true", help="run every step in this process")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(in_process=args.in_process)
    if args.command == "tune":
        return run_tuning(in_process=args.in_process)
    return 2


if __name__ == "__main__":
    sys.exit(main())
