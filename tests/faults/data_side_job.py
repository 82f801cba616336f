"""One run of the project's ``visrec_all`` job over the data side through one model, for the kill
and re-run tests: ingest, ``item_images``, ``embeddings_alexnet``, ``triples_random`` and
``model_bpr_mf`` (1 epoch), with the project's executor (one process per step, forkserver).

Run as ``python data_side_job.py DATA_DIR DATASET`` with DAGSTER_HOME set; prints ``run <id> <success>``.
"""

import sys

import dagster as dg

ASSETS = ("raw_interactions", "interactions", "item_catalog", "split", "item_images",
          "embeddings_alexnet", "triples_random", "model_bpr_mf")
# random-init weights (a cached initialisation, no download), small batches, one decode process
EMBEDDINGS = {"weights": "random", "device": "cpu", "batch_size": 4, "num_workers": 0,
              "neighbour_queries": 2, "neighbours": 2}
BPR_MF = {"factors": 8, "train": {"epochs": 1, "device": "cpu"}}


def run_config(data_dir: str, dataset: str) -> dict:
    from visrec_pipeline.paths import Workspace

    ws = Workspace.from_settings(data_dir, dataset)
    return {
        "resources": {
            "settings": {"config": {"data_dir": str(ws.data_dir), "dataset": ws.dataset, "torch_threads": 1}},
            "duckdb": {"config": {"database": str(ws.db_path)}},
        },
        "ops": {"embeddings_alexnet": {"config": EMBEDDINGS}, "model_bpr_mf": {"config": BPR_MF}},
    }


if __name__ == "__main__":
    from visrec_pipeline.cli import all_assets_job

    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(all_assets_job),
            instance=instance,
            asset_selection=[dg.AssetKey(a) for a in ASSETS],
            run_config=run_config(sys.argv[1], sys.argv[2]),
            raise_on_error=False,
        )
    print("run", result.run_id, result.success, flush=True)
    sys.exit(0 if result.success else 1)
