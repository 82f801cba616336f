"""The run config `make demo` builds: epoch caps on the bundled demo, a training time budget on the user's data."""

from __future__ import annotations

import dagster as dg
import pytest

from visrec_pipeline.cli import (
    DEFAULT_TRAIN_MINUTES_CPU,
    all_assets_job,
    demo_run_config,
    train_minutes_from_env,
    user_data_run_config,
)


def test_user_data_budget_reaches_every_trained_model_and_is_valid_run_config():
    config = user_data_run_config(on_gpu=False, minutes=7.5)
    ops = config["ops"]
    # every model with a training loop, and only those (EASE, VisRank and the baselines have none)
    assert set(ops) == {f"model_{n}" for n in ("bpr_mf", "vbpr", "dvbpr", "curatornet", "curatornet_random", "acf")}
    assert all(cfg["config"]["train"]["max_minutes"] == 7.5 for cfg in ops.values())
    job = all_assets_job()
    assert dg.validate_run_config(job, config)["ops"]["model_acf"]["config"]["train"]["max_minutes"] == 7.5
    dg.validate_run_config(job, demo_run_config(on_gpu=False))


def test_no_budget_on_gpu_or_when_zero():
    assert user_data_run_config(on_gpu=True, minutes=8) == {}
    assert user_data_run_config(on_gpu=False, minutes=0) == {}


def test_budget_from_the_environment():
    assert train_minutes_from_env({}) == DEFAULT_TRAIN_MINUTES_CPU
    assert train_minutes_from_env({"VISREC_TRAIN_MINUTES": "0"}) == 0.0
    assert train_minutes_from_env({"VISREC_TRAIN_MINUTES": " 12.5 "}) == 12.5
    for bad in ("ten", "-1", "nan"):
        with pytest.raises(SystemExit, match="VISREC_TRAIN_MINUTES"):
            train_minutes_from_env({"VISREC_TRAIN_MINUTES": bad})
