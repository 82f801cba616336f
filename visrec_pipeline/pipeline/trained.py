"""Where a trained model's checkpoint lives and how it comes back ready to score (no dagster)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from visrec_pipeline import db
from visrec_pipeline.model_io import build_inputs, load_rec_data
from visrec_pipeline.paths import Workspace
from visrec_pipeline.recsys.base import FitInputs, Recommender
from visrec_pipeline.recsys.checkpoint import load_checkpoint
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
    ``log`` (optional) receives the model's log messages."""
    ckpt = load_checkpoint(checkpoint_path(ws, name))
    spec = get_spec(name)
    with db.connect(ws.db_path) as conn:
        data = load_rec_data(conn)
    inputs = build_inputs(ws, spec.needs, data)
    model = build_model(name, ckpt["config"])
    if log is not None:
        model.log = log  # type: ignore[assignment]
    if hasattr(model, "attach_inputs"):
        model.attach_inputs(data, inputs)
    model.load_state_dict(ckpt["state"])
    return LoadedModel(model, data, inputs, ckpt)
