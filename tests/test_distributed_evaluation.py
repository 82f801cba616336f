"""Evaluation sharded by users over Ray tasks (visrec_pipeline.distributed.evaluation): the same rows and
figures as a local evaluation, exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import split_workspace
from visrec_pipeline import db
from visrec_pipeline.distributed.cluster import ComputeSettings
from visrec_pipeline.distributed.evaluation import ShardedEvaluator, user_shards
from visrec_pipeline.pipeline import evaluate_model, load_scoring_data, train_model
from visrec_pipeline.recsys.evaluate import batch_order

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 60 users with 4-9 distinct items of 40: holdouts of different sizes (several batch groups)
ROWS = [
    {"user_id": 100 + u, "item_id": 10 + (7 * u + 3 * k) % 40, "timestamp": 1000 + 10 * k + u}
    for u in range(60)
    for k in range(4 + u % 6)
]
BATCH = 8  # small batches: the 60 holdout rows make 8 of them, shared by 4 shards


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = split_workspace(tmp_path_factory.mktemp("rayeval"), ROWS, image_items=[], sync_images=False)
    train_model(ws, "bpr_mf", {"epochs": 2, "factors": 8, "device": "cpu"})
    train_model(ws, "ease")
    return ws


def test_shards_are_whole_batches_of_the_evaluation_order(ws):
    holdout = load_scoring_data(ws).holdout
    shards = user_shards(holdout, BATCH, 3)
    assert len(shards) == 3
    assert np.array_equal(np.concatenate(shards), batch_order(holdout))  # disjoint, all rows, in order
    assert all(s.size % BATCH == 0 for s in shards[:-1])
    assert len(user_shards(holdout, 1000, 4)) == 1  # one batch cannot be split


def _summary(ws, name: str) -> pd.DataFrame:
    with db.connect(ws.db_path, read_only=True) as conn:
        return conn.execute(
            "SELECT metric, value FROM evaluation_summary WHERE model = ? ORDER BY metric", [name]
        ).df()


@pytest.mark.parametrize("name", ["bpr_mf", "ease"])
def test_sharded_evaluation_equals_local_evaluation_exactly(ray_cluster, ws, name):
    local = evaluate_model(ws, name, batch_size=BATCH)
    local_summary = _summary(ws, name)
    said: list[str] = []
    evaluator = ShardedEvaluator(ComputeSettings(engine="ray", address="local:2"), progress=said.append)
    sharded = evaluate_model(ws, name, batch_size=BATCH, evaluator=evaluator)

    pd.testing.assert_frame_equal(sharded.result.per_row, local.result.per_row, check_exact=True)
    pd.testing.assert_series_equal(pd.Series(sharded.result.means), pd.Series(local.result.means), check_exact=True)
    assert sharded.result.n_cold_rows == local.result.n_cold_rows
    pd.testing.assert_frame_equal(_summary(ws, name), local_summary, check_exact=True)
    assert sharded.trained_on == local.trained_on and sharded.train_seconds == local.train_seconds
    # 2 workers x 2 shards, each reported as it finished
    assert said[0].startswith(f"{name}: evaluating 60 users in 4 shard(s)")
    assert said[-1].startswith(f"{name}: 60/60 users evaluated")
    assert len(said) == 5


def test_the_model_and_evaluation_assets_run_on_ray_with_progress_in_the_run_log(ray_cluster, ws):
    import dagster as dg

    from visrec_pipeline.defs.models import build_model_assets
    from visrec_pipeline.defs.resources import ComputeResource, VisrecSettings
    from visrec_pipeline.recsys.registry import get_spec

    model_asset, evaluation_asset = build_model_assets(spec=get_spec("bpr_mf"))
    resources = {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "compute": ComputeResource(engine="ray", address=ray_cluster),
    }
    run_config = {
        "ops": {
            "model_bpr_mf": {"config": {"train": {"epochs": 2, "device": "cpu"}, "factors": 8}},
            "evaluation_bpr_mf": {"config": {"batch_size": BATCH}},
        }
    }
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [model_asset, evaluation_asset], resources=resources, run_config=run_config, instance=instance
        )
        assert result.success
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
    (trained,) = result.asset_materializations_for_node("model_bpr_mf")
    assert trained.metadata["notes"].value["distributed"]["mode"] == "task"
    assert any("bpr_mf: epoch 2/2" in m for m in messages)
    assert any("bpr_mf: 60/60 users evaluated" in m for m in messages)
