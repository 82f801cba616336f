"""Tune one model's hyper-parameters on the validation split (no dagster): ``tune_model``.

Every trial trains the model on the split's training rows minus each user's most recent row and
scores it on those validation rows (mean AUC over every validation user, standard protocol; the
same rows early stopping watches). The test holdout is never read. Trial 0 is the model's default
config (:func:`~visrec_pipeline.recsys.search_spaces.default_point`), the next ones come from
Optuna's TPE sampler (its first half of the budget drawn at random, then model-based), seeded by
``sampler_seed``. A trial trains ``seeds_per_trial`` times (seeds ``seed``, ``seed + 1``, ...; the
same seeds in every trial) and its value is the mean. Every (trial, seed) goes to DuckDB as it
ends (``tuning_store``); the budget (trials, seeds, timeout, epoch cap) is the same for every
model, so models are tuned equally.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.devices import resolve_device
from visrec_pipeline.model_io import build_inputs, data_versions, load_rec_data
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import tuning_store
from visrec_pipeline.recsys.base import FitInputs, Recommender
from visrec_pipeline.recsys.data import Holdout, RecData
from visrec_pipeline.recsys.registry import build_model, get_spec, make_config
from visrec_pipeline.recsys.search_spaces import (
    Param,
    SearchSpace,
    config_has_train,
    default_point,
    get_search_space,
    merge_overrides,
    nested_overrides,
)

METRIC = "validation AUC (mean over every validation user, standard protocol)"
_LOG = logging.getLogger("visrec.tuning")


@dataclass(frozen=True)
class TuningBudget:
    """What every model's search gets; the same for all models when left at the defaults."""

    n_trials: int = 8  # trial 0 is the default config
    seeds_per_trial: int = 1
    # no new trial starts after this (the running one finishes): 7 models two at a time stay within about
    # 15 minutes on a 2-core CPU whatever the load, at the cost of fewer trials for the slowest models
    timeout_s: float = 240.0
    max_epochs: int = 0  # cap on train.epochs of every trial (0: the model's own epochs)
    sampler_seed: int = 0
    seed: int = 0  # first training seed of every trial
    device: str = "auto"

    def __post_init__(self):
        if self.n_trials < 1 or self.seeds_per_trial < 1:
            raise ValueError(f"tuning budget: n_trials and seeds_per_trial must be >= 1, got {self}")
        if self.timeout_s <= 0 or self.max_epochs < 0:
            raise ValueError(f"tuning budget: timeout_s must be > 0 and max_epochs >= 0, got {self}")


@dataclass(frozen=True)
class TuningResult:
    model: str
    run_id: str
    budget: TuningBudget
    trials: pd.DataFrame  # one row per (trial, seed), as stored in tuning_trials
    best: tuning_store.TunedConfig
    default_value: float | None  # trial 0 (the default config); None if it failed
    n_trials_run: int
    stopped_by: str  # "n_trials" or "timeout"
    wall_seconds: float
    space: SearchSpace


def trial_config(name: str, space: SearchSpace, params: dict, budget: TuningBudget, seed: int) -> dict:
    """The model config overrides of one training of a trial: fixed, params, seed, device, epoch cap."""
    overrides = merge_overrides(space.fixed, nested_overrides(params))
    if config_has_train(name):
        train = {"seed": seed, "device": budget.device}
        if budget.max_epochs:
            default_epochs = make_config(name, overrides).train.epochs
            train["epochs"] = min(default_epochs, budget.max_epochs)
        return merge_overrides(overrides, {"train": train})
    return merge_overrides(overrides, {"seed": seed, "device": budget.device})


def validation_auc(model: Recommender, validation: Holdout, n_items: int, device: str) -> float:
    from visrec_pipeline.recsys.evaluate import evaluate

    result = evaluate(model.score, validation, n_items, ks=(), protocol="standard", device=resolve_device(device))
    return float(result.means["auc"])


def _suggest(trial, param: Param):
    if param.kind == "categorical":
        return trial.suggest_categorical(param.key, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(param.key, float(param.low), float(param.high), log=param.log)


def _space_json(space: SearchSpace) -> list[dict]:
    return [{**asdict(p), "choices": list(p.choices)} for p in space.params]


def _train_once(
    name: str, config: dict, fit_data: RecData, inputs: FitInputs, validation: Holdout, device: str, log
) -> tuple[float, int | None, int | None]:
    model = build_model(name, config)
    model.log = log  # type: ignore[assignment]
    # each trial gets its own FitInputs: a model may keep or change what it is given
    history = model.fit(fit_data, copy.copy(inputs))
    value = validation_auc(model, validation, fit_data.n_items, device)
    epochs = len(history.loss) or None
    return value, (history.best_epoch if epochs else None), epochs


def tune_model(
    ws: Workspace,
    name: str,
    budget: TuningBudget | None = None,
    *,
    run_id: str | None = None,
    log: logging.Logger | None = None,
) -> TuningResult:
    """Search ``name``'s space (``recsys.search_spaces``) within ``budget``, storing every trial in
    ``tuning_trials`` under ``run_id`` (a new one when None; an existing one is replaced)."""
    import optuna

    budget = budget or TuningBudget()
    space = get_search_space(name)
    spec = get_spec(name)
    log = log or _LOG
    run_id = run_id or uuid.uuid4().hex
    ws = ws.ensure()
    default = default_point(space)
    with db.connect(ws.db_path) as conn:
        data = load_rec_data(conn)
        versions = data_versions(conn)
    fit_data, validation = data.validation_split()
    if len(validation) == 0:
        raise ValueError(f"tuning {name}: no user has more than one training row, so there is no validation row")
    inputs = build_inputs(ws, spec.needs, fit_data)
    inputs.validation = validation
    with db.connect(ws.db_path) as conn:
        tuning_store.start_run(
            conn, name, run_id, metric=METRIC, budget=asdict(budget), space=_space_json(space),
            fixed=space.fixed, data_versions=versions,
        )

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are logged here, one line each
    sampler = optuna.samplers.TPESampler(seed=budget.sampler_seed, n_startup_trials=max(1, budget.n_trials // 2))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(default)
    started = time.perf_counter()
    stopped_by, n_run = "n_trials", 0
    for number in range(budget.n_trials):
        if number and time.perf_counter() - started >= budget.timeout_s:
            stopped_by = "timeout"
            break
        trial = study.ask()
        params = {p.key: _suggest(trial, p) for p in space.params}
        values: list[float] = []
        for k in range(budget.seeds_per_trial):
            seed = budget.seed + k
            config = trial_config(name, space, params, budget, seed)
            at, t0 = datetime.now(timezone.utc).replace(tzinfo=None), time.perf_counter()
            value = best_epoch = epochs = error = None
            try:
                value, best_epoch, epochs = _train_once(name, config, fit_data, inputs, validation, budget.device, log)
                state = "COMPLETE" if math.isfinite(value) else "FAIL"
            except (ValueError, RuntimeError, FloatingPointError, MemoryError) as exc:
                # a point of the space the model cannot train with (e.g. a diverging learning rate) is a
                # failed trial, not a failed tuning
                state, error = "FAIL", f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - t0
            row = tuning_store.TrialRecord(
                name, run_id, number, seed, params, value if state == "COMPLETE" else None, state,
                best_epoch, epochs, seconds, at, error,
            )
            with db.connect(ws.db_path) as conn:
                tuning_store.record_trial(conn, row)
            log.info(
                "tuning %s trial %d seed %d: %s %s (%.1fs) %s",
                name, number, seed, state, f"{value:.5f}" if row.value is not None else error, seconds, params,
            )
            if state != "COMPLETE":
                break
            values.append(value)
        n_run += 1
        if len(values) == budget.seeds_per_trial:
            study.tell(trial, sum(values) / len(values))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    wall = time.perf_counter() - started
    with db.connect(ws.db_path) as conn:
        tuning_store.finish_run(conn, name, run_id, n_trials_run=n_run, stopped_by=stopped_by, wall_seconds=wall)
        trials = tuning_store.run_trials(conn, name, run_id)
        best = tuning_store.best_tuned(conn, name)
    if best is None or best.run_id != run_id:
        raise RuntimeError(f"tuning {name}: every trial failed; see the errors in tuning_trials (run {run_id})")
    first = trials[trials["trial"] == 0]
    default_value = float(first["value"].mean()) if len(first) and (first["state"] == "COMPLETE").all() else None
    return TuningResult(name, run_id, budget, trials, best, default_value, n_run, stopped_by, wall, space)
