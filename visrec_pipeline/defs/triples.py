"""Training triples: the random (BPR) sampler spec and CuratorNet's guideline triples."""

from __future__ import annotations

import dagster as dg
import pydantic

from visrec_pipeline import db
from visrec_pipeline.defs.resources import DUCKDB_POOL, VisrecDuckDB, VisrecSettings
from visrec_pipeline.model_io import load_rec_data


class RandomTriplesConfig(dg.Config):
    seed: int = pydantic.Field(default=0, description="base seed; epoch e draws with (seed, e)")
    triples_per_epoch: int = pydantic.Field(default=0, description="0 = one triple per training interaction")


@dg.asset(
    group_name="training_data",
    deps=[dg.AssetKey("split"), dg.AssetKey("item_catalog")],
    pool=DUCKDB_POOL,
    code_version="1",
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
        db.run_script(conn, "triple_sets_table")
        with db.transaction(conn):
            conn.execute("DELETE FROM triple_sets WHERE name = 'random'")
            conn.execute(
                "INSERT INTO triple_sets VALUES ('random', ?, ?, ?, ?, ?, NULL, now())",
                [config.seed, len(data.users), len(data.items), fit.train.nnz, per_epoch],
            )
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


defs = dg.Definitions(assets=[triples_random])
