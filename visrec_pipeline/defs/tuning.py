"""``tuning_<model>``: one hyper-parameter search asset per tunable model, and the ``visrec_tuning`` job.

Each asset is one call into :func:`visrec_pipeline.pipeline.tuning.tune_model` plus its metadata.
They are materialized on demand (no automation condition; left out of ``visrec_all``), with the same
budget config for every model. ``model_<name>`` reads the result from DuckDB when its config says
``use_tuned: true``.
"""

import dagster as dg
import pandas as pd
import pydantic

from visrec_pipeline.defs.after_failure import recording_step_memory
from visrec_pipeline.defs.models import upstream_keys
from visrec_pipeline.defs.resources import VisrecSettings
from visrec_pipeline.pipeline.tuning import METRIC, TuningBudget, TuningResult, tune_model
from visrec_pipeline.recsys.registry import MODEL_SPECS, ModelSpec
from visrec_pipeline.recsys.search_spaces import EXPENSIVE_TO_TUNE, SEARCH_SPACES

TUNING_GROUP = "tuning"
TUNING_JOB = "visrec_tuning"
CODE_VERSION = "1"
_DEFAULT = TuningBudget()


class TuningConfig(dg.Config):
    n_trials: int = pydantic.Field(default=_DEFAULT.n_trials, description="trials, the first one the default config")
    seeds_per_trial: int = pydantic.Field(
        default=_DEFAULT.seeds_per_trial, description="trainings per trial (seeds seed, seed+1, ...); its value is their mean"
    )
    timeout_s: float = pydantic.Field(default=_DEFAULT.timeout_s, description="no new trial starts after this many seconds")
    max_epochs: int = pydantic.Field(
        default=_DEFAULT.max_epochs, description="cap on train.epochs of every trial (0: the model's own epochs)"
    )
    sampler_seed: int = _DEFAULT.sampler_seed
    seed: int = pydantic.Field(default=_DEFAULT.seed, description="first training seed of every trial")
    device: str = _DEFAULT.device


def build_tuning_asset(spec: ModelSpec) -> dg.AssetsDefinition:
    name = spec.name
    space = SEARCH_SPACES[name]

    @dg.asset(
        name=f"tuning_{name}",
        group_name=TUNING_GROUP,
        deps=upstream_keys(spec),
        code_version=CODE_VERSION,
        kinds={"optuna"},
        description=f"Hyper-parameter search of {name} on the validation split (training rows minus each user's "
        f"most recent one; scored on those rows; the test holdout is not read): {', '.join(space.keys())}. "
        "Every trial goes to DuckDB table tuning_trials; model_" + name + " trains with the best one when its "
        "config says use_tuned.",
    )
    def tuning_asset(
        context: dg.AssetExecutionContext, config: TuningConfig, settings: VisrecSettings
    ) -> dg.MaterializeResult:
        budget = TuningBudget(**config.model_dump())
        with recording_step_memory(context):
            result = tune_model(settings.workspace, name, budget, run_id=context.run_id, log=context.log)
        return dg.MaterializeResult(metadata=tuning_metadata(result))

    return tuning_asset


def _trials_table(result: TuningResult) -> str:
    trials = result.trials
    per_trial = trials.groupby("trial", sort=True).agg(
        params=("params", "first"),
        value=("value", "mean"),
        state=("state", lambda s: "COMPLETE" if (s == "COMPLETE").all() else "FAIL"),
        best_epoch=("best_epoch", "median"),
        seconds=("duration_s", "sum"),
    )
    table = per_trial.reset_index()
    table["value"] = table["value"].map(lambda v: "" if pd.isna(v) else f"{v:.5f}")
    table["best_epoch"] = table["best_epoch"].map(lambda v: "" if pd.isna(v) else f"{v:g}")
    table["seconds"] = table["seconds"].map(lambda v: f"{v:.1f}")
    return table.to_markdown(index=False)


def tuning_metadata(result: TuningResult) -> dict:
    best = result.best
    gain = None if result.default_value is None else best.value - result.default_value
    return {
        "metric": METRIC,
        "best_value": dg.MetadataValue.float(best.value),
        "default_value": dg.MetadataValue.float(result.default_value) if result.default_value is not None else "failed",
        "gain_over_default": dg.MetadataValue.float(gain) if gain is not None else "n/a",
        "best_trial": best.trial,
        "best_params": dg.MetadataValue.json(best.params),
        "best_overrides": dg.MetadataValue.json(best.overrides),
        "best_epoch": best.best_epoch if best.best_epoch is not None else -1,
        "n_trials": result.n_trials_run,
        "n_complete": int(result.trials.groupby("trial")["state"].apply(lambda s: (s == "COMPLETE").all()).sum()),
        "stopped_by": result.stopped_by,
        "budget": dg.MetadataValue.json(
            {k: getattr(result.budget, k) for k in ("n_trials", "seeds_per_trial", "timeout_s", "max_epochs", "sampler_seed", "seed")}
        ),
        "space": dg.MetadataValue.md(
            pd.DataFrame([{"key": p.key, "range": p.describe()} for p in result.space.params]).to_markdown(index=False)
            + (f"\n\nfixed: `{result.space.fixed}`" if result.space.fixed else "")
        ),
        "trials": dg.MetadataValue.md(_trials_table(result)),
        "wall_seconds": dg.MetadataValue.float(round(result.wall_seconds, 1)),
        "run_id": result.run_id,
    }


TUNING_ASSETS = [build_tuning_asset(MODEL_SPECS[name]) for name in MODEL_SPECS if name in SEARCH_SPACES]

TUNING_JOB_DEF = dg.define_asset_job(
    TUNING_JOB,
    selection=dg.AssetSelection.groups(TUNING_GROUP)
    - dg.AssetSelection.assets(*(f"tuning_{n}" for n in sorted(EXPENSIVE_TO_TUNE))),
    description="Tune every model except the expensive ones (DVBPR: materialize tuning_dvbpr by itself) with the "
    "same budget.",
)

defs = dg.Definitions(assets=TUNING_ASSETS, jobs=[TUNING_JOB_DEF])
