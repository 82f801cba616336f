"""Training on the private Ray cluster (visrec_pipeline.distributed.training): DDP of DVBPR over two CPU
workers on real images, a model trained as one Ray task, and how batches are shared between workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import split_workspace
from visrec_pipeline.distributed.cluster import ComputeSettings
from visrec_pipeline.distributed.training import RayFitter, batch_share, wants_data_parallel
from visrec_pipeline.pipeline import load_trained, train_model
from visrec_pipeline.recsys.checkpoint import load_checkpoint
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.registry import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = ComputeSettings(engine="ray", address="local:2", workers=2)
# 40 users x 8 distinct items of 30 (each user's items a run of the catalogue, so there is structure to learn)
ROWS = [
    {"user_id": 100 + u, "item_id": 10 + (3 * (u % 10) + k) % 30, "timestamp": 1000 + 10 * k + u}
    for u in range(40)
    for k in range(8)
]
# DVBPR's CPU preset (CNN-F layout at 64 px, 1/4 width), smaller batches: several steps per epoch here
DVBPR_CONFIG = {"preset": "cpu", "train": {"epochs": 4, "batch_size": 64, "device": "cpu"}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return split_workspace(tmp_path_factory.mktemp("raytrain"), ROWS)


def test_a_batch_is_shared_by_rows_between_workers():
    batch = {"user": torch.arange(7), "pos": torch.arange(7) + 10, "neg": torch.arange(7) + 20}
    shares = [batch_share(batch, r, 3) for r in range(3)]
    assert [len(s["user"]) for s in shares] == [3, 2, 2]
    assert torch.equal(torch.cat([s["pos"] for s in shares]), batch["pos"])  # disjoint, nothing lost
    assert batch_share({"user": torch.arange(1)}, 0, 2) is None  # fewer rows than workers: skipped by all
    with pytest.raises(ValueError, match="differ in rows"):
        batch_share({"user": torch.arange(4), "pos": torch.arange(3)}, 0, 2)


def test_dvbpr_asks_for_data_parallel_training_and_others_do_not():
    assert wants_data_parallel(build_model("dvbpr", {"preset": "cpu"}))
    assert not wants_data_parallel(build_model("dvbpr", {"train": {"data_parallel": False}}))
    assert not wants_data_parallel(build_model("bpr_mf"))
    assert not wants_data_parallel(build_model("most_popular"))
    assert wants_data_parallel(build_model("bpr_mf", {"train": {"data_parallel": True}}))


def test_dvbpr_trains_with_ddp_on_two_workers_and_its_checkpoint_scores(ray_cluster, ws, tmp_path):
    said: list[str] = []
    fitter = RayFitter(SETTINGS, storage=tmp_path / "ray_train", progress=said.append)
    trained = train_model(ws, "dvbpr", DVBPR_CONFIG, fitter=fitter)

    history = trained.history
    assert history.notes["distributed"]["mode"] == "ddp" and history.notes["distributed"]["workers"] == 2
    assert history.notes["data_parallel"]["backend"] == "gloo"
    assert len(history.loss) == 4 and history.loss[-1] < history.loss[0]
    assert len(history.val_auc) == 4  # rank 0 validated every epoch
    # the remote epochs reached the driver's log as they ran
    assert sum("epoch " in line and "loss=" in line for line in said) == 4
    assert not any((tmp_path / "ray_train").iterdir())  # Ray Train's run folder is removed

    ckpt = load_checkpoint(trained.checkpoint)
    assert ckpt["model_name"] == "dvbpr" and ckpt["history"]["loss"] == history.loss
    model, data, _inputs, _ = load_trained(ws, "dvbpr")
    result = evaluate(model.score, data.holdout, len(data.items), ks=(10,))
    assert result.n_rows == 40 and np.isfinite(result.means["auc"])


def test_a_model_trained_as_a_ray_task_equals_its_local_training(ray_cluster, ws, tmp_path):
    config = {"epochs": 2, "factors": 8, "device": "cpu"}
    local = train_model(ws, "bpr_mf", config, path=tmp_path / "local.pt")
    said: list[str] = []
    remote = train_model(
        ws, "bpr_mf", config, path=tmp_path / "remote.pt",
        fitter=RayFitter(SETTINGS, storage=tmp_path / "ray_train", progress=said.append),
    )
    assert remote.history.notes["distributed"]["mode"] == "task"
    assert remote.history.loss == local.history.loss
    a, b = load_checkpoint(local.checkpoint)["state"], load_checkpoint(remote.checkpoint)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("bpr_mf: epoch 2/2" in line for line in said)


def test_a_time_budget_stops_every_ddp_worker_at_the_same_batch(ray_cluster, ws, tmp_path):
    # CPU runs on the user's data cap every model's training (cli.user_data_run_config): the workers
    # read rank 0's clock, so all stop together instead of waiting on each other in DDP
    config = {**DVBPR_CONFIG, "train": {**DVBPR_CONFIG["train"], "max_minutes": 1e-4}}
    trained = train_model(ws, "dvbpr", config, fitter=RayFitter(SETTINGS, storage=tmp_path / "ray_train"))
    assert trained.history.notes["stopped_by"] == "time_budget"
    assert len(trained.history.loss) == 1 and trained.history.notes["data_parallel"]["workers"] == 2
