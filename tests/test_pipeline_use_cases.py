"""The model path called as a library (no Dagster): train, evaluate, load, recommend and report on a
small real workspace, and the Dagster assets writing what the library calls write."""

from __future__ import annotations

import dataclasses

import dagster as dg
import pytest
import torch

from conftest import split_workspace
from visrec_pipeline import db
from visrec_pipeline.embeddings.store import ensure_tables as ensure_embedding_tables
from visrec_pipeline.pipeline import (
    checkpoint_path,
    evaluate_model,
    feature_provenance,
    load_trained,
    recommend_all,
    train_model,
)
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.registry import get_spec
from visrec_pipeline.reporting.benchmark_report import write_benchmark_report

N_USERS, N_ITEMS = 10, 12
# every user has 5 distinct items (1 held out, 1 for validation, 3 to fit): first one of items 10-12,
# then 4 of items 13-21
ROWS = [
    {"user_id": 100 + u, "item_id": 10 + (3 + (u + k) % 9 if k else u % 3), "timestamp": 1000 + 10 * k + u}
    for u in range(N_USERS)
    for k in range(5)
]
BPR_CONFIG = {"epochs": 1, "factors": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with raw_interactions, interactions, item_catalog, split and item_images built by the
    library functions the ingest and image assets call, and most_popular and bpr_mf trained."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("usecase")
    ws = split_workspace(root, ROWS)
    train_model(ws, "most_popular")
    train_model(ws, "bpr_mf", BPR_CONFIG)
    yield ws
    torch.set_num_threads(before)


def _summary(ws, model, protocol="standard") -> dict[str, float]:
    with db.connect(ws.db_path, read_only=True) as conn:
        rows = conn.execute(
            "SELECT metric, value FROM evaluation_summary WHERE model = ? AND protocol = ?", [model, protocol]
        ).fetchall()
    return dict(rows)


def test_train_model_writes_a_checkpoint_and_reports_what_it_was_trained_on(ws):
    trained = train_model(ws, "bpr_mf", BPR_CONFIG)
    assert trained.checkpoint == checkpoint_path(ws, "bpr_mf") == ws.models_dir / "bpr_mf" / "bpr_mf.pt"
    assert trained.checkpoint.is_file()
    assert trained.config == BPR_CONFIG
    assert len(trained.history.loss) == 1 and trained.train_seconds > 0
    assert (trained.n_users, trained.n_items) == (N_USERS, N_ITEMS)
    # 5 rows per user: 1 held out by the split, 1 taken for validation
    assert trained.n_train_rows == 3 * N_USERS and trained.n_validation_users == N_USERS
    assert set(trained.versions) == {"split_train", "split_holdout", "item_catalog", "item_images"}
    assert "absent" not in trained.versions.values()
    assert [b["batch_id"] for b in trained.lineage["batches"]] == ["initial"]
    assert trained.lineage["partitions"] == []  # only the initial batch, no incoming partitions
    assert trained.lineage["triples"]["triples_random"] == {"name": "random", "present": False}
    assert trained.features == {}  # bpr_mf reads no CNN features
    ckpt = load_trained(ws, "bpr_mf").checkpoint
    assert ckpt["config"] == BPR_CONFIG
    assert ckpt["data_versions"] == trained.versions
    assert ckpt["extra"] == {"train_seconds": trained.train_seconds, "lineage": trained.lineage}
    assert ckpt["history"] == dataclasses.asdict(trained.history)


def test_without_config_the_model_defaults_are_used_and_stored_as_no_overrides(ws):
    trained = train_model(ws, "most_popular")
    assert trained.config == {}
    loaded = load_trained(ws, "most_popular")
    assert loaded.checkpoint["config"] == {}
    assert loaded.model.config == get_spec("most_popular").config_cls()


def test_load_trained_restores_a_model_that_scores_like_the_evaluation_says(ws):
    loaded = load_trained(ws, "bpr_mf")
    model, data, inputs, ckpt = loaded  # unpacks like the 4-tuple it replaces
    assert (model, data, inputs, ckpt) == (loaded.model, loaded.data, loaded.inputs, loaded.checkpoint)
    state = model.state_dict()
    assert state.keys() == ckpt["state"].keys()
    assert all(torch.equal(state[k], ckpt["state"][k]) for k in state)
    evaluation = evaluate_model(ws, "bpr_mf", ks=(5,), protocol="standard", batch_size=3)
    direct = evaluate(model.score, data.holdout, len(data.items), ks=(5,))
    assert evaluation.result.means == direct.means


def test_evaluate_model_stores_rows_and_means_and_replaces_them_on_rerun(ws):
    first = evaluate_model(ws, "most_popular", ks=(5, 10), protocol="tutorial", batch_size=4)
    again = evaluate_model(ws, "most_popular", ks=(5, 10), protocol="tutorial", batch_size=4)
    assert again.result.means == first.result.means
    assert first.n_rows == N_USERS and first.result.protocol == "tutorial"
    stored = _summary(ws, "most_popular", "tutorial")
    assert stored == {k: float(v) for k, v in first.result.means.items() if isinstance(v, (int, float))}
    assert {"auc", "rr", "recall@5", "ndcg@10"} <= set(stored)
    with db.connect(ws.db_path, read_only=True) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM evaluation_rows WHERE model = 'most_popular' AND protocol = 'tutorial'"
        ).fetchone()
        (train_s,) = conn.execute(
            "SELECT DISTINCT train_seconds FROM evaluation_summary WHERE model = 'most_popular'"
        ).fetchone()
    assert rows == N_USERS * len(first.result.metrics)  # once, not twice
    ckpt = load_trained(ws, "most_popular").checkpoint
    assert train_s == first.train_seconds == ckpt["extra"]["train_seconds"]
    assert first.trained_on == ckpt["data_versions"] and first.lineage == ckpt["extra"]["lineage"]


def test_recommend_all_stores_the_top_k_of_every_model_without_consumed_items(ws):
    recs = recommend_all(ws, ["most_popular", "bpr_mf"], 3)
    assert set(recs["model"]) == {"most_popular", "bpr_mf"}
    assert len(recs) == 2 * N_USERS * 3
    assert all(ranks == [1, 2, 3] for ranks in recs.groupby(["model", "user_id"])["rank"].apply(list))
    data = load_trained(ws, "most_popular").data
    profiles = {int(u): set(data.items.ids[data.holdout.profile.row(r)].tolist()) for r, u in enumerate(data.holdout.user_ids)}
    assert not any(int(i) in profiles[int(u)] for u, i in zip(recs["user_id"], recs["item_id"]))
    recommend_all(ws, ["most_popular"], 2)  # replaces the table
    with db.connect(ws.db_path, read_only=True) as conn:
        stored = conn.execute("SELECT model, count(*) FROM recommendations GROUP BY model").fetchall()
    assert stored == [("most_popular", 2 * N_USERS)]


def test_feature_provenance_names_the_weights_of_each_feature_backbone(tmp_path):
    with db.connect(tmp_path / "p.duckdb") as conn:
        assert feature_provenance(conn, {"features:resnet50"}) == {}  # no index table yet
        ensure_embedding_tables(conn)
        conn.execute(
            "INSERT INTO embedding_index (backbone, weights_tag, item_id, shard, \"row\", content_hash, computed_at) "
            "VALUES ('resnet50', 'imagenet', 1, 's', 0, 'h1', now()), ('resnet50', 'imagenet', 2, 's', 1, 'h2', now()), "
            "('alexnet', 'random:seed=0', 1, 's', 0, 'h1', now())"
        )
        needs = {"features:resnet50", "spatial:alexnet", "triples_random", "images"}
        assert feature_provenance(conn, needs) == {
            "resnet50_weights": "imagenet",
            "resnet50_items": 2,
            "alexnet_weights": "random:seed=0",
            "alexnet_items": 1,
        }
        assert feature_provenance(conn, {"triples_random"}) == {}


def test_benchmark_report_is_written_from_the_stored_results(ws):
    evaluate_model(ws, "most_popular")
    evaluate_model(ws, "bpr_mf")
    recommend_all(ws, ["most_popular", "bpr_mf"], 10)
    report = write_benchmark_report(ws, grid_users=1, grid_model="", attention_users=2)
    assert report.path == ws.reports_dir / "benchmark.md" and report.path.read_text() == report.markdown
    assert {"most_popular", "bpr_mf"} <= set(report.table.index)
    assert (ws.reports_dir / "benchmark.csv").is_file()
    assert report.attention_markdown == "ACF is not trained in this workspace: no attention panel."
    assert "## ACF attention" in report.markdown and not (ws.reports_dir / "acf_attention.png").exists()
    best = max(["most_popular", "bpr_mf"], key=lambda m: _summary(ws, m)["ndcg@20"])
    assert report.grids_markdown.startswith(f"### Recommendations of `{best}`")
    assert report.grids_markdown.count("data:image/png;base64,") == 1  # one user's grid
    assert len(report.plots_markdown) == 3 and (ws.reports_dir / "auc_by_profile_size.png").is_file()


def test_the_assets_write_what_the_library_calls_write(ws):
    from visrec_pipeline.defs.models import build_model_assets
    from visrec_pipeline.defs.resources import ComputeResource, VisrecSettings

    library = evaluate_model(ws, "most_popular")
    model_asset, evaluation_asset = build_model_assets(spec=get_spec("most_popular"))
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [model_asset, evaluation_asset],
            resources={
                "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset), "compute": ComputeResource()
            },
            instance=instance,
        )
    assert result.success
    (trained,) = result.asset_materializations_for_node("model_most_popular")
    (evaluated,) = result.asset_materializations_for_node("evaluation_most_popular")
    assert trained.metadata["checkpoint"].value == str(checkpoint_path(ws, "most_popular"))
    assert trained.metadata["n_train_rows"].value == 3 * N_USERS
    assert evaluated.metadata["n_rows"].value == library.n_rows
    means = {k: float(v) for k, v in library.result.means.items() if isinstance(v, (int, float))}
    assert {k: evaluated.metadata[k].value for k in means} == means
    assert _summary(ws, "most_popular") == means
