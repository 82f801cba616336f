"""One trained model asset and one evaluation asset per registered recommender.

``build_model_assets(spec=...)`` is the only place model assets are defined: every
entry of ``visrec_pipeline.recsys.registry.MODEL_SPECS`` becomes
``model_<name>`` (fit + checkpoint) and ``evaluation_<name>`` (full-ranking
metrics into DuckDB). ``recommendations`` collects the top-k of every model.
"""


import dataclasses
import json
import time
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
import pydantic

from visrec_pipeline import db
from visrec_pipeline.defs.automation import follows_models, model_cadence
from visrec_pipeline.defs.config_bridge import config_class_for, to_dataclass_kwargs
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.lineage import training_lineage
from visrec_pipeline.model_io import build_inputs, data_versions, load_rec_data
from visrec_pipeline.recsys.registry import MODEL_SPECS, ModelSpec, build_model
from visrec_pipeline.reporting.grids import png_markdown
from visrec_pipeline.reporting.plots import training_curves_png

MODELS_GROUP = "models"
EVALUATION_GROUP = "evaluation"
CODE_VERSION = "1"

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
    """A Dagster ``Config`` mirroring the model's dataclass config (one source of truth)."""
    name = "".join(part.title() for part in spec.name.split("_")) + "Config"
    return config_class_for(spec.config_cls, name)


def _to_model_config(spec: ModelSpec, config: dg.Config) -> dict:
    return to_dataclass_kwargs(spec.config_cls, config)


class EvaluationConfig(dg.Config):
    ks: list[int] = pydantic.Field(default=[20, 100], description="cut-offs for R@k, P@k, nDCG@k")
    protocol: Literal["standard", "tutorial"] = pydantic.Field(
        default="standard", description="'tutorial' reproduces the tutorial's AUC/nDCG arithmetic"
    )
    batch_size: int = 256


def checkpoint_path(settings: VisrecSettings, name: str):
    return settings.workspace.models_dir / name / f"{name}.pt"


def load_trained(settings: VisrecSettings, name: str):
    """(model ready to score, data, inputs, checkpoint dict) for a trained model asset."""
    from visrec_pipeline.recsys.checkpoint import load_checkpoint

    ws = settings.workspace
    ckpt = load_checkpoint(checkpoint_path(settings, name))
    spec = MODEL_SPECS[name]
    with db.connect(ws.db_path) as conn:
        data = load_rec_data(conn)
    inputs = build_inputs(ws, spec.needs, data)
    model = build_model(name, ckpt["config"])
    if hasattr(model, "attach_inputs"):
        model.attach_inputs(data, inputs)
    model.load_state_dict(ckpt["state"])
    return model, data, inputs, ckpt


def build_model_assets(*, spec: ModelSpec) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    name = spec.name
    ConfigCls = config_class(spec)

    @dg.asset(
        name=f"model_{name}",
        group_name=MODELS_GROUP,
        deps=upstream_keys(spec),
        code_version=CODE_VERSION,
        kinds={"pytorch"},
        automation_condition=model_cadence(),
        description=f"{spec.description} Trained on the split's training rows; checkpoint under models/{name}/.",
    )
    def model_asset(
        context: dg.AssetExecutionContext, config: ConfigCls, settings: VisrecSettings, duckdb: VisrecDuckDB  # type: ignore[valid-type]
    ) -> dg.MaterializeResult:
        from visrec_pipeline.recsys.checkpoint import save_checkpoint

        ws = settings.workspace.ensure()
        with duckdb.get_connection() as conn:
            data = load_rec_data(conn)
            versions = data_versions(conn)
            provenance = _feature_provenance(conn, spec)
            lineage = training_lineage(conn, spec.needs)
        fit_data, validation = data.validation_split()
        inputs = build_inputs(ws, spec.needs, fit_data)
        inputs.validation = validation
        model_config = _to_model_config(spec, config)
        model = build_model(name, model_config)
        model.log = context.log  # type: ignore[assignment]
        started = time.perf_counter()
        history = model.fit(fit_data, inputs)
        train_seconds = time.perf_counter() - started
        path = checkpoint_path(settings, name)
        save_checkpoint(
            path,
            model_name=name,
            config=model_config,
            state=model.state_dict(),
            data_versions={**versions, **{k: str(v) for k, v in provenance.items()}},
            history=dataclasses.asdict(history),
            extra={"train_seconds": train_seconds, "lineage": lineage},
        )
        metadata = {
            "train_seconds": dg.MetadataValue.float(round(train_seconds, 3)),
            "checkpoint": dg.MetadataValue.path(str(path)),
            "config": dg.MetadataValue.json(model_config),
            "data_versions": dg.MetadataValue.json(versions),
            "lineage": dg.MetadataValue.json(lineage),
            "partitions_used": dg.MetadataValue.json(lineage["partitions"]),
            "n_users": len(data.users),
            "n_items": len(data.items),
            "n_train_rows": int(fit_data.train.nnz),
            "n_validation_users": len(validation),
        }
        if provenance:
            metadata["features"] = dg.MetadataValue.json(provenance)
        if history.loss:
            metadata["epochs_run"] = len(history.loss)
            metadata["final_loss"] = float(history.loss[-1])
            metadata["best_epoch"] = history.best_epoch if history.best_epoch is not None else -1
            png = training_curves_png(history.loss, history.val_auc, title=name)
            metadata["training_curves"] = dg.MetadataValue.md(png_markdown(png, f"{name} training curves"))
        if history.notes:
            metadata["notes"] = dg.MetadataValue.json(_jsonable(history.notes))
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset(
        name=f"evaluation_{name}",
        group_name=EVALUATION_GROUP,
        deps=[dg.AssetKey(f"model_{name}"), dg.AssetKey("split")],
        code_version=CODE_VERSION,
        automation_condition=follows_models(),
        description=f"Full-ranking evaluation of {name}: AUC, RR, R@k, P@k, nDCG@k per holdout row and means.",
    )
    def evaluation_asset(
        context: dg.AssetExecutionContext, config: EvaluationConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
    ) -> dg.MaterializeResult:
        from visrec_pipeline.recsys.evaluate import evaluate

        model, data, _inputs, ckpt = load_trained(settings, name)
        cold = _cold_items(data)
        started = time.perf_counter()
        result = evaluate(
            model.score,
            data.holdout,
            len(data.items),
            ks=tuple(config.ks),
            protocol=config.protocol,
            batch_size=config.batch_size,
            cold_items=cold if cold.size else None,
        )
        eval_seconds = time.perf_counter() - started
        rows = result.per_row.copy()
        with duckdb.get_connection() as conn:
            write_evaluation(conn, name, result, rows, train_seconds=float(ckpt.get("extra", {}).get("train_seconds", 0.0)))
        table = pd.DataFrame([result.means]).T.rename(columns={0: name})
        metadata = {
            "protocol": result.protocol,
            "n_rows": len(rows),
            "eval_seconds": round(eval_seconds, 3),
            "metrics": dg.MetadataValue.md(table.to_markdown(floatfmt=".5f")),
            "trained_on": dg.MetadataValue.json(ckpt.get("data_versions", {})),
            "lineage": dg.MetadataValue.json(ckpt.get("extra", {}).get("lineage", {})),
        }
        for key, value in result.means.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                metadata[key] = dg.MetadataValue.float(float(value))
        return dg.MaterializeResult(metadata=metadata)

    return model_asset, evaluation_asset


def _cold_items(data) -> np.ndarray:
    seen = np.zeros(len(data.items), bool)
    seen[data.train.indices] = True
    return np.flatnonzero(~seen)


def _feature_provenance(conn, spec: ModelSpec) -> dict:
    out = {}
    for need in spec.needs:
        kind, _, backbone = need.partition(":")
        if kind in ("features", "spatial") and db.table_exists(conn, "embedding_index"):
            row = conn.execute(
                "SELECT any_value(weights_tag), count(*) FROM embedding_index WHERE backbone = ?", [backbone]
            ).fetchone()
            out[f"{backbone}_weights"] = row[0]
            out[f"{backbone}_items"] = int(row[1])
    return out


def write_evaluation(conn, name: str, result, rows: pd.DataFrame, *, train_seconds: float) -> None:
    """Replace this model's rows in ``evaluation_rows`` (long format) and ``evaluation_summary``."""
    db.run_sql(conn, "evaluation_tables")
    id_cols = [c for c in ("user_id", "profile_size", "n_relevant", "n_candidates", "has_cold") if c in rows]
    metric_cols = [c for c in rows.columns if c not in id_cols and c != "row"]
    long = rows.melt(id_vars=id_cols, value_vars=metric_cols, var_name="metric", value_name="value")
    long.insert(0, "model", name)
    long.insert(1, "protocol", result.protocol)
    for col in ("profile_size", "n_relevant", "n_candidates"):
        if col not in long:
            long[col] = -1
    if "has_cold" not in long:
        long["has_cold"] = False
    long = long[["model", "protocol", "user_id", "profile_size", "n_relevant", "n_candidates", "has_cold", "metric", "value"]]
    summary = [
        (name, result.protocol, key, float(value), len(rows), train_seconds)
        for key, value in result.means.items()
        if isinstance(value, (int, float))
    ]
    with db.transaction(conn):
        conn.execute("DELETE FROM evaluation_rows WHERE model = ? AND protocol = ?", [name, result.protocol])
        conn.execute("DELETE FROM evaluation_summary WHERE model = ? AND protocol = ?", [name, result.protocol])
        conn.register("eval_long", long)
        conn.execute("INSERT INTO evaluation_rows SELECT * FROM eval_long")
        conn.unregister("eval_long")
        conn.executemany(
            "INSERT INTO evaluation_summary VALUES (?, ?, ?, ?, ?, ?, now())",
            summary,
        )


class RecommendationsConfig(dg.Config):
    k: int = pydantic.Field(default=20, description="items stored per user and model")


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
        context: dg.AssetExecutionContext, config: RecommendationsConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
    ) -> dg.MaterializeResult:
        from visrec_pipeline.recsys.evaluate import top_k

        frames = []
        for name in model_names:
            model, data, _inputs, _ckpt = load_trained(settings, name)
            items_idx, scores = top_k(model.score, data.holdout, len(data.items), config.k)
            m, k = items_idx.shape
            flat = items_idx.reshape(-1)
            valid = flat >= 0  # rows with fewer than k candidates are padded with -1
            frame = pd.DataFrame(
                {
                    "model": name,
                    "user_id": np.repeat(data.holdout.user_ids, k),
                    "rank": np.tile(np.arange(1, k + 1), m),
                    "item_id": data.items.ids[np.where(valid, flat, 0)],
                    "score": scores.reshape(-1).astype(np.float64),
                }
            )
            frames.append(frame[valid])
        recs = pd.concat(frames, ignore_index=True)
        with duckdb.get_connection() as conn:
            db.run_sql(conn, "recommendations_table")
            with db.transaction(conn):
                conn.execute("DELETE FROM recommendations")
                conn.register("recs_df", recs)
                conn.execute("INSERT INTO recommendations SELECT model, user_id, rank, item_id, score FROM recs_df")
                conn.unregister("recs_df")
        sample = recs[recs["rank"] <= 5].groupby("model").head(5)
        return dg.MaterializeResult(
            metadata={
                "rows": len(recs),
                "models": len(model_names),
                "k": config.k,
                "sample": dg.MetadataValue.md(sample.to_markdown(index=False)),
            }
        )

    return recommendations


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


MODEL_ASSETS = [build_model_assets(spec=spec) for spec in MODEL_SPECS.values()]
defs = dg.Definitions(
    assets=[a for pair in MODEL_ASSETS for a in pair] + [build_recommendations_asset(list(MODEL_SPECS))],
)
