"""Training on the private Ray cluster (visrec_pipeline.distributed.training): DDP of DVBPR over two CPU
workers on real images, a model trained as one Ray task, and how batches are shared between workers."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from conftest import split_workspace
from visrec_pipeline.distributed.cluster import ComputeSettings
from visrec_pipeline.distributed.training import RayFitter, batch_share, task_resources, wants_data_parallel
from visrec_pipeline.pipeline import load_trained, train_model
from visrec_pipeline.recsys.base import FitInputs
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


def test_a_model_asking_for_cuda_gets_a_gpu_for_its_training():
    settings = ComputeSettings(engine="ray", cpus_per_worker=2)
    assert task_resources(build_model("bpr_mf", {"train": {"device": "cuda"}}), settings) == (2, 1.0)
    assert task_resources(build_model("bpr_mf"), settings) == (2, 0.0)
    assert task_resources(build_model("ease"), ComputeSettings(engine="ray", gpus_per_worker=0.5)) == (1.0, 0.5)


def test_dvbpr_trains_with_ddp_on_two_workers_and_its_checkpoint_scores(ray_cluster, ws, tmp_path):
    said: list[str] = []
    fitter = RayFitter(SETTINGS, storage=tmp_path / "ray_train", progress=said.append)
    trained = train_model(ws, "dvbpr", DVBPR_CONFIG, fitter=fitter)

    history = trained.history
    assert history.notes["distributed"]["mode"] == "ddp" and history.notes["distributed"]["workers"] == 2
    assert history.notes["data_parallel"]["backend"] == "gloo"
    # measured in a task on a worker (the per-image time: a toy epoch can round to 0.0 s on an idle machine)
    assert history.notes["cost_estimate"]["train_s_per_image"] > 0
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



def test_ddp_workers_keep_equal_weights_and_a_time_budget_stops_them_together(ray_cluster):
    # a CPU run on the user's data caps every model's training (cli.user_data_run_config): the workers
    # read rank 0's clock, so all stop at the same batch instead of waiting on each other in DDP
    import socket

    import ray

    from visrec_pipeline.recsys.synthetic import planted_dataset

    def ddp_rank(rank: int, port: int, data, inputs, config: dict) -> tuple[dict, dict]:
        """One of two DDP workers, its process group made by hand (as TorchTrainer makes its workers')."""
        import dataclasses

        import torch.distributed as dist

        from visrec_pipeline.distributed.training import TorchDDP

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        try:
            model = build_model("dvbpr", config)
            history = model.fit(data, inputs, parallel=TorchDDP(rank, 2, torch.device("cpu")))
            return dataclasses.asdict(history), {k: v.clone() for k, v in model.state_dict().items()}
        finally:
            dist.destroy_process_group()

    syn = planted_dataset(n_users=60, n_items=80, n_clusters=4, dim=8, per_user=(6, 12), seed=3)
    fit, validation = syn.data.validation_split()
    rng = np.random.default_rng(0)
    # FitInputs.images: rows of a table of random images (a partial of torch travels to the workers)
    images = functools.partial(torch.index_select, torch.from_numpy(rng.integers(0, 256, (80, 3, 32, 32), dtype=np.uint8)), 0)
    inputs = FitInputs(images=images, validation=validation)
    tiny = {"k": 4, "gamma_dim": 2, "input_size": 48, "width_mult": 0.125, "fc_dim": 16, "lrn": False,
            "train": {"epochs": 3, "batch_size": 64, "lr": 1e-2, "device": "cpu", "data_parallel": True}}
    task = ray.remote(num_cpus=1)(ddp_rank)
    for budget, epochs in ((0.0, 3), (1e-5, 1)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = {**tiny, "train": {**tiny["train"], "max_minutes": budget}}
        (h0, s0), (h1, s1) = ray.get([task.remote(r, port, fit, inputs, config) for r in (0, 1)], timeout=300)
        assert len(h0["loss"]) == len(h1["loss"]) == epochs and h0["loss"] == h1["loss"]
        assert h0["notes"]["stopped_by"] == h1["notes"]["stopped_by"] == ("time_budget" if budget else "epochs")
        # DDP averaged the gradients: the two workers end with the same weights
        assert all(torch.equal(s0[k], s1[k]) for k in s0 if k.startswith("module."))
