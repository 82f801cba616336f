"""Training triples: the random (BPR) sampler spec and CuratorNet's guideline triples."""


import time

import dagster as dg
import pandas as pd
import pydantic

from visrec_pipeline import triple_sets
from visrec_pipeline.defs.automation import data_side
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.defs.config_bridge import config_class_for, to_dataclass_kwargs
from visrec_pipeline.defs.temp_files import remove_leftover_temps
from visrec_pipeline.model_io import FEATURE_BACKBONE, build_inputs, load_rec_data, save_guided_triples
from visrec_pipeline.recsys.guided_sampler import GuidedSamplerConfig, build_guided_triples


def _record(conn, name: str, seed: int, data, fit, triples_per_epoch: int, file: str | None = None) -> None:
    """The ``triple_sets`` row of a triple set drawn from ``fit``'s training rows (``data``: all of them)."""
    triple_sets.record(
        conn,
        name,
        seed=seed,
        n_users=len(data.users),
        n_items=len(data.items),
        n_positives=fit.train.nnz,
        triples_per_epoch=triples_per_epoch,
        file=file,
    )


class RandomTriplesConfig(dg.Config):
    seed: int = pydantic.Field(default=0, description="base seed; epoch e draws with (seed, e)")
    triples_per_epoch: int = pydantic.Field(default=0, description="0 = one triple per training interaction")


@dg.asset(
    group_name="training_data",
    deps=[dg.AssetKey("split"), dg.AssetKey("item_catalog")],
    code_version="1",
    automation_condition=data_side(),
    description="Uniform BPR triples (user, positive from the user's training items, negative drawn uniformly "
    "outside them). Drawn afresh every epoch in torch by the trainer, never written out; this asset records the "
    "sampler's seed and counts for lineage.",
)
def triples_random(
    context: dg.AssetExecutionContext, config: RandomTriplesConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        data = load_rec_data(conn)
        fit, validation = data.validation_split()
        per_epoch = config.triples_per_epoch or fit.train.nnz
        _record(conn, "random", config.seed, data, fit, per_epoch)
    return dg.MaterializeResult(
        metadata={
            "seed": config.seed,
            "users": len(data.users),
            "items": len(data.items),
            "positives": int(fit.train.nnz),
            "validation_users": len(validation),
            "triples_per_epoch": int(per_epoch),
            "negatives": "uniform over items outside the user's training profile, resampled on collision",
        }
    )


GuidedTriplesConfig = config_class_for(GuidedSamplerConfig, "GuidedTriplesConfig")


@dg.asset(
    group_name="training_data",
    deps=[dg.AssetKey(k) for k in ("split", "item_catalog", f"embeddings_{FEATURE_BACKBONE}", "visual_clusters")],
    code_version="1",
    automation_condition=data_side(),
    description="CuratorNet's six guideline triples (creator, else visual cluster, as the artist; hybrid "
    "visual+creator similarity ranks G3/G6's candidates; by default negatives are any item outside the profile "
    "and no margin filter, a measured departure from the paper (far_negatives, margin restore it); duplicates "
    "dropped by hashing), from the training rows minus the validation rows, stored under triples/guided.npz.",
)
def triples_guided(
    context: dg.AssetExecutionContext, config: GuidedTriplesConfig, settings: VisrecSettings, duckdb: VisrecDuckDB  # type: ignore[valid-type]
) -> dg.MaterializeResult:
    ws = settings.workspace.ensure()
    remove_leftover_temps(context, ws.triples_dir)
    sampler_config = GuidedSamplerConfig(**to_dataclass_kwargs(GuidedSamplerConfig, config))
    with duckdb.get_connection() as conn:
        data = load_rec_data(conn)
        fit, _validation = data.validation_split()
        inputs = build_inputs(ws, frozenset({f"features:{FEATURE_BACKBONE}"}), fit, conn)
    started = time.perf_counter()
    triples = build_guided_triples(
        fit.train,
        fit.train_ts,
        inputs.features,
        creators=inputs.creators,
        clusters=inputs.clusters,
        feature_mask=inputs.feature_mask,
        config=sampler_config,
    )
    seconds = time.perf_counter() - started
    path = save_guided_triples(ws, triples, data.items)
    counts = triples.summary()
    with duckdb.get_connection() as conn:
        _record(conn, "guided", sampler_config.seed, data, fit, len(triples), file=str(path))
    table = pd.DataFrame({"guideline": list(counts), "triples": list(counts.values())})
    return dg.MaterializeResult(
        metadata={
            "triples": len(triples),
            "distinct_profiles": triples.profiles.n_rows,
            "per_guideline": dg.MetadataValue.md(table.to_markdown(index=False)),
            "seconds": round(seconds, 2),
            "seed": sampler_config.seed,
            "file": dg.MetadataValue.path(str(path)),
            "creator_known_share": float((inputs.creators >= 0).mean()) if inputs.creators is not None else 0.0,
        }
    )


defs = dg.Definitions(assets=[triples_random, triples_guided])
