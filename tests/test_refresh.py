"""Incremental refresh end to end: a later batch dropped into incoming/, the sensor, declarative
automation, and what it recomputes (real DuckDB file, real images, a small generated demo)."""

from __future__ import annotations

import datetime as dt
import shutil
import time

import dagster as dg
import pytest
import torch

from visrec_pipeline import db
from visrec_pipeline.defs.images import CommonsImageSource
from visrec_pipeline.defs.incoming import BATCHES, INCOMING_ASSET
from visrec_pipeline.defs.refresh import incoming_files_sensor
from visrec_pipeline.defs.resources import ComputeResource, VisrecDuckDB, VisrecSettings
from visrec_pipeline.demo.generate import generate_demo_dataset
from visrec_pipeline.paths import Workspace

# 50 items, 12 users, ~120 interactions; batch_001 has 9 rows using 2 of its 3 new items
DEMO = dict(n_items=50, n_users=12, target_interactions=120, seed=3)
MODELS = ("most_popular", "vbpr", "curatornet")
DATA_SIDE = (
    "interactions",
    "item_catalog",
    "split",
    "item_images",
    "embeddings_resnet50",
    "embeddings_alexnet",
    "visual_clusters",
    "triples_random",
    "triples_guided",
)
FOLLOWERS = tuple(f"evaluation_{m}" for m in MODELS) + ("benchmark_report",)
EMBEDDING_CONFIG = {"config": {"weights": "random", "batch_size": 64, "num_workers": 0, "neighbour_queries": 0}}
RUN_CONFIG = {
    "ops": {
        "embeddings_resnet50": EMBEDDING_CONFIG,
        "embeddings_alexnet": EMBEDDING_CONFIG,
        "visual_clusters": {"config": {"k": 4, "preview_clusters": 0}},
        "model_vbpr": {"config": {"train": {"epochs": 2}, "dim_gamma": 8, "dim_theta": 8}},
        "model_curatornet": {"config": {"train": {"epochs": 1}}},
        "benchmark_report": {"config": {"grid_users": 0, "attention_users": 0}},
    }
}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("VISREC_OFFLINE", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared box is oversubscribed; one thread is much faster there
    yield
    torch.set_num_threads(before)


@pytest.fixture
def env(tmp_path):
    dataset = tmp_path / "dataset"
    summary = generate_demo_dataset(dataset, **DEMO)
    ws = Workspace.from_settings(tmp_path / "data", str(dataset))
    from visrec_pipeline.definitions import build_definitions

    resources = {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
        "commons": CommonsImageSource(),
        "compute": ComputeResource(),
    }
    defs = build_definitions(resources)
    with dg.DagsterInstance.ephemeral() as instance:
        yield ws, defs, resources, instance, summary


def _assets(defs):
    return list(defs.assets)


def _run(defs, resources, instance, selection, partition_key=None):
    keys = [dg.AssetKey(s) if isinstance(s, str) else s for s in selection]
    ops = {k: v for k, v in RUN_CONFIG["ops"].items() if dg.AssetKey(k) in keys}
    result = dg.materialize(
        _assets(defs),
        selection=keys,
        resources=resources,
        instance=instance,
        partition_key=partition_key,
        run_config={"ops": ops},
    )
    assert result.success
    return result


def _meta(result, node):
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def _query(ws, sql, params=None):
    with db.connect(ws.db_path, read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


def _requested(result) -> set[str]:
    return {r.key.to_user_string() for r in result.results if r.true_subset.size}


def _tick(defs, instance, resources, cursor=None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=resources)
    return incoming_files_sensor(ctx)


def _apply_partitions(instance, sensor_result):
    for req in sensor_result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def test_later_batch_refreshes_only_the_delta(env):
    ws, defs, resources, instance, summary = env
    selection = dg.AssetSelection.assets(*DATA_SIDE, *(f"model_{m}" for m in MODELS), *FOLLOWERS)

    # 1. the initial build, then automation is switched on: nothing to do yet
    t0 = time.perf_counter()
    _run(defs, resources, instance, ["raw_interactions", *DATA_SIDE, *(f"model_{m}" for m in MODELS), *FOLLOWERS])
    print(f"initial build {time.perf_counter() - t0:.1f} s")
    now = dt.datetime.now(dt.timezone.utc)
    auto = dg.evaluate_automation_conditions(defs, instance, asset_selection=selection, evaluation_time=now)
    assert _requested(auto) == set()
    rows_before = _query(ws, "SELECT count(*) FROM raw_interactions")[0][0]
    items_before = {i for (i,) in _query(ws, "SELECT item_id FROM item_catalog")}

    # 2. the later batch arrives; the sensor registers it and requests its run
    batch = ws.dataset_dir / "later_batches" / "batch_001.csv"
    ws.incoming_dir.mkdir()
    shutil.copy(ws.dataset_dir / "later_batches" / "batch_001_items.csv", ws.incoming_dir)
    shutil.copy(batch, ws.incoming_dir)
    tick = _tick(defs, instance, resources)
    (request,) = tick.run_requests
    assert request.partition_key.startswith("batch_001-") and request.run_key == request.partition_key
    _apply_partitions(instance, tick)
    t0 = time.perf_counter()
    ingest = _run(defs, resources, instance, [INCOMING_ASSET], partition_key=request.partition_key)
    assert _meta(ingest, INCOMING_ASSET)["rows_loaded"] == summary.batches[0].n_rows

    # 3. automation: the data side follows at once, models wait for their cron tick
    auto = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, evaluation_time=now + dt.timedelta(minutes=1), cursor=auto.cursor
    )
    assert _requested(auto) == set(DATA_SIDE)
    refresh = _run(defs, resources, instance, sorted(_requested(auto)))
    print(f"refresh {time.perf_counter() - t0:.1f} s")

    n_new_rows = summary.batches[0].n_rows
    assert _query(ws, "SELECT count(*) FROM raw_interactions")[0][0] == rows_before + n_new_rows
    assert _query(ws, "SELECT count(*) FROM raw_interactions WHERE batch_id = ?", [request.partition_key]) == [
        (n_new_rows,)
    ]
    new_items = {i for (i,) in _query(ws, "SELECT item_id FROM item_catalog")} - items_before
    assert len(new_items) == summary.batches[0].n_new_items_used > 0
    # the new items got their metadata from incoming/batch_001_items.csv
    assert all(t for (t,) in _query(ws, f"SELECT title FROM item_catalog WHERE item_id IN ({','.join(map(str, new_items))})"))
    assert _meta(refresh, "item_catalog")["new_items"] == len(new_items)
    assert _meta(refresh, "item_images")["processed_this_run"] == len(new_items)
    for backbone in ("resnet50", "alexnet"):
        m = _meta(refresh, f"embeddings_{backbone}")
        assert m["computed"] == len(new_items) and m["reused"] == len(items_before)

    # an evaluation asked for now, before the models retrain, is refused: the split moved under the checkpoint
    stale = dg.materialize(
        _assets(defs), selection=[dg.AssetKey("evaluation_vbpr")], resources=resources, instance=instance,
        raise_on_error=False,
    )
    (refused,) = stale.get_step_failure_events()
    message = refused.event_specific_data.error.to_string()  # the wrapped error and its cause
    assert "trained on other data" in message and "table split_train" in message
    assert "re-materialize model_vbpr" in message

    # 4. after the cron tick the models retrain; evaluation and report follow them in the same run
    later = now + dt.timedelta(days=1, minutes=2)
    auto = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, evaluation_time=later, cursor=auto.cursor
    )
    assert _requested(auto) == {f"model_{m}" for m in MODELS} | set(FOLLOWERS)
    follow = models = _run(defs, resources, instance, sorted(_requested(auto)))
    lineage = _meta(models, "model_vbpr")["lineage"]
    assert lineage["partitions"] == [request.partition_key]
    assert lineage["embeddings"]["resnet50"]["items"] == len(items_before) + len(new_items)
    assert lineage["triples"]["triples_random"]["present"]
    assert _meta(models, "model_curatornet")["lineage"]["triples"]["triples_guided"]["file_sha256"]
    assert _meta(follow, "evaluation_vbpr")["lineage"] == lineage
    assert _meta(follow, "benchmark_report")["models"] == len(MODELS)

    # 5. the same file delivered again (new mtime, or under another name) does nothing
    shutil.copy(batch, ws.incoming_dir / "batch_001.csv")
    shutil.copy(batch, ws.incoming_dir / "batch_001_again.csv")
    again = _tick(defs, instance, resources, cursor=tick.cursor)
    assert not again.run_requests and not again.dynamic_partitions_requests
    assert instance.get_dynamic_partitions(BATCHES.name) == [request.partition_key]
    auto = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, evaluation_time=later + dt.timedelta(days=1), cursor=auto.cursor
    )
    assert _requested(auto) == set()
    assert _query(ws, "SELECT count(*) FROM raw_interactions")[0][0] == rows_before + n_new_rows


# ---------------------------------------------------------------- rejection, idempotence, pauses

ROWS = "user_id,item_id,timestamp\n" + "".join(f"{u},{10 + (u * 3 + k) % 7},{100 + 10 * k + u}\n" for u in range(1, 7) for k in range(4))
GOOD = "user_id,item_id,timestamp\n1,20,900\n7,10,910\n7,11,920\n"
BAD = "user_id,item_id,timestamp\n8,10,930\n8,11,yesterday\n"
INGEST = ("interactions", "item_catalog", "split")


def _ingest_defs(ws):
    from visrec_pipeline.defs.incoming import incoming_interactions
    from visrec_pipeline.defs.ingest import INGEST_ASSETS
    from visrec_pipeline.defs.models import MODEL_ASSETS

    (most_popular,) = [m for m, _e in MODEL_ASSETS if m.key.to_user_string() == "model_most_popular"]
    resources = {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
    }
    return dg.Definitions(assets=[*INGEST_ASSETS, incoming_interactions, most_popular], resources=resources), resources


def _deliver(ws, name, text):
    ws.incoming_dir.mkdir(parents=True, exist_ok=True)
    (ws.incoming_dir / name).write_text(text)


def test_malformed_batch_is_rejected_whole_and_a_batch_is_written_once(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS, image_items=[])
    defs, resources = _ingest_defs(workspace)
    with dg.DagsterInstance.ephemeral() as instance:
        _run(defs, resources, instance, ["raw_interactions", *INGEST])
        _deliver(workspace, "good.csv", GOOD)
        _deliver(workspace, "bad.csv", BAD)
        tick = _tick(defs, instance, resources)
        keys = {r.tags["visrec/source_file"]: r.partition_key for r in tick.run_requests}
        assert set(keys) == {"incoming/good.csv", "incoming/bad.csv"}
        _apply_partitions(instance, tick)

        first = _run(defs, resources, instance, [INCOMING_ASSET], partition_key=keys["incoming/good.csv"])
        second = _run(defs, resources, instance, [INCOMING_ASSET], partition_key=keys["incoming/good.csv"])
        before = _query(workspace, "SELECT * FROM raw_interactions ORDER BY batch_id, source_line")
        assert _query(workspace, "SELECT count(*) FROM raw_interactions WHERE source_file = 'incoming/good.csv'") == [(3,)]
        (a,) = first.asset_materializations_for_node(INCOMING_ASSET)
        (b,) = second.asset_materializations_for_node(INCOMING_ASSET)
        assert a.tags["dagster/data_version"] == b.tags["dagster/data_version"]

        bad = dg.materialize(
            list(defs.assets),
            selection=[INCOMING_ASSET],
            resources=resources,
            instance=instance,
            partition_key=keys["incoming/bad.csv"],
            raise_on_error=False,
        )
        assert not bad.success
        (event,) = bad.get_step_failure_events()
        message = event.event_specific_data.user_failure_data.description
        assert "batch incoming/bad.csv rejected whole" in message
        assert "incoming/bad.csv line 3, column 'timestamp': 'yesterday'" in message
        # nothing of the bad file was written, the earlier batches are as they were
        assert _query(workspace, "SELECT * FROM raw_interactions ORDER BY batch_id, source_line") == before
        assert _query(workspace, "SELECT count(*) FROM ingest_batches WHERE source_file = 'incoming/bad.csv'") == [(0,)]


def test_resuming_after_a_pause_requests_each_asset_once(workspace, make_dataset, monkeypatch):
    from visrec_pipeline.defs.refresh import refresh_due

    monkeypatch.setenv("VISREC_MAX_BATCHES_PER_TICK", "2")
    make_dataset(workspace.dataset_dir, ROWS, image_items=[])
    defs, resources = _ingest_defs(workspace)
    selection = dg.AssetSelection.assets(*INGEST, "model_most_popular")
    with dg.DagsterInstance.ephemeral() as instance:
        _run(defs, resources, instance, ["raw_interactions", *INGEST, "model_most_popular"])
        now = dt.datetime.now(dt.timezone.utc)
        auto = dg.evaluate_automation_conditions(defs, instance, asset_selection=selection, evaluation_time=now)
        assert auto.total_requested == 0
        assert not refresh_due(instance)  # the schedule skips

        # while automation is paused, three batches arrive; the sensor takes at most two per tick
        for i in range(3):
            _deliver(workspace, f"b{i}.csv", f"user_id,item_id,timestamp\n{20 + i},{10 + i},{1000 + i}\n")
        tick = _tick(defs, instance, resources)
        assert len(tick.run_requests) == 2
        _apply_partitions(instance, tick)
        tick2 = _tick(defs, instance, resources, cursor=tick.cursor)
        assert len(tick2.run_requests) == 1
        _apply_partitions(instance, tick2)
        assert not _tick(defs, instance, resources, cursor=tick2.cursor).run_requests
        for r in [*tick.run_requests, *tick2.run_requests]:
            _run(defs, resources, instance, [INCOMING_ASSET], partition_key=r.partition_key)
        assert refresh_due(instance)  # the schedule would run visrec_refresh now

        # resumed three days (three cron ticks) later: one request per asset, not one per batch or tick
        auto = dg.evaluate_automation_conditions(
            defs, instance, asset_selection=selection, evaluation_time=now + dt.timedelta(days=3), cursor=auto.cursor
        )
        assert {k: auto.get_num_requested(dg.AssetKey(k)) for k in (*INGEST, "model_most_popular")} == {
            "interactions": 1,
            "item_catalog": 1,
            "split": 1,
            "model_most_popular": 1,
        }
        assert auto.total_requested == 4


def test_graph_wiring_code_versions_and_named_conditions():
    from visrec_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    labels = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version, key
        labels[key.to_user_string()] = node.automation_condition.get_label() if node.automation_condition else None
    assert labels[INCOMING_ASSET] is None  # driven by incoming_files_sensor, one partition per file
    assert all(labels[k] == "data side: eager on new data" for k in ("raw_interactions", *DATA_SIDE))
    assert labels["model_vbpr"].startswith("models: retrain on cron")
    assert labels["evaluation_vbpr"] == labels["recommendations"] == "follows the models"
    assert labels["benchmark_report"] == "report: follows the evaluations"
    assert dg.AssetKey(INCOMING_ASSET) in graph.get(dg.AssetKey("interactions")).parent_keys
    # visrec_all (make demo) stays one unpartitioned job
    job = defs.resolve_job_def("visrec_all")
    assert job.partitions_def is None
    assert dg.AssetKey(INCOMING_ASSET) not in job.asset_layer.executable_asset_keys
    assert dg.AssetKey("benchmark_report") in job.asset_layer.executable_asset_keys
