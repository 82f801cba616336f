"""Where a trained model's checkpoint lives and how it comes back ready to score (no dagster).

A checkpoint comes back only when its bytes match the hash recorded when it was written
(:mod:`visrec_pipeline.recsys.checkpoint`) and it was trained on the data the workspace holds now
(:mod:`visrec_pipeline.pipeline.staleness`); evaluation, recommendations and the report's ACF panel
all load models here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from visrec_pipeline import db
from visrec_pipeline.model_io import build_inputs, load_rec_data
from visrec_pipeline.paths import Workspace
from visrec_pipeline.recsys.base import FitInputs, Recommender
from visrec_pipeline.pipeline.staleness import StaleCheckpointError, changed_versions, current_versions
from visrec_pipeline.recsys.checkpoint import CheckpointError, load_checkpoint
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.registry import build_model, get_spec


class LoadedModel(NamedTuple):
    """A trained model with the data and inputs it scores against (unpacks as the 4-tuple)."""

    model: Recommender
    data: RecData  # the current split and catalogue
    inputs: FitInputs
    checkpoint: dict[str, Any]  # the stored checkpoint: config, data_versions, history, extra


def checkpoint_path(ws: Workspace, name: str) -> Path:
    return ws.models_dir / name / f"{name}.pt"


def load_trained(ws: Workspace, name: str, *, log: logging.Logger | None = None) -> LoadedModel:
    """Model ``name`` restored from its checkpoint, attached to the workspace's current data;
    ``log`` (optional) receives the model's log messages. A damaged checkpoint is a
    :class:`CheckpointError`, one trained on other data a :class:`StaleCheckpointError`."""
    path = checkpoint_path(ws, name)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (re-materialize model_{name})") from exc
    spec = get_spec(name)
    with db.connect(ws.db_path) as conn:
        data = load_rec_data(conn)
        changes = changed_versions(ckpt["data_versions"], current_versions(conn, spec.needs), spec.needs)
    if changes:
        raise StaleCheckpointError(name, path, changes)
    inputs = build_inputs(ws, spec.needs, data)
    model = build_model(name, ckpt["config"])
    if log is not None:
        model.log = log  # type: ignore[assignment]
    if hasattr(model, "attach_inputs"):
        model.attach_inputs(data, inputs)
    model.load_state_dict(ckpt["state"])
    return LoadedModel(model, data, inputs, ckpt)
