"""The named automation conditions of the pipeline (declarative automation).

- ``data_side``: ingest, catalogue, images, embeddings, clusters, split and
  triples follow new data at once (each step is incremental or cheap).
- ``model_cadence``: a model retrains at most once per tick of
  ``VISREC_MODEL_CRON`` (default daily 03:00 UTC), and only when some input
  changed since it was last trained: never on every batch.
- ``follows_models``: evaluation_<name> follows its model only (a new split
  alone must not re-evaluate an old model against items it never saw).
- ``follows_evaluations``: the report follows whatever evaluations exist.

Every condition is "since last handled": however many batches or cron ticks
pass while automation is paused, re-enabling it requests each asset at most
once.
"""

import os

import dagster as dg

MODEL_CRON_ENV = "VISREC_MODEL_CRON"
DEFAULT_MODEL_CRON = "0 3 * * *"
CRON_TIMEZONE = "UTC"

_AC = dg.AutomationCondition


def model_cron() -> str:
    return os.environ.get(MODEL_CRON_ENV, "").strip() or DEFAULT_MODEL_CRON


def data_side() -> dg.AutomationCondition:
    return _AC.eager().with_label("data side: eager on new data")


def model_cadence(cron: str | None = None) -> dg.AutomationCondition:
    cron = cron or model_cron()
    tick = _AC.cron_tick_passed(cron, CRON_TIMEZONE).since_last_handled()
    new_inputs = _AC.any_deps_updated().since_last_handled()
    return (
        _AC.in_latest_time_window()
        & tick.with_label(f"cron tick {cron} ({CRON_TIMEZONE}) since last trained")
        & new_inputs.with_label("inputs updated since last trained")
        & ~_AC.any_deps_missing()
        & ~_AC.any_deps_in_progress()
        & ~_AC.in_progress()
    ).with_label(f"models: retrain on cron {cron} when inputs changed")


def follows_models() -> dg.AutomationCondition:
    return _AC.eager().allow(dg.AssetSelection.groups("models")).with_label("follows the models")


def follows_evaluations() -> dg.AutomationCondition:
    updated = _AC.any_deps_updated().since_last_handled()
    return (updated & ~_AC.any_deps_in_progress() & ~_AC.in_progress()).with_label(
        "report: follows the evaluations"
    )
