"""DVBPR says what an epoch will cost before training, and stops at once when that is past its limit."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conftest import split_workspace
from visrec_pipeline.pipeline import checkpoint_path, train_model
from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.cost import CostTooHighError, check_before_fit
from visrec_pipeline.recsys.data import CSR, IndexMap, RecData
from visrec_pipeline.recsys.models.dvbpr import CPU_PRESET, DVBPR, DVBPRConfig
from visrec_pipeline.recsys.synthetic import planted_dataset


def grey_images(item_idx: torch.Tensor) -> torch.Tensor:
    return torch.full((len(item_idx), 3, 256, 256), 127, dtype=torch.uint8)


def large_catalogue(n_users=20_000, n_items=100_000, nnz=1_000_000) -> RecData:
    rng = np.random.default_rng(0)
    train = CSR.from_pairs(rng.integers(0, n_users, nnz), rng.integers(0, n_items, nnz), n_users, n_items)
    return RecData(IndexMap(np.arange(n_users)), IndexMap(np.arange(n_items)), train, np.zeros(train.nnz, np.int64))


def test_paper_scale_dvbpr_on_cpu_stops_at_once_with_the_estimate_and_the_ways_on(one_torch_thread):
    data = large_catalogue()
    model = DVBPR(DVBPRConfig(train={"device": "cpu"}))  # the paper's CNN-F at 224 px, batch 128
    started = time.perf_counter()
    with pytest.raises(CostTooHighError) as caught:
        check_before_fit(model, data, FitInputs(images=grey_images))
    assert time.perf_counter() - started < 60  # seconds, not the hours of an epoch
    message = str(caught.value)
    assert caught.value.estimate.epoch_minutes > 60  # past the default max_estimated_epoch_minutes
    assert "one epoch estimated at" in message and " h on cpu" in message
    for way in ("train.device", "preset: cpu", "model_dvbpr", "max_estimated_epoch_minutes"):
        assert way in message
    assert model.module is None  # nothing was built or trained


def test_the_cpu_preset_replaces_the_paper_defaults_but_keeps_the_keys_given():
    cfg = DVBPRConfig(preset="cpu", k=16, train={"epochs": 2})
    assert (cfg.input_size, cfg.width_mult, cfg.fc_dim, cfg.lrn) == (64, 0.25, 256, False)
    assert cfg.k == 16 and cfg.train.epochs == 2
    assert cfg.train.batch_size == CPU_PRESET["train"]["batch_size"]
    assert cfg.train.max_batches_per_epoch == CPU_PRESET["train"]["max_batches_per_epoch"]
    assert DVBPRConfig(preset="cpu", input_size=96).input_size == 96
    assert DVBPRConfig().input_size == 224 and DVBPRConfig().train.max_batches_per_epoch is None
    with pytest.raises(ValueError, match="preset"):
        DVBPRConfig(preset="fast")


def test_the_cpu_preset_passes_the_check_and_trains(one_torch_thread):
    syn = planted_dataset(n_users=60, n_items=80, seed=2)
    model = DVBPR(DVBPRConfig(preset="cpu", train={"epochs": 1, "device": "cpu"}))
    estimate = check_before_fit(model, syn.data, FitInputs(images=grey_images))
    assert estimate is not None and 0 < estimate.epoch_seconds < 600
    history = model.fit(syn.data, FitInputs(images=grey_images))
    assert len(history.loss) == 1 and np.isfinite(history.loss[0])


def test_train_model_checks_the_cost_before_training(tmp_path, one_torch_thread):
    rows = [{"user_id": 100 + u, "item_id": 10 + (u + k) % 9, "timestamp": 1000 + 10 * k + u}
            for u in range(8) for k in range(4)]
    ws = split_workspace(tmp_path, rows)
    tight = {"preset": "cpu", "max_estimated_epoch_minutes": 1e-9, "train": {"epochs": 1, "device": "cpu"}}
    with pytest.raises(CostTooHighError, match="training was not started"):
        train_model(ws, "dvbpr", tight)
    assert not checkpoint_path(ws, "dvbpr").exists()
    trained = train_model(ws, "dvbpr", {**tight, "max_estimated_epoch_minutes": 0})
    assert trained.history.notes["cost_estimate"]["epoch_seconds"] >= 0
