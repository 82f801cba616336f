"""Train one registered model on the workspace's split and store its checkpoint (no dagster)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from visrec_pipeline import db
from visrec_pipeline.model_io import build_inputs, load_rec_data
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline.provenance import read_training_provenance
from visrec_pipeline.pipeline.trained import checkpoint_path
from visrec_pipeline.recsys.base import TrainHistory
from visrec_pipeline.recsys.checkpoint import recorded_sha256, save_checkpoint
from visrec_pipeline.recsys.registry import build_model, get_spec


@dataclass(frozen=True)
class TrainedModel:
    """What one training produced and what it was trained on."""

    name: str
    checkpoint: Path
    checkpoint_sha256: str  # of the checkpoint file, as recorded next to it
    config: dict  # the config overrides the model was built with (as stored in the checkpoint)
    history: TrainHistory
    train_seconds: float  # model.fit only
    versions: dict[str, str]  # fingerprints of the tables read (model_io.data_versions)
    features: dict  # feature weights tag and item count per backbone used (provenance.feature_provenance)
    lineage: dict  # batches, embeddings and triples (lineage.training_lineage)
    n_users: int
    n_items: int
    n_train_rows: int  # training rows after the validation rows were taken out
    n_validation_users: int


def train_model(
    ws: Workspace,
    name: str,
    config: dict | None = None,
    *,
    log: logging.Logger | None = None,
    path: Path | None = None,
) -> TrainedModel:
    """Fit model ``name`` (its default config updated by ``config``) on the split's training rows
    minus a validation row per user, and write ``models/<name>/<name>.pt`` (or ``path``: another
    seed's file, see :mod:`visrec_pipeline.pipeline.seeds`); ``log`` (optional) receives the model's
    training log."""
    spec = get_spec(name)
    ws = ws.ensure()
    with db.connect(ws.db_path) as conn:
        data = load_rec_data(conn)
        provenance = read_training_provenance(conn, spec.needs)
    fit_data, validation = data.validation_split()
    inputs = build_inputs(ws, spec.needs, fit_data)
    inputs.validation = validation
    model_config = dict(config or {})
    model = build_model(name, model_config)
    if log is not None:
        model.log = log  # type: ignore[assignment]
    started = time.perf_counter()
    history = model.fit(fit_data, inputs)
    train_seconds = time.perf_counter() - started
    path = checkpoint_path(ws, name) if path is None else Path(path)
    save_checkpoint(
        path,
        model_name=name,
        config=model_config,
        state=model.state_dict(),
        data_versions={**provenance.versions, **{k: str(v) for k, v in provenance.features.items()}},
        history=dataclasses.asdict(history),
        extra={"train_seconds": train_seconds, "lineage": provenance.lineage},
    )
    return TrainedModel(
        name=name,
        checkpoint=path,
        checkpoint_sha256=recorded_sha256(path) or "",
        config=model_config,
        history=history,
        train_seconds=train_seconds,
        versions=provenance.versions,
        features=provenance.features,
        lineage=provenance.lineage,
        n_users=len(data.users),
        n_items=len(data.items),
        n_train_rows=int(fit_data.train.nnz),
        n_validation_users=len(validation),
    )
