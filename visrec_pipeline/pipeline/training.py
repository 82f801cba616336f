"""Train one registered model on the workspace's split and store its checkpoint (no dagster)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from visrec_pipeline import db
from visrec_pipeline.model_io import build_inputs, load_rec_data
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline.provenance import read_training_provenance
from visrec_pipeline.pipeline.trained import checkpoint_path
from visrec_pipeline.pipeline.tuning_store import require_tuned
from visrec_pipeline.recsys.base import FitInputs, Recommender, TrainHistory
from visrec_pipeline.recsys.checkpoint import recorded_sha256, save_checkpoint
from visrec_pipeline.recsys.cost import check_before_fit, estimate_cost
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.registry import build_model, get_spec
from visrec_pipeline.recsys.search_spaces import merge_overrides


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
    n_train_rows: int  # training rows the final weights were fit on (without the validation rows unless refit)
    n_validation_users: int
    refit: bool = False  # retrained on all training rows after the early-stopped fit
    tuned: dict | None = None  # the tuning trial the config came from (use_tuned), else None
    validation_fit: dict | None = None  # refit only: what the early-stopped fit on the validation split chose


def fit_here(model: Recommender, data: RecData, inputs: FitInputs) -> tuple[TrainHistory, dict[str, torch.Tensor]]:
    """``model.fit`` in this process: ``(history, the trained state to checkpoint)``. :data:`Fitter`'s
    local form (``visrec_pipeline.distributed.training`` fits on a Ray cluster)."""
    history = model.fit(data, inputs)
    return history, model.state_dict()


# fit_here's signature: where and how a model is fit (here, or on a cluster); a fitter may also have
# estimate_cost(model, data, inputs) (recsys.cost.estimate_cost's signature) to measure where it trains
Fitter = Callable[[Recommender, RecData, FitInputs], tuple[TrainHistory, dict[str, torch.Tensor]]]


def train_model(
    ws: Workspace,
    name: str,
    config: dict | None = None,
    *,
    use_tuned: bool = False,
    refit: bool = False,
    log: logging.Logger | None = None,
    path: Path | None = None,
    fitter: Fitter = fit_here,
) -> TrainedModel:
    """Fit model ``name`` (its default config updated by ``config``) and write ``models/<name>/<name>.pt``.

    It trains on the split's training rows minus each user's most recent row, the validation rows
    that early stopping (and EASE's lambda grid) watch. ``use_tuned``: the best trial of the model's
    latest finished tuning run (``tuning_trials``) overrides the keys it searched (a
    ``NoTuningError`` without one). ``refit``: then trains a fresh model on ALL the split's training
    rows, validation rows included, with what validation chose (``Recommender.refit_overrides``: the
    best epoch count, EASE's lambda) and no validation, and keeps that one. ``path``: where the
    checkpoint goes instead (another seed's file, see :mod:`visrec_pipeline.pipeline.seeds`).
    ``log`` (optional) receives the model's training log. ``fitter``: where the model is fit (default:
    here); the checkpoint is written here from the state it returns."""
    spec = get_spec(name)
    ws = ws.ensure()
    with db.connect(ws.db_path) as conn:
        data = load_rec_data(conn)
        provenance = read_training_provenance(conn, spec.needs)
        tuned = require_tuned(conn, name, str(ws.db_path)) if use_tuned else None
    fit_data, validation = data.validation_split()
    inputs = build_inputs(ws, spec.needs, fit_data)
    inputs.validation = validation
    model_config = dict(config or {})
    if tuned is not None:
        model_config = merge_overrides(model_config, tuned.overrides)
        same_split = _same_split(tuned.data_versions, provenance.versions)
        if log is not None:
            log.info("use_tuned: trial %d of tuning run %s (validation %.5f): %s", tuned.trial, tuned.run_id, tuned.value, tuned.params)
            if not same_split:
                log.warning("use_tuned: tuning run %s tuned on another split; re-materialize tuning_%s", tuned.run_id, name)
    model = build_model(name, model_config)
    if log is not None:
        model.log = log  # type: ignore[assignment]
    # an expensive model says its cost first, and stops here when it is past its limit
    estimate = check_before_fit(
        model, fit_data, inputs, log=log, estimator=getattr(fitter, "estimate_cost", estimate_cost)
    )
    started = time.perf_counter()
    history, state = fitter(model, fit_data, inputs)
    n_fit_rows = int(fit_data.train.nnz)
    validation_fit = None
    if refit:
        chosen = model.refit_overrides(history)
        validation_fit = {
            "n_train_rows": n_fit_rows,
            "best_epoch": history.best_epoch,
            "epochs_run": len(history.loss),
            "val_auc": list(history.val_auc),
            "chosen": chosen,
        }
        model_config = merge_overrides(model_config, chosen)
        model = build_model(name, model_config)
        if log is not None:
            model.log = log  # type: ignore[assignment]
            log.info("refit on all %d training rows with %s", data.train.nnz, chosen)
        all_inputs = build_inputs(ws, spec.needs, data)
        # triples_guided holds triples of the rows minus the validation rows: without them, guided
        # CuratorNet samples its guideline triples from all the rows it is given (its `guided` config)
        all_inputs.extra.pop("triples_guided", None)
        history, state = fitter(model, data, all_inputs)
        history.notes["validation_fit"] = validation_fit
        n_fit_rows = int(data.train.nnz)
    train_seconds = time.perf_counter() - started
    if estimate is not None:
        history.notes["cost_estimate"] = estimate.as_dict()
    path = checkpoint_path(ws, name) if path is None else Path(path)
    save_checkpoint(
        path,
        model_name=name,
        config=model_config,
        state=state,
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
        n_train_rows=n_fit_rows,
        n_validation_users=len(validation),
        refit=refit,
        tuned=None if tuned is None else {
            "run_id": tuned.run_id, "trial": tuned.trial, "validation_value": tuned.value, "params": tuned.params,
            "tuned_on_this_split": same_split,
        },
        validation_fit=validation_fit,
    )


def _same_split(tuned_versions: dict, versions: dict) -> bool:
    return all(tuned_versions.get(t) == versions.get(t) for t in ("split_train", "item_catalog"))
