"""The tables ``tuning_runs`` and ``tuning_trials`` (no dagster): every read and write of them.

DuckDB is the record of tuning (Optuna's study lives in memory for one run only). A run is
``(model, run_id)``; :func:`start_run` replaces whatever an earlier attempt of the same run id
wrote (a re-executed step), another run id appends. Each trial is written as soon as it ends, so a
killed run keeps the trials it finished (its run row then has no ``finished_at`` and is never read
as the model's tuned configuration). DDL and the best-trial query are in ``sql/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import duckdb
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.recsys.search_spaces import merge_overrides, nested_overrides


class NoTuningError(LookupError):
    """A model has no finished tuning run to take its configuration from."""


@dataclass(frozen=True)
class TrialRecord:
    model: str
    run_id: str
    trial: int
    seed: int
    params: dict  # dotted keys -> values
    value: float | None
    state: str  # COMPLETE or FAIL
    best_epoch: int | None
    epochs_run: int | None
    duration_s: float
    started_at: datetime
    error: str | None = None


@dataclass(frozen=True)
class TunedConfig:
    """The best trial of a model's latest finished tuning run."""

    model: str
    run_id: str
    trial: int
    params: dict  # dotted keys -> values
    fixed: dict  # nested overrides every trial of the run got
    value: float  # mean validation metric over the trial's seeds
    seeds: int
    best_epoch: int | None
    finished_at: datetime
    data_versions: dict

    @property
    def overrides(self) -> dict:
        """Model config overrides (nested) that reproduce the trial: ``fixed`` and the trial's params."""
        return merge_overrides(self.fixed, nested_overrides(self.params))


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def ensure_tables(conn: duckdb.DuckDBPyConnection) -> None:
    db.run_sql(conn, "tuning_tables")


def start_run(
    conn: duckdb.DuckDBPyConnection,
    model: str,
    run_id: str,
    *,
    metric: str,
    budget: dict,
    space: list[dict],
    fixed: dict,
    data_versions: dict,
) -> None:
    """Open run ``(model, run_id)``, dropping the rows an earlier attempt of it left."""
    ensure_tables(conn)
    with db.transaction(conn):
        conn.execute("DELETE FROM tuning_trials WHERE model = ? AND run_id = ?", [model, run_id])
        conn.execute("DELETE FROM tuning_runs WHERE model = ? AND run_id = ?", [model, run_id])
        conn.execute(
            "INSERT INTO tuning_runs (model, run_id, started_at, metric, budget, space, fixed, data_versions) "
            "VALUES (?, ?, now(), ?, ?, ?, ?, ?)",
            [model, run_id, metric, _json(budget), _json(space), _json(fixed), _json(data_versions)],
        )


def record_trial(conn: duckdb.DuckDBPyConnection, row: TrialRecord) -> None:
    with db.transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO tuning_trials (model, run_id, trial, seed, params, value, state, best_epoch, "
            "epochs_run, duration_s, started_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                row.model, row.run_id, row.trial, row.seed, _json(row.params), row.value, row.state,
                row.best_epoch, row.epochs_run, row.duration_s, row.started_at, row.error,
            ],
        )


def finish_run(
    conn: duckdb.DuckDBPyConnection, model: str, run_id: str, *, n_trials_run: int, stopped_by: str, wall_seconds: float
) -> None:
    with db.transaction(conn):
        conn.execute(
            "UPDATE tuning_runs SET finished_at = now(), n_trials_run = ?, stopped_by = ?, wall_seconds = ? "
            "WHERE model = ? AND run_id = ?",
            [n_trials_run, stopped_by, wall_seconds, model, run_id],
        )


def run_trials(conn: duckdb.DuckDBPyConnection, model: str, run_id: str) -> pd.DataFrame:
    """Every (trial, seed) row of one run, in trial and seed order."""
    return conn.execute(
        "SELECT trial, seed, params, value, state, best_epoch, epochs_run, duration_s, started_at, error "
        "FROM tuning_trials WHERE model = ? AND run_id = ? ORDER BY trial, seed",
        [model, run_id],
    ).df()


def best_tuned(conn: duckdb.DuckDBPyConnection, model: str) -> TunedConfig | None:
    """The best trial of ``model``'s latest finished tuning run; None without one (or without tables)."""
    if not db.table_exists(conn, "tuning_runs"):
        return None
    rows = db.run_sql(conn, "tuning_best", {"model": model}).fetchall()
    if not rows:
        return None
    run_id, trial, params, value, seeds, best_epoch, fixed, finished_at, versions = rows[0]
    return TunedConfig(
        model=model,
        run_id=run_id,
        trial=int(trial),
        params=json.loads(params),
        fixed=json.loads(fixed),
        value=float(value),
        seeds=int(seeds),
        best_epoch=None if best_epoch is None else int(best_epoch),
        finished_at=finished_at,
        data_versions=json.loads(versions),
    )


def require_tuned(conn: duckdb.DuckDBPyConnection, model: str, where: str) -> TunedConfig:
    """:func:`best_tuned`, or a :class:`NoTuningError` saying what to materialize first."""
    tuned = best_tuned(conn, model)
    if tuned is None:
        raise NoTuningError(
            f"use_tuned: model {model!r} has no finished tuning run with a completed trial in {where} "
            f"(table tuning_runs/tuning_trials); materialize tuning_{model} first"
        )
    return tuned
