"""What a model is about to be trained on, read in one go before training (no dagster).

Stored in the checkpoint and shown as the model asset's metadata: the fingerprints of the
tables it reads, the feature weights per backbone and the batches/embeddings/triples lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from visrec_pipeline.embeddings.store import index_weights
from visrec_pipeline.lineage import training_lineage
from visrec_pipeline.model_io import data_versions


@dataclass(frozen=True)
class TrainingProvenance:
    versions: dict[str, str]  # content fingerprint of each table a model reads
    features: dict  # ``<backbone>_weights`` and ``<backbone>_items`` per feature backbone the model needs
    lineage: dict  # lineage.training_lineage


def feature_provenance(conn: duckdb.DuckDBPyConnection, needs) -> dict:
    """Weights tag and indexed item count of every backbone whose features (pooled or spatial) ``needs`` names."""
    out = {}
    for need in needs:
        kind, _, backbone = need.partition(":")
        if kind not in ("features", "spatial"):
            continue
        weights = index_weights(conn, backbone)
        if weights is not None:
            out[f"{backbone}_weights"], out[f"{backbone}_items"] = weights
    return out


def read_training_provenance(conn: duckdb.DuckDBPyConnection, needs) -> TrainingProvenance:
    return TrainingProvenance(
        versions=data_versions(conn),
        features=feature_provenance(conn, needs),
        lineage=training_lineage(conn, needs),
    )
