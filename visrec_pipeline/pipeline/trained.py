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


# inputs only training reads: triples are sampled during fit and never scored
_TRAINING_ONLY = ("triples_random", "triples_guided")


def scoring_needs(name: str) -> frozenset[str]:
    """The side inputs model ``name`` reads to score once restored: none for a model whose checkpoint
    holds what scoring uses; its non-triple ``needs`` for one that re-attaches inputs (``attach_inputs``,
    e.g. VisRank's features)."""
    spec = get_spec(name)
    if not hasattr(spec.cls, "attach_inputs"):
        return frozenset()
    return frozenset(n for n in spec.needs if n.partition(":")[0] not in _TRAINING_ONLY)


def load_scoring_data(ws: Workspace) -> RecData:
    """The current split and catalogue (training rows, holdout CSR), to share between the models
    restored by :func:`load_trained` in one process."""
    with db.connect(ws.db_path) as conn:
        return load_rec_data(conn)


def load_trained(
    ws: Workspace,
    name: str,
    *,
    log: logging.Logger | None = None,
    data: RecData | None = None,
    path: Path | None = None,
) -> LoadedModel:
    """Model ``name`` restored from its checkpoint (``path``, default :func:`checkpoint_path`), attached
    to the workspace's current data (``data`` when the caller loaded it already, see
    :func:`load_scoring_data`) and to the inputs it scores with (:func:`scoring_needs`; training-only
    inputs such as triples are not read); ``log`` (optional) receives the model's log messages. A
    damaged checkpoint is a :class:`CheckpointError`, one trained on other data a :class:`StaleCheckpointError`."""
    path = checkpoint_path(ws, name) if path is None else Path(path)
    ckpt = read_checkpoint(name, path)
    with db.connect(ws.db_path) as conn:
        if data is None:
            data = load_rec_data(conn)
        require_fresh(conn, name, path, ckpt)
    needs = scoring_needs(name)
    inputs = build_inputs(ws, needs, data) if needs else FitInputs()
    return LoadedModel(restore_model(name, ckpt, data, inputs, log=log), data, inputs, ckpt)


def read_checkpoint(name: str, path: Path) -> dict[str, Any]:
    """The checkpoint of model ``name`` at ``path``; a :class:`CheckpointError` naming the asset to
    re-materialize when it is damaged."""
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (re-materialize model_{name})") from exc


def require_fresh(conn, name: str, path: Path, ckpt: dict[str, Any]) -> None:
    """A :class:`StaleCheckpointError` when checkpoint ``ckpt`` (at ``path``) of model ``name`` was trained
    on other data than the database of ``conn`` holds now."""
    spec = get_spec(name)
    changes = changed_versions(ckpt["data_versions"], current_versions(conn, spec.needs), spec.needs)
    if changes:
        raise StaleCheckpointError(name, path, changes)


def restore_model(
    name: str, ckpt: dict[str, Any], data: RecData, inputs: FitInputs, *, log: logging.Logger | None = None
) -> Recommender:
    """Model ``name`` built from the checkpoint's config and state, attached to ``data`` and its scoring
    ``inputs`` (:func:`scoring_needs`); no database access (a Ray task restores models with it)."""
    model = build_model(name, ckpt["config"])
    if log is not None:
        model.log = log  # type: ignore[assignment]
    if hasattr(model, "attach_inputs"):
        model.attach_inputs(data, inputs)
    model.load_state_dict(ckpt["state"])
    return model
