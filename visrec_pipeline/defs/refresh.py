"""Incremental refresh: the sensor that registers new batches, the refresh job and its schedule,
and the automation sensor that evaluates the named conditions of ``defs/automation.py``.

Flow: ``incoming_files_sensor`` sees a new file in ``incoming/``, adds a
partition of ``incoming_interactions`` and requests its run (run key = batch
key, so a file is never requested twice). The data side then follows, either
by declarative automation (``visrec_automation``) or by the
``visrec_refresh_schedule``; models retrain on their cron cadence.
Everything ships stopped: switch it on in the UI (README, "Incremental refresh").
"""

# No ``from __future__ import annotations``: Dagster resolves resource annotations at definition time.

import json
import os

import dagster as dg

from visrec_pipeline.defs.incoming import BATCHES, INCOMING_ASSET, PARTITIONED_TAG, incoming_interactions
from visrec_pipeline.defs.resources import VisrecSettings
from visrec_pipeline.ingest.incoming import key_hash, scan_incoming

REFRESH_CRON_ENV = "VISREC_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 * * * *"
MAX_BATCHES_PER_TICK_ENV = "VISREC_MAX_BATCHES_PER_TICK"
DEFAULT_MAX_BATCHES_PER_TICK = 10

_PARTITIONED = dg.AssetSelection.tag(*next(iter(PARTITIONED_TAG.items())))

# Everything from the interactions to the training triples, without the models: cheap and
# incremental (images and features are computed for new items only), so it may run often.
DATA_SIDE = (
    dg.AssetSelection.groups("ingest", "images", "features", "training_data")
    - _PARTITIONED
    - dg.AssetSelection.assets("raw_interactions")
)

ingest_batch_job = dg.define_asset_job(
    "ingest_incoming_batch",
    selection=dg.AssetSelection.assets(INCOMING_ASSET),
    partitions_def=BATCHES,
    description="Write one delivered batch (a partition of incoming_interactions) into raw_interactions.",
)

refresh_job = dg.define_asset_job(
    "visrec_refresh",
    selection=DATA_SIDE,
    description="Bring the data side up to date with every ingested batch: interactions, catalogue, images "
    "and features of new items only, split, clusters and triples.",
)


def refresh_cron() -> str:
    return os.environ.get(REFRESH_CRON_ENV, "").strip() or DEFAULT_REFRESH_CRON


def max_batches_per_tick() -> int:
    raw = os.environ.get(MAX_BATCHES_PER_TICK_ENV, "").strip()
    return max(1, int(raw)) if raw else DEFAULT_MAX_BATCHES_PER_TICK


def _load_cursor(raw: str | None) -> dict[str, tuple[int, int, str]]:
    if not raw:
        return {}
    try:
        files = json.loads(raw).get("files", {})
        return {str(k): (int(v[0]), int(v[1]), str(v[2])) for k, v in files.items()}
    except (ValueError, TypeError, AttributeError, IndexError):
        return {}  # an unreadable cursor only costs re-hashing the files


@dg.sensor(
    name="incoming_files_sensor",
    job=ingest_batch_job,
    minimum_interval_seconds=30,
    description="Registers each new interactions file of the dataset's incoming/ folder as a partition of "
    "incoming_interactions and requests its run. Files whose content is already a batch are skipped, so "
    "delivering the same file again does nothing. Cursor: size, mtime and SHA-256 per file seen.",
)
def incoming_files_sensor(context: dg.SensorEvaluationContext, settings: VisrecSettings) -> dg.SensorResult:
    incoming_dir = settings.workspace.incoming_dir
    known = _load_cursor(context.cursor)
    files = scan_incoming(incoming_dir, known)
    stats = {f.name: f.path.stat() for f in files}
    cursor = json.dumps(
        {"files": {f.name: [stats[f.name].st_size, stats[f.name].st_mtime_ns, f.sha256] for f in files}},
        sort_keys=True,
    )
    registered = set()
    for key in context.instance.get_dynamic_partitions(BATCHES.name):
        try:
            registered.add(key_hash(key))
        except ValueError:
            continue  # a partition added by hand under another name
    new, seen = [], set(registered)
    for f in files:
        h = key_hash(f.key)
        if h in seen:
            continue
        seen.add(h)
        new.append(f)
    # A paused sensor may find many files at once: a bounded number per tick, the rest next tick.
    limit = max_batches_per_tick()
    todo = new[:limit]
    if not todo:
        return dg.SensorResult(skip_reason=f"no new batch in {incoming_dir}", cursor=cursor)
    if len(new) > limit:
        context.log.info(f"{len(new)} new batches; registering {limit} now, the rest on the next ticks")
    keys = [f.key for f in todo]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=f.key, partition_key=f.key, tags={"visrec/source_file": f.source_file})
            for f in todo
        ],
        dynamic_partitions_requests=[BATCHES.build_add_request(keys)],
        cursor=cursor,
    )


@dg.schedule(
    name="visrec_refresh_schedule",
    job=refresh_job,
    cron_schedule=refresh_cron(),
    execution_timezone="UTC",
    description=f"Runs visrec_refresh on the cron of {REFRESH_CRON_ENV} (default '{DEFAULT_REFRESH_CRON}') when a "
    "batch was ingested since the data side last ran; skips otherwise.",
)
def visrec_refresh_schedule(context: dg.ScheduleEvaluationContext):
    if not refresh_due(context.instance):
        return dg.SkipReason("no batch ingested since the data side last ran")
    return dg.RunRequest(run_key=f"refresh-{context.scheduled_execution_time.isoformat()}")


def refresh_due(instance: dg.DagsterInstance) -> bool:
    """A batch was ingested after the data side (``interactions``) last ran."""
    batch = instance.get_latest_materialization_event(dg.AssetKey(INCOMING_ASSET))
    done = instance.get_latest_materialization_event(dg.AssetKey("interactions"))
    return batch is not None and (done is None or batch.timestamp > done.timestamp)


visrec_automation = dg.AutomationConditionSensorDefinition(
    "visrec_automation",
    target=dg.AssetSelection.all(),
    minimum_interval_seconds=60,
    description="Evaluates every asset's automation condition (data side eager, models on their cron, "
    "evaluation and report after the models). Conditions are 'since last handled', so switching this on "
    "after a pause requests each asset at most once.",
)

# incoming.py and commons_poll.py hold the partitioned asset and the Commons sensor; the defs
# folder loads each module's one Definitions object on its own.
defs = dg.Definitions(
    jobs=[ingest_batch_job, refresh_job],
    sensors=[incoming_files_sensor, visrec_automation],
    schedules=[visrec_refresh_schedule],
)
