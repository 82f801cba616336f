"""Runs whose processes are gone give back their concurrency pool slots: run monitoring without the daemon.

A run killed (``kill -9``, a closed laptop, an OOM kill) while one of its steps holds a slot of a
pool (``duckdb``, see ``resources.py``) keeps that slot in the instance: its status stays STARTED
and nothing ever ends it. Dagster's daemon frees the slots of *finished* runs only, and
``make demo`` runs no daemon at all, so the next run waits forever at "Step blocked by limit for
pool duckdb".

Every run of this code location goes through :func:`releasing_dead_runs`' executor (CLI and UI
launches alike): before its first step, and every ``WATCH_INTERVAL_S`` while it runs, it looks at
the runs holding or queueing for a pool slot, and for each one none of whose processes (the run's
own and its step workers', as recorded in its events) is alive any more, it marks the run failed
(when it was not finished) and frees its slots. A run with a live process is never touched. Only
for instances with SQLite storage, whose runs all execute on this machine (a pid means nothing on
another one).

A helper of the Dagster layer: defines no Dagster objects (``definitions.py`` builds the executor).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.storage.dagster_run import FINISHED_STATUSES

from visrec_pipeline.processes import process_alive

# how often a running run looks again (a run killed meanwhile, or one whose last step process has now exited)
WATCH_INTERVAL_S = 10.0
# the events that name the run's processes: the run's own, and each step worker's
_PROCESS_EVENTS = {DagsterEventType.RUN_START, DagsterEventType.STEP_WORKER_STARTED, DagsterEventType.STEP_START}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleasedRun:
    """A run whose processes were gone, and the pool slots it held or queued for."""

    run_id: str
    job_name: str
    status: str  # before it was released
    pools: tuple[str, ...]
    pids: tuple[int, ...]

    @property
    def message(self) -> str:
        gone = ", ".join(str(p) for p in self.pids) or "none recorded"
        marked = "" if self.status in {s.value for s in FINISHED_STATUSES} else "marked failed and "
        return (
            f"Run {self.run_id} (job {self.job_name}, {self.status}) held slots of pool {', '.join(self.pools)} "
            f"but its processes are gone (pids {gone}; killed?): {marked}its pool slots freed."
        )


def _local_runs(instance: dg.DagsterInstance) -> bool:
    """SQLite storage (the default under DAGSTER_HOME): every run executes on this machine."""
    return "sqlite" in type(instance.run_storage).__module__


def _pools_by_run(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """run id -> the pools it holds a slot of or has a step queued for."""
    storage = instance.event_log_storage
    held: dict[str, set[str]] = defaultdict(set)
    for pool, info in storage.get_concurrency_infos(sorted(storage.get_concurrency_keys())).items():
        for slot in info.claimed_slots:
            held[slot.run_id].add(pool)
        for step in info.pending_steps:
            held[step.run_id].add(pool)
    return held


def _run_processes(instance: dg.DagsterInstance, run_id: str) -> dict[int, float]:
    """pid -> when the run's events first named it (the process ran then)."""
    seen: dict[int, float] = {}
    for record in instance.get_records_for_run(run_id, of_type=_PROCESS_EVENTS).records:
        event = record.event_log_entry.dagster_event
        if event is not None and event.pid is not None:
            seen.setdefault(event.pid, record.event_log_entry.timestamp)
    return seen


def release_dead_runs(instance: dg.DagsterInstance, *, own_run_id: str | None = None) -> list[ReleasedRun]:
    """Free the pool slots of every run (other than ``own_run_id``) whose processes are all gone,
    marking it failed first when it was not finished; returns what was released."""
    if not _local_runs(instance) or not instance.event_log_storage.supports_global_concurrency_limits:
        return []
    released = []
    for run_id, pools in sorted(_pools_by_run(instance).items()):
        if run_id == own_run_id:
            continue
        run = instance.get_run_by_id(run_id)
        pids = _run_processes(instance, run_id)
        if run is not None and not pids:
            continue  # no process recorded yet: starting, not dead
        if any(process_alive(pid, seen_at=seen) for pid, seen in pids.items()):
            continue
        gone = ReleasedRun(
            run_id,
            run.job_name if run is not None else "?",
            run.status.value if run is not None else "deleted",
            tuple(sorted(pools)),
            tuple(sorted(pids)),
        )
        if run is not None and run.status not in FINISHED_STATUSES:
            instance.report_run_failed(run, message=gone.message)
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        log.warning(gone.message)
        released.append(gone)
    return released


@contextmanager
def watching_dead_runs(
    instance: dg.DagsterInstance,
    own_run_id: str,
    on_release: Callable[[ReleasedRun], None],
    interval_s: float = WATCH_INTERVAL_S,
) -> Iterator[None]:
    """While the body runs, call :func:`release_dead_runs` every ``interval_s`` in a background thread
    and hand each released run to ``on_release``."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            try:
                for gone in release_dead_runs(instance, own_run_id=own_run_id):
                    on_release(gone)
            except Exception:  # a storage hiccup must not end the watch, nor the run
                log.warning("looking for dead runs failed; trying again", exc_info=True)

    thread = threading.Thread(target=watch, name="visrec-dead-runs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s)


class ReleasingExecutor(dg.Executor):
    """Runs ``inner`` after releasing dead runs' slots, and keeps releasing them while it runs."""

    def __init__(self, inner: dg.Executor):
        self._inner = inner

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator[DagsterEvent]:
        instance, run = plan_context.instance, plan_context.dagster_run

        def engine_data(gone: ReleasedRun) -> EngineEventData:
            return EngineEventData(metadata={"released_run": gone.run_id, "pools": ", ".join(gone.pools)})

        def report(gone: ReleasedRun) -> None:  # from the watch thread: written straight to the instance
            instance.report_engine_event(gone.message, run, engine_data(gone))

        try:
            released = release_dead_runs(instance, own_run_id=run.run_id)
        except Exception as exc:  # the run itself can still go ahead
            released = []
            yield DagsterEvent.engine_event(plan_context, f"Could not look for dead runs holding pool slots: {exc!r}")
        for gone in released:
            yield DagsterEvent.engine_event(plan_context, gone.message, engine_data(gone))
        with watching_dead_runs(instance, run.run_id, report):
            yield from self._inner.execute(plan_context, execution_plan)


def releasing_dead_runs(executor_def: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """``executor_def`` (same name, config and requirements) wrapped in :class:`ReleasingExecutor`."""
    create = executor_def.executor_creation_fn
    if create is None:
        raise ValueError(f"executor {executor_def.name!r} has no creation function to wrap")
    return dg.ExecutorDefinition(
        name=executor_def.name,
        config_schema=executor_def.config_schema,
        requirements=executor_def.get_requirements,
        executor_creation_fn=lambda init_context: ReleasingExecutor(create(init_context)),
        description=(executor_def.description or "")
        + " Frees the pool slots of runs whose processes are gone, before the first step and while it runs.",
    )
