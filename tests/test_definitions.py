"""The code location loads (in-process and with `dg check defs`), validates, and contains the ingest
assets with their checks and pool; resources passed to build_definitions replace the bound ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parent.parent
INGEST_KEYS = {"raw_interactions", "interactions", "item_catalog", "split"}


def test_definitions_load_and_validate():
    from visrec_pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert INGEST_KEYS <= keys
    for key in INGEST_KEYS:
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == "ingest"
        assert node.code_version
        assert node.pools == {"duckdb"}
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert {
        ("raw_interactions", "no_rejected_rows"),
        ("interactions", "no_duplicate_pairs"),
        ("interactions", "ids_non_negative"),
        ("item_catalog", "interaction_items_in_catalog"),
        ("split", "holdout_rows_nonempty"),
        ("split", "predict_disjoint_from_profile"),
        ("split", "train_and_holdout_equal_interactions"),
        ("split", "holdout_user_share"),
    } <= checks
    assert graph.get(dg.AssetKey("split")).parent_keys == {dg.AssetKey("interactions")}


def test_project_instance_config_limits_the_duckdb_pool_to_one_step(tmp_path, monkeypatch):
    """The project's dagster.yaml loads and makes pool steps (the duckdb one) run one at a time."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.chdir(home)  # a relative storage folder in dagster.yaml stays inside the temp home
    with dg.DagsterInstance.from_config(str(home)) as instance:
        pools = instance.get_concurrency_config().pool_config
    assert pools.default_pool_limit == 1
    assert pools.pool_granularity.value == "op"


def test_resources_passed_to_build_definitions_replace_the_bound_ones(tmp_path):
    from visrec_pipeline.definitions import build_definitions, defs
    from visrec_pipeline.defs.images import CommonsImageSource
    from visrec_pipeline.defs.resources import ComputeResource, VisrecDuckDB, VisrecSettings

    assert set(defs.resources) == {"settings", "duckdb", "commons", "compute"}
    resources = {
        "compute": ComputeResource(engine="ray", address="local:2"),
        "settings": VisrecSettings(data_dir=str(tmp_path / "data"), dataset="demo"),
        "duckdb": VisrecDuckDB(database=str(tmp_path / "visrec.duckdb")),
        "commons": CommonsImageSource(),
    }
    rebound = build_definitions(resources)
    assert dict(rebound.resources) == resources
    assert rebound.executor is defs.executor
    graph, rebound_graph = defs.resolve_asset_graph(), rebound.resolve_asset_graph()
    assert rebound_graph.get_all_asset_keys() == graph.get_all_asset_keys()
    assert rebound_graph.asset_check_keys == graph.asset_check_keys


def test_dg_check_defs_loads_the_project(tmp_path):
    """`dg check defs` from the repo root finds the project ([tool.dg] in pyproject.toml) and loads it."""
    dg_cli = Path(sys.executable).with_name("dg")
    if not dg_cli.exists():
        pytest.skip(f"dg (dagster-dg-cli) is not installed next to {sys.executable}")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "VISREC_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [str(dg_cli), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_model_metadata_lifts_the_attention_summary_to_plain_numbers(tmp_path):
    from visrec_pipeline.defs.models import _training_metadata
    from visrec_pipeline.pipeline import TrainedModel
    from visrec_pipeline.recsys.base import TrainHistory

    attention = {"item_entropy": 0.8, "item_max_share": 0.27, "item_rows": 299, "component_top_region_share": 0.09}
    trained = TrainedModel(
        name="acf",
        checkpoint=tmp_path / "acf.pt",
        checkpoint_sha256="0" * 64,
        config={},
        history=TrainHistory(loss=[0.7, 0.5], val_auc=[0.8, 0.85], best_epoch=2, notes={"attention": attention}),
        train_seconds=1.0,
        versions={},
        features={},
        lineage={"partitions": []},
        n_users=3,
        n_items=5,
        n_train_rows=10,
        n_validation_users=3,
    )
    metadata = _training_metadata(trained)
    assert metadata["attention_item_entropy"] == dg.MetadataValue.float(0.8)
    assert metadata["attention_component_top_region_share"] == dg.MetadataValue.float(0.09)
    assert metadata["attention_item_rows"] == 299
    without = _training_metadata(TrainedModel(**{**trained.__dict__, "history": TrainHistory(loss=[0.7])}))
    assert not any(key.startswith("attention_") for key in without)
