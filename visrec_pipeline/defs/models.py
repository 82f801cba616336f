"""One trained model asset and one evaluation asset per registered recommender.

``build_model_assets(spec=...)`` is the only place model assets are defined: every
entry of ``visrec_pipeline.recsys.registry.MODEL_SPECS`` becomes
``model_<name>`` (fit + checkpoint) and ``evaluation_<name>`` (full-ranking
metrics into DuckDB). ``recommendations`` collects the top-k of every model.
Each asset is one call into ``visrec_pipeline.pipeline`` plus its metadata.
"""


import dataclasses
import json
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
import pydantic

from visrec_pipeline import step_memory
from visrec_pipeline.defs.after_failure import recording_step_memory
from visrec_pipeline.defs.automation import follows_models, model_cadence
from visrec_pipeline.defs.config_bridge import config_class_for, to_dataclass_kwargs
from visrec_pipeline.defs.resources import ComputeResource, VisrecSettings
from visrec_pipeline.distributed.evaluation import evaluator_for
from visrec_pipeline.distributed.training import fitter_for
from visrec_pipeline.defs.temp_files import remove_leftover_temps
from visrec_pipeline.pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_KS,
    DEFAULT_PROTOCOL,
    ModelEvaluation,
    TrainedModel,
    evaluate_model,
    recommend_each,
    train_seeds,
)
from visrec_pipeline.recsys.registry import MODEL_SPECS, ModelSpec
from visrec_pipeline.reporting.grids import png_markdown
from visrec_pipeline.reporting.plots import training_curves_png

MODELS_GROUP = "models"
EVALUATION_GROUP = "evaluation"
CODE_VERSION = "1"
RAY_TRAIN_DIR = "ray_train"  # under the workspace (shared storage): Ray Train's run folders, removed after each fit

# which upstream asset provides each kind of model input
_NEED_TO_ASSET = {
    "features": "embeddings_{}",
    "spatial": "embeddings_{}",
    "images": "item_images",
    "triples_random": "triples_random",
    "triples_guided": "triples_guided",
}


def upstream_keys(spec: ModelSpec) -> list[dg.AssetKey]:
    keys = {"split", "item_catalog"}
    for need in spec.needs:
        kind, _, arg = need.partition(":")
        keys.add(_NEED_TO_ASSET[kind].format(arg))
    if any(n.startswith("triples_guided") for n in spec.needs):
        keys.add("visual_clusters")
    return [dg.AssetKey(k) for k in sorted(keys)]


def config_class(spec: ModelSpec) -> type[dg.Config]:
    """A Dagster ``Config`` mirroring the model's dataclass config (one source of truth), plus how to
    train: ``use_tuned`` and ``refit`` (``pipeline.train_model``)."""
    name = "".join(part.title() for part in spec.name.split("_")) + "Config"
    return pydantic.create_model(
        name + "WithTraining",
        __base__=config_class_for(spec.config_cls, name),
        use_tuned=(bool, pydantic.Field(default=False, description=f"train with the best configuration of the "
                   f"latest tuning_{spec.name} run (table tuning_trials) over the keys it searched")),
        refit=(bool, pydantic.Field(default=False, description="after the early-stopped fit, retrain on all the "
               "split's training rows (validation rows included) for the epochs (EASE: the lambda) it chose")),
    )


_TRAINING_OPTIONS = ("use_tuned", "refit")


SEEDS_FIELD = "seeds"


def model_asset_config_class(spec: ModelSpec) -> type[dg.Config]:
    """The model's config plus ``seeds``: how many seeds the asset trains (see ``pipeline.seeds``)."""
    base = config_class(spec)
    if any(f.name == SEEDS_FIELD for f in dataclasses.fields(spec.config_cls)):
        raise ValueError(f"{spec.name}: its config may not have a field named {SEEDS_FIELD!r} (the asset's own)")
    seeds = pydantic.Field(
        default=1,
        ge=1,
        description="seeds to train: seed 0 is the checkpoint recommendations use; seed k (the config's seed + k) "
        "is stored as models/<name>/seed_<k>.pt, and the report shows each metric's mean ± std over them",
    )
    return pydantic.create_model(base.__name__, __base__=base, **{SEEDS_FIELD: (int, seeds)})  # type: ignore[call-overload]


def _to_model_config(spec: ModelSpec, config: dg.Config) -> dict:
    values = to_dataclass_kwargs(spec.config_cls, config)
    return {k: v for k, v in values.items() if k not in _TRAINING_OPTIONS and k != SEEDS_FIELD}


def _peak_rss_mib() -> float:
    return round(step_memory.peak_rss_bytes() / 2**20, 1)


class EvaluationConfig(dg.Config):
    ks: list[int] = pydantic.Field(default=list(DEFAULT_KS), description="cut-offs for R@k, P@k, nDCG@k")
    protocol: Literal["standard", "tutorial"] = pydantic.Field(
        default=DEFAULT_PROTOCOL,
        description="'tutorial' reproduces the tutorial's AUC/nDCG arithmetic and inputs: each user's last 10 "
        "profile items by time are scored and excluded",
    )
    batch_size: int = DEFAULT_BATCH_SIZE


def build_model_assets(*, spec: ModelSpec) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    name = spec.name
    ConfigCls = model_asset_config_class(spec)

    @dg.asset(
        name=f"model_{name}",
        group_name=MODELS_GROUP,
        deps=upstream_keys(spec),
        code_version=CODE_VERSION,
        kinds={"pytorch"},
        automation_condition=model_cadence(),
        description=f"{spec.description} Trained on the split's training rows minus the most recent training row "
        "of each user who has two or more (the validation rows, which early stopping scores); with config refit, "
        "retrained on all the split's training rows for the epochs (EASE: the lambda) validation chose. use_tuned: "
        f"the config of tuning_{name}'s best trial. Checkpoint under models/{name}/ (config seeds > 1: also one "
        "file per extra seed).",
    )
    def model_asset(
        context: dg.AssetExecutionContext,
        config: ConfigCls,  # type: ignore[valid-type]
        settings: VisrecSettings,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        remove_leftover_temps(context, settings.workspace.models_dir / name)
        seeds = getattr(config, SEEDS_FIELD)
        # a step the OS kills still tells its peak memory; on Ray, the remote epochs go to the run log
        with recording_step_memory(context), fitter_for(
            compute.settings, settings.workspace.root / RAY_TRAIN_DIR, context.log.info
        ) as fitter:
            trained_seeds = train_seeds(
                settings.workspace,
                name,
                _to_model_config(spec, config),
                seeds,
                use_tuned=config.use_tuned,
                refit=config.refit,
                log=context.log,
                fitter=fitter,
            )
        trained = trained_seeds[0]
        metadata = _training_metadata(trained)
        metadata["seeds"] = seeds
        if seeds > 1:
            metadata["seed_checkpoints"] = dg.MetadataValue.json([str(t.checkpoint) for t in trained_seeds])
        metadata["peak_rss_mib"] = dg.MetadataValue.float(_peak_rss_mib())
        # the seed-0 checkpoint's own hash: a retraining (new data or new config) is a new version downstream
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(trained.checkpoint_sha256[:16]))

    @dg.asset(
        name=f"evaluation_{name}",
        group_name=EVALUATION_GROUP,
        deps=[dg.AssetKey(f"model_{name}"), dg.AssetKey("split")],
        code_version=CODE_VERSION,
        automation_condition=follows_models(),
        description=f"Full-ranking evaluation of {name}: AUC, RR, R@k, P@k, nDCG@k per holdout row and means "
        "(means of every seed the model asset trained).",
    )
    def evaluation_asset(
        context: dg.AssetExecutionContext, config: EvaluationConfig, settings: VisrecSettings, compute: ComputeResource
    ) -> dg.MaterializeResult:
        with recording_step_memory(context), evaluator_for(compute.settings, context.log.info) as evaluator:
            evaluation = evaluate_model(
                settings.workspace,
                name,
                ks=config.ks,
                protocol=config.protocol,
                batch_size=config.batch_size,
                log=context.log,
                evaluator=evaluator,
            )
        metadata = _evaluation_metadata(evaluation)
        metadata["peak_rss_mib"] = dg.MetadataValue.float(_peak_rss_mib())
        return dg.MaterializeResult(metadata=metadata)

    return model_asset, evaluation_asset


def _training_metadata(trained: TrainedModel) -> dict:
    name, history = trained.name, trained.history
    metadata = {
        "train_seconds": dg.MetadataValue.float(round(trained.train_seconds, 3)),
        "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
        "checkpoint_sha256": trained.checkpoint_sha256,
        "config": dg.MetadataValue.json(trained.config),
        "data_versions": dg.MetadataValue.json(trained.versions),
        "lineage": dg.MetadataValue.json(trained.lineage),
        "partitions_used": dg.MetadataValue.json(trained.lineage["partitions"]),
        "n_users": trained.n_users,
        "n_items": trained.n_items,
        "n_train_rows": trained.n_train_rows,
        "n_validation_users": trained.n_validation_users,
        "refit": trained.refit,
    }
    if trained.tuned is not None:
        metadata["tuned_from"] = dg.MetadataValue.json(trained.tuned)
    if trained.validation_fit is not None:
        metadata["validation_fit"] = dg.MetadataValue.json(_jsonable(trained.validation_fit))
    if trained.features:
        metadata["features"] = dg.MetadataValue.json(trained.features)
    if history.loss:
        metadata["epochs_run"] = len(history.loss)
        metadata["final_loss"] = float(history.loss[-1])
        metadata["best_epoch"] = history.best_epoch if history.best_epoch is not None else -1
        if "stopped_by" in history.notes:  # time_budget / early_stopping / epochs
            metadata["stopped_by"] = str(history.notes["stopped_by"])
        png = training_curves_png(history.loss, history.val_auc, title=name)
        metadata["training_curves"] = dg.MetadataValue.md(png_markdown(png, f"{name} training curves"))
    # a model that reports how spread its attentions are (ACF: normalised entropies, max shares) gets
    # them as plain numbers, plottable across materializations
    for key, value in history.notes.get("attention", {}).items():
        metadata[f"attention_{key}"] = dg.MetadataValue.float(float(value)) if isinstance(value, float) else value
    if history.notes:
        metadata["notes"] = dg.MetadataValue.json(_jsonable(history.notes))
    return metadata


def _evaluation_metadata(evaluation: ModelEvaluation) -> dict:
    result = evaluation.result
    table = pd.DataFrame([result.means]).T.rename(columns={0: evaluation.name})
    metadata = {
        "protocol": result.protocol,
        "n_rows": evaluation.n_rows,
        "eval_seconds": round(evaluation.eval_seconds, 3),
        "metrics": dg.MetadataValue.md(table.to_markdown(floatfmt=".5f")),
        "trained_on": dg.MetadataValue.json(evaluation.trained_on),
        "lineage": dg.MetadataValue.json(evaluation.lineage),
    }
    for key, value in result.means.items():
        if isinstance(value, (int, float)) and np.isfinite(value):
            metadata[key] = dg.MetadataValue.float(float(value))
    metadata["seeds"] = len(evaluation.seed_means)
    if len(evaluation.seed_means) > 1:
        per_seed = pd.DataFrame(evaluation.seed_means).T.rename_axis("seed")
        per_seed = per_seed[[c for c in per_seed.columns if ":" not in c]]
        metadata["metrics_by_seed"] = dg.MetadataValue.md(per_seed.to_markdown(floatfmt=".5f"))
    return metadata


class RecommendationsConfig(dg.Config):
    k: int = pydantic.Field(default=20, description="items stored per user and model")
    models: list[str] = pydantic.Field(
        default=[],
        description="models to recommend with; empty: every model (a run after failed model steps leaves those out)",
    )


def build_recommendations_asset(model_names: list[str]) -> dg.AssetsDefinition:
    @dg.asset(
        name="recommendations",
        group_name=EVALUATION_GROUP,
        deps=[dg.AssetKey(f"model_{n}") for n in model_names],
        code_version=CODE_VERSION,
        automation_condition=follows_models(),
        description="Top-k items per holdout user for every model (consumed items excluded), ready for an application.",
    )
    def recommendations(
        context: dg.AssetExecutionContext, config: RecommendationsConfig, settings: VisrecSettings
    ) -> dg.MaterializeResult:
        unknown = sorted(set(config.models) - set(model_names))
        if unknown:
            raise dg.Failure(f"recommendations: unknown models {unknown} (known: {model_names})")
        names = [n for n in model_names if n in config.models] if config.models else model_names
        with recording_step_memory(context):
            run = recommend_each(settings.workspace, names, config.k, log=context.log)
        recs = run.recommendations
        sample = recs[recs["rank"] <= 5].groupby("model").head(5)
        metadata = {
            "rows": len(recs),
            "models": len(names) - len(run.failures),
            "k": config.k,
            "sample": dg.MetadataValue.md(sample.to_markdown(index=False)),
            "peak_rss_mib": dg.MetadataValue.float(_peak_rss_mib()),
        }
        if run.failures:
            # the others' recommendations are stored; the report names these
            metadata["failed_models"] = dg.MetadataValue.json(run.failures)
        return dg.MaterializeResult(metadata=metadata)

    return recommendations


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


MODEL_ASSETS = [build_model_assets(spec=spec) for spec in MODEL_SPECS.values()]
defs = dg.Definitions(
    assets=[a for pair in MODEL_ASSETS for a in pair] + [build_recommendations_asset(list(MODEL_SPECS))],
)
