"""Tuning as an asset: every trial in DuckDB, re-runs, the tuned config and the refit option of the model
path, and the Dagster assets, on a small real workspace (EASE: closed form; BPR-MF: a few tiny epochs)."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import torch

from conftest import split_workspace
from visrec_pipeline import db
from visrec_pipeline.pipeline import train_model
from visrec_pipeline.pipeline.tuning import TuningBudget, trial_config, tune_model
from visrec_pipeline.pipeline.tuning_store import NoTuningError, best_tuned
from visrec_pipeline.recsys.checkpoint import load_checkpoint
from visrec_pipeline.recsys.registry import MODEL_SPECS, make_config
from visrec_pipeline.recsys.search_spaces import SEARCH_SPACES, default_point

N_USERS = 12
# every user: 6 distinct items (1 test holdout, 1 validation, 4 to fit), with a shared structure
ROWS = [
    {"user_id": 100 + u, "item_id": 10 + (u % 4) + 4 * k, "timestamp": 1000 + 10 * k + u}
    for u in range(N_USERS)
    for k in range(6)
]
BPR = {"factors": 8, "train": {"epochs": 4, "batch_size": 16, "device": "cpu", "patience": 10}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tuning")
    ws = split_workspace(root, ROWS, image_items=[], sync_images=False)
    yield ws
    torch.set_num_threads(before)


def _count(ws, sql: str, params=()) -> int:
    with db.connect(ws.db_path, read_only=True) as conn:
        return int(conn.execute(sql, list(params)).fetchone()[0])


def _trials(ws, model: str, run_id: str) -> list[tuple]:
    with db.connect(ws.db_path, read_only=True) as conn:
        return conn.execute(
            "SELECT trial, seed, params, value, state, duration_s, started_at FROM tuning_trials "
            "WHERE model = ? AND run_id = ? ORDER BY trial, seed",
            [model, run_id],
        ).fetchall()


def test_every_space_holds_its_models_defaults_and_every_point_builds_a_config():
    assert set(SEARCH_SPACES) == set(MODEL_SPECS) - {"random", "most_popular"}
    for name, space in SEARCH_SPACES.items():
        default = default_point(space)  # raises when a default lies outside the space
        assert set(default) == set(space.keys())
        for pick in (0, -1):  # the ends of every range, the first and last choices
            point = {
                p.key: (p.choices[pick] if p.kind == "categorical" else (p.low, p.high)[pick])
                for p in space.params
            }
            point = {k: int(v) if p.kind == "int" else v for (k, v), p in zip(point.items(), space.params)}
            config = make_config(name, trial_config(name, space, point, TuningBudget(max_epochs=2), seed=7))
            if hasattr(config, "train"):
                assert config.train.seed == 7 and config.train.epochs <= 2
            else:
                assert config.seed == 7


def test_tuning_stores_every_trial_and_seed_in_duckdb(ws):
    result = tune_model(ws, "ease", TuningBudget(n_trials=4, seeds_per_trial=2, device="cpu"), run_id="run-a")
    rows = _trials(ws, "ease", "run-a")
    assert [(t, s) for t, s, *_ in rows] == [(t, s) for t in range(4) for s in (0, 1)]
    assert all(state == "COMPLETE" and 0.0 <= value <= 1.0 and seconds > 0 for _t, _s, _p, value, state, seconds, _a in rows)
    assert json.loads(rows[0][2]) == {"l2": 500.0}  # trial 0 is the default config
    assert len({json.loads(p)["l2"] for _t, _s, p, *_ in rows}) == 4
    # the best trial is the highest mean over seeds, read back from DuckDB
    means = {}
    for trial, _seed, _p, value, *_ in rows:
        means.setdefault(trial, []).append(value)
    best_trial = max(sorted(means), key=lambda t: sum(means[t]) / 2)
    assert result.best.trial == best_trial and result.best.run_id == "run-a"
    assert result.best.value == pytest.approx(sum(means[best_trial]) / 2)
    assert result.default_value == pytest.approx(sum(means[0]) / 2)
    assert result.n_trials_run == 4 and result.stopped_by == "n_trials"
    with db.connect(ws.db_path, read_only=True) as conn:
        finished, n_run = conn.execute(
            "SELECT finished_at, n_trials_run FROM tuning_runs WHERE model = 'ease' AND run_id = 'run-a'"
        ).fetchone()
    assert finished is not None and n_run == 4


def test_rerunning_a_run_replaces_its_trials_and_a_new_run_appends_and_becomes_the_tuned_one(ws):
    tune_model(ws, "ease", TuningBudget(n_trials=3, device="cpu", sampler_seed=1), run_id="run-b")
    tune_model(ws, "ease", TuningBudget(n_trials=2, device="cpu", sampler_seed=2), run_id="run-b")
    assert [(t, s) for t, s, *_ in _trials(ws, "ease", "run-b")] == [(0, 0), (1, 0)]
    assert _count(ws, "SELECT count(*) FROM tuning_runs WHERE model = 'ease' AND run_id = 'run-b'") == 1
    tune_model(ws, "ease", TuningBudget(n_trials=2, device="cpu", sampler_seed=3), run_id="run-c")
    assert len(_trials(ws, "ease", "run-b")) == 2  # kept
    with db.connect(ws.db_path, read_only=True) as conn:
        assert best_tuned(conn, "ease").run_id == "run-c"  # the latest finished run


def test_use_tuned_trains_with_the_best_trial_and_fails_clearly_without_tuning(ws):
    tuned = tune_model(ws, "ease", TuningBudget(n_trials=3, device="cpu"), run_id="run-d").best
    trained = train_model(ws, "ease", {"device": "cpu"}, use_tuned=True)
    config = make_config("ease", load_checkpoint(trained.checkpoint)["config"])
    assert config.l2 == tuned.params["l2"] and config.l2_grid == ()
    assert trained.history.notes["lambda"] == tuned.params["l2"]
    assert trained.tuned["run_id"] == "run-d" and trained.tuned["trial"] == tuned.trial
    assert trained.tuned["tuned_on_this_split"] is True
    with pytest.raises(NoTuningError, match="materialize tuning_visrank first"):
        train_model(ws, "visrank", use_tuned=True)


def test_refit_trains_on_every_training_row_for_the_epochs_validation_chose(ws):
    n_rows = _count(ws, "SELECT count(*) FROM split_train")
    plain = train_model(ws, "bpr_mf", BPR)
    assert plain.n_train_rows == n_rows - plain.n_validation_users == n_rows - N_USERS
    refit = train_model(ws, "bpr_mf", BPR, refit=True)
    assert refit.refit and refit.n_train_rows == n_rows
    first = refit.validation_fit
    assert first["n_train_rows"] == n_rows - N_USERS
    assert first["chosen"] == {"train": {"epochs": first["best_epoch"]}}
    assert len(refit.history.loss) == first["best_epoch"]  # the refit runs exactly those epochs
    assert not refit.history.val_auc  # and validates on nothing: the validation rows are training rows now
    assert load_checkpoint(refit.checkpoint)["config"]["train"]["epochs"] == first["best_epoch"]
    ease = train_model(ws, "ease", {"device": "cpu"}, refit=True)
    assert ease.n_train_rows == n_rows
    assert ease.validation_fit["chosen"]["l2"] in make_config("ease").l2_grid
    assert ease.history.notes["lambda"] == ease.validation_fit["chosen"]["l2"]


def test_tuning_asset_materializes_and_the_model_asset_uses_it(ws):
    from visrec_pipeline.defs.models import build_model_assets
    from visrec_pipeline.defs.resources import ComputeResource, VisrecSettings
    from visrec_pipeline.defs.tuning import build_tuning_asset

    spec = MODEL_SPECS["ease"]
    tuning_asset = build_tuning_asset(spec)
    model_asset, _evaluation = build_model_assets(spec=spec)
    resources = {"settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset), "compute": ComputeResource()}
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [tuning_asset],
            resources=resources,
            instance=instance,
            run_config={"ops": {"tuning_ease": {"config": {"n_trials": 2, "device": "cpu"}}}},
        )
        assert result.success
        (tuned,) = result.asset_materializations_for_node("tuning_ease")
        trained = dg.materialize(
            [model_asset],
            resources=resources,
            instance=instance,
            run_config={"ops": {"model_ease": {"config": {"use_tuned": True, "refit": True, "device": "cpu"}}}},
        )
    meta = tuned.metadata
    assert meta["n_trials"].value == 2 and meta["n_complete"].value == 2
    assert meta["budget"].value["n_trials"] == 2 and meta["budget"].value["seeds_per_trial"] == 1
    assert meta["best_value"].value >= meta["default_value"].value
    assert meta["trials"].value.splitlines()[0].split("|")[1].strip() == "trial" and meta["run_id"].value == result.run_id
    assert len(_trials(ws, "ease", result.run_id)) == 2
    (model,) = trained.asset_materializations_for_node("model_ease")
    assert model.metadata["tuned_from"].value["run_id"] == result.run_id
    assert model.metadata["tuned_from"].value["params"] == meta["best_params"].value
    assert model.metadata["refit"].value is True
    assert model.metadata["n_train_rows"].value == _count(ws, "SELECT count(*) FROM split_train")
