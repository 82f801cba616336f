"""Checkpoints: exact round trips for every model, no pickle of arbitrary objects, atomic writes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.base import ScoreBatch, TrainHistory
from visrec_pipeline.recsys.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visrec_pipeline.recsys.registry import build_model
from visrec_pipeline.recsys.synthetic import planted_dataset

FAST = {
    "random": {"device": "cpu"},
    "most_popular": {"device": "cpu"},
    "ease": {"l2_grid": [5.0, 50.0], "device": "cpu"},
    "visrank": {"agg": "topk_mean", "top_t": 2, "device": "cpu"},
    "bpr_mf": {"factors": 8, "train": {"epochs": 2, "batch_size": 256, "device": "cpu"}},
    "vbpr": {"dim_gamma": 8, "dim_theta": 4, "train": {"epochs": 2, "batch_size": 256, "device": "cpu"}},
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class NotPlain:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("name", sorted(FAST))
def test_round_trip_reproduces_scores_exactly(tmp_path, name):
    syn = planted_dataset(60, 80, seed=1, dim=16)
    fit, validation = syn.data.validation_split()
    inputs = syn.inputs()
    inputs.validation = validation
    config = FAST[name]
    model = build_model(name, config)
    history = model.fit(fit, inputs)
    path = tmp_path / name / f"{name}.pt"
    save_checkpoint(
        path, model_name=name, config=config, state=model.state_dict(),
        data_versions={"split_train": "abc123"}, history=history, extra={"train_seconds": 1.5},
    )
    ckpt = load_checkpoint(path)
    assert ckpt["model_name"] == name and ckpt["data_versions"] == {"split_train": "abc123"}
    assert ckpt["config"] == config and ckpt["extra"] == {"train_seconds": 1.5}
    assert ckpt["history"]["loss"] == history.loss
    # what the pipeline does: a fresh model from the stored config, inputs attached, then the state
    again = build_model(name, ckpt["config"])
    if hasattr(again, "attach_inputs"):
        again.attach_inputs(syn.data, syn.inputs())
    again.load_state_dict(ckpt["state"])
    items, mask = syn.data.holdout.profile.padded()
    batch = ScoreBatch(torch.as_tensor(syn.data.holdout.user_idx), items, mask)
    assert torch.equal(model.score(batch), again.score(batch))
    assert not list(path.parent.glob(".*tmp*")), "no temp files left behind"


def test_arbitrary_objects_are_refused_on_load(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "visrec-checkpoint", "state": {"w": torch.zeros(2)}, "payload": NotPlain()}, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil)
    plain_but_foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(2)}, plain_but_foreign)
    with pytest.raises(CheckpointError, match="not a visrec checkpoint"):
        load_checkpoint(plain_but_foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_save_refuses_non_plain_values_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.pt"
    common = dict(model_name="m", config={"a": 1}, data_versions={}, history=TrainHistory())
    save_checkpoint(path, state={"w": torch.ones(3)}, **common)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="extra.obj"):
        save_checkpoint(path, state={"w": torch.zeros(3)}, extra={"obj": NotPlain()}, **common)
    with pytest.raises(CheckpointError, match="tensors only"):
        save_checkpoint(path, state={"w": np.zeros(3)}, **common)
    with pytest.raises(CheckpointError, match="str keys"):
        save_checkpoint(path, state={"w": torch.zeros(3)}, extra={1: 2}, **common)
    assert path.read_bytes() == before, "a failed save leaves the previous checkpoint intact"
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.pt.sha256"]  # the checkpoint and its hash, no temp file


def test_plain_conversion_views_tuples_and_dataclasses(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        ks: tuple = (1, 2)
        lr: float = 0.1

    big = torch.arange(1_000_000, dtype=torch.float32)
    path = save_checkpoint(
        tmp_path / "v.pt", model_name="v", config=Cfg(), state={"view": big[:10]},
        data_versions={"t": "1"}, history={"loss": [np.float64(0.5)], "notes": {"n": np.int64(3)}},
    )
    assert path.stat().st_size < 100_000, "a view is saved without its whole storage"
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"ks": [1, 2], "lr": 0.1}
    assert ckpt["history"] == {"loss": [0.5], "notes": {"n": 3}}
    assert torch.equal(ckpt["state"]["view"], torch.arange(10, dtype=torch.float32))
