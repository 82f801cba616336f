"""The ingest assets materialized with Dagster on real dataset folders and real DuckDB files."""

from __future__ import annotations

import functools

import dagster as dg
import duckdb
import pandas as pd
import pytest

from visrec_pipeline import db
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.ingest import ingest_batch
from visrec_pipeline.ingest import store as ingest_store
from visrec_pipeline.ingest.shrink_guard import ShrinkPolicy
from visrec_pipeline.paths import Workspace

ROWS = [
    # user 1: a duplicate pair (item 10 twice, the later one wins), three distinct items
    {"user_id": 1, "item_id": 10, "timestamp": 100},
    {"user_id": 1, "item_id": 11, "timestamp": 200},
    {"user_id": 1, "item_id": 10, "timestamp": 300},
    {"user_id": 1, "item_id": 12, "timestamp": 250},
    # user 2: two items with the same timestamp -> the larger item id is "last"
    {"user_id": 2, "item_id": 12, "timestamp": 400},
    {"user_id": 2, "item_id": 11, "timestamp": 400},
    # user 3: a single interaction -> training only
    {"user_id": 3, "item_id": 13, "timestamp": 50},
]
ITEMS = [
    {"item_id": 10, "title": "Bridge", "creator": "Ana", "url": "https://example.org/10"},
    {"item_id": 11, "title": "Harbour", "creator": "", "url": ""},
    {"item_id": 99, "title": "Never seen", "creator": "Bo", "url": ""},
]


def resources(ws: Workspace, **settings) -> dict:
    return {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset, **settings),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
    }


def materialize(
    ws: Workspace, run_config: dict | None = None, *, selection=None, raise_on_error: bool = True, **settings
):
    return dg.materialize(
        INGEST_ASSETS,
        resources=resources(ws, **settings),
        run_config=run_config,
        selection=selection,
        raise_on_error=raise_on_error,
    )


def metadata(result, node: str) -> dict:
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def failure_message(result) -> str:
    (event,) = result.get_step_failure_events()
    return event.event_specific_data.user_failure_data.description


def query(ws: Workspace, sql: str) -> list[tuple]:
    with db.connect(ws.db_path, read_only=True) as conn:
        return conn.execute(sql).fetchall()


def test_materializes_tables_metadata_and_checks(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS, items=ITEMS)
    result = materialize(workspace)
    assert result.success

    assert query(workspace, "SELECT user_id, item_id, ts, evaluation FROM interactions") == [
        (3, 13, 50, None),
        (1, 11, 200, None),
        (1, 12, 250, None),
        (1, 10, 300, None),
        (2, 11, 400, None),
        (2, 12, 400, None),
    ]
    assert query(workspace, "SELECT * FROM item_catalog ORDER BY item_id") == [
        (10, "Bridge", "Ana", "https://example.org/10", 100),  # first_seen: the earlier duplicate
        (11, "Harbour", None, None, 200),
        (12, None, None, None, 250),
        (13, None, None, None, 50),
    ]
    assert query(workspace, "SELECT * FROM split_train ORDER BY ts, item_id, user_id") == [
        (3, 13, 50),
        (1, 11, 200),
        (1, 12, 250),
        (2, 11, 400),
    ]
    assert query(workspace, "SELECT * FROM split_holdout ORDER BY user_id") == [(1, [11, 12], [10]), (2, [11], [12])]

    raw = metadata(result, "raw_interactions")
    assert raw["rows_in_file"] == 7 and raw["rows_loaded"] == 7 and raw["rejected_rows"] == 0
    assert raw["batches"] == 1 and "| initial | 0 | interactions.csv | 7 | 7 | 0 |" in raw["batch_table"]
    inter = metadata(result, "interactions")
    assert (inter["users"], inter["items"], inter["interactions"], inter["duplicates_removed"]) == (3, 4, 6, 1)
    assert inter["sparsity"] == pytest.approx(1 - 6 / 12)
    assert "| per user | 1 | 1.5 | 2 | 2.5 | 2.8 | 3 |" in inter["interactions_per_user"]
    cat = metadata(result, "item_catalog")
    assert (cat["items"], cat["with_title"], cat["with_creator"], cat["items_csv_rows_ignored (no interactions)"]) == (
        4,
        2,
        1,
        1,
    )
    sp = metadata(result, "split")
    assert (sp["train_rows"], sp["holdout_users"], sp["predict_items"]) == (4, 2, 2)
    assert sp["share_users_with_holdout"] == pytest.approx(2 / 3)
    assert checks(result) == {
        "no_rejected_rows": True,
        "no_duplicate_pairs": True,
        "ids_non_negative": True,
        "interaction_items_in_catalog": True,
        "holdout_rows_nonempty": True,
        "predict_disjoint_from_profile": True,
        "train_and_holdout_equal_interactions": True,
        "holdout_user_share": True,
    }


def test_rerun_replaces_the_batch_and_never_duplicates(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    first = materialize(workspace)
    second = materialize(workspace)
    assert first.success and second.success
    assert query(workspace, "SELECT count(*) FROM raw_interactions") == [(7,)]
    assert query(workspace, "SELECT count(*), count(DISTINCT batch_id) FROM ingest_batches") == [(1, 1)]
    assert query(workspace, "SELECT count(*) FROM interactions") == [(6,)]
    # unchanged content -> unchanged data versions
    for node in ("raw_interactions", "interactions", "item_catalog", "split"):
        (a,) = first.asset_materializations_for_node(node)
        (b,) = second.asset_materializations_for_node(node)
        assert a.tags["dagster/data_version"] == b.tags["dagster/data_version"]


def test_malformed_file_fails_with_file_line_column_and_keeps_previous_tables(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    assert materialize(workspace).success
    make_dataset(workspace.dataset_dir, "user_id,item_id,timestamp\n1,10,100\n1,11,yesterday\n")
    result = materialize(workspace, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert message.splitlines()[0] == (
        "interactions.csv line 3, column 'timestamp': 'yesterday' is not a unix timestamp or ISO-8601 date"
    )
    assert "quarantine_bad_rows: true" in message
    assert result.get_failed_step_keys() == {"raw_interactions"}
    assert query(workspace, "SELECT count(*) FROM raw_interactions") == [(7,)]
    assert query(workspace, "SELECT count(*) FROM interactions") == [(6,)]


def test_quarantine_keeps_good_rows_and_records_rejects(workspace, make_dataset):
    make_dataset(
        workspace.dataset_dir,
        "user_id,item_id,timestamp\n1,10,100\n1,x,200\n\n2,11,-5\n2,12,300\n3,13\n",
        image_items=[10, 12],
    )
    run_config = {"ops": {"raw_interactions": {"config": {"quarantine_bad_rows": True}}}}
    result = materialize(workspace, run_config, selection=["raw_interactions", "interactions"])
    assert result.success
    assert query(workspace, "SELECT user_id, item_id, ts, source_line FROM raw_interactions ORDER BY source_line") == [
        (1, 10, 100, 2),
        (2, 12, 300, 6),
    ]
    assert query(workspace, "SELECT line, column_name, value, reason FROM raw_interaction_rejects ORDER BY line") == [
        (3, "item_id", "x", "'x' is not an integer id"),
        (5, "timestamp", "-5", "'-5' is before 1970-01-01 (a negative unix timestamp)"),
        (7, "timestamp", None, "missing: the line has 2 field(s), the header 3"),
    ]
    raw = metadata(result, "raw_interactions")
    assert (raw["rows_in_file"], raw["rows_loaded"], raw["rejected_rows"], raw["rejected_rows_total"]) == (5, 2, 3, 3)
    assert "| interactions.csv | line | 3 | item_id | 'x' is not an integer id |" in raw["rejects"]
    (warn,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "no_rejected_rows"]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN

    # fixing the file and re-running replaces the batch, rejects included
    make_dataset(workspace.dataset_dir, "user_id,item_id,timestamp\n1,10,100\n", image_items=[])
    assert materialize(workspace, run_config, selection=["raw_interactions"]).success
    assert query(workspace, "SELECT count(*) FROM raw_interaction_rejects") == [(0,)]
    assert query(workspace, "SELECT count(*) FROM raw_interactions") == [(1,)]


def test_parquet_dataset_with_evaluation_column(workspace, make_dataset):
    df = pd.DataFrame(ROWS).assign(
        timestamp=lambda d: pd.to_datetime(d["timestamp"], unit="s", utc=True),
        evaluation=[False, False, True, False, False, True, False],
    )
    make_dataset(workspace.dataset_dir, df, fmt="parquet")
    result = materialize(workspace)
    assert result.success
    # the given flags decide: (1,10) latest row is flagged, (2,11) too; user 3 has none
    assert query(workspace, "SELECT * FROM split_holdout ORDER BY user_id") == [(1, [11, 12], [10]), (2, [12], [11])]
    assert metadata(result, "split")["mode"].startswith("evaluation column of the input")
    assert query(workspace, "SELECT source_line FROM raw_interactions ORDER BY source_line") == [(i,) for i in range(7)]

    recomputed = materialize(
        workspace, {"ops": {"split": {"config": {"recompute_evaluation": True}}}}, selection=["split"]
    )
    assert recomputed.success
    assert query(workspace, "SELECT * FROM split_holdout ORDER BY user_id") == [(1, [11, 12], [10]), (2, [11], [12])]


def test_holdout_per_user_config(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    result = materialize(workspace, {"ops": {"split": {"config": {"holdout_per_user": 2}}}})
    assert result.success
    # only user 1 has more than 2 interactions
    assert query(workspace, "SELECT * FROM split_holdout") == [(1, [11], [10, 12])]
    (share,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "holdout_user_share"]
    assert not share.passed and share.severity == dg.AssetCheckSeverity.WARN


def test_later_batch_is_deduplicated_with_the_initial_one(workspace, make_dataset, tmp_path):
    make_dataset(workspace.dataset_dir, ROWS)
    assert materialize(workspace, selection=["raw_interactions"]).success
    later = tmp_path / "later.csv"
    # (1,10) again at the same time as its latest row: the later batch decides the flag;
    # (3,13) later than before: the new timestamp wins; (4,14) is new
    later.write_text("user_id,item_id,timestamp,evaluation\n1,10,300,true\n3,13,60,false\n4,14,70,false\n")
    with db.connect(workspace.db_path) as conn:
        batch = ingest_batch(conn, "2021-06", later, source_file="incoming/later.csv")
        ingest_batch(conn, "2021-06", later, source_file="incoming/later.csv")  # replaced, not added
    assert batch.n_rows == 3
    result = materialize(workspace, selection=["interactions", "item_catalog", "split"])
    assert result.success
    assert query(workspace, "SELECT batch_id, batch_seq, source_file FROM ingest_batches ORDER BY batch_seq") == [
        ("initial", 0, "interactions.csv"),
        ("2021-06", 1, "incoming/later.csv"),
    ]
    assert query(workspace, "SELECT count(*) FROM raw_interactions") == [(10,)]
    assert query(
        workspace,
        "SELECT user_id, item_id, ts, evaluation FROM interactions WHERE user_id IN (1, 3, 4) "
        "AND item_id IN (10, 13, 14) ORDER BY user_id",
    ) == [(1, 10, 300, True), (3, 13, 60, False), (4, 14, 70, False)]
    # the flag column is now present: flagged rows decide, unflagged rows are training rows
    assert query(workspace, "SELECT * FROM split_holdout ORDER BY user_id") == [(1, [11, 12], [10])]
    assert metadata(result, "item_catalog")["items"] == 5


def test_failure_inside_the_write_transaction_keeps_the_previous_batch(workspace, make_dataset, monkeypatch):
    make_dataset(workspace.dataset_dir, ROWS)
    assert materialize(workspace, selection=["raw_interactions"]).success
    before = query(workspace, "SELECT * FROM raw_interactions ORDER BY source_line")
    make_dataset(workspace.dataset_dir, [{"user_id": 9, "item_id": 90, "timestamp": 1}])

    real_run_sql = ingest_store.run_sql

    def run_then_die(conn, name, params=None):
        real_run_sql(conn, name, params)  # the batch is deleted and re-inserted ...
        if name != "ingest_write_batch":
            return
        assert conn.execute("SELECT count(*) FROM raw_interactions").fetchone() == (1,)
        raise KeyboardInterrupt("killed before COMMIT")  # ... then the process is interrupted

    monkeypatch.setattr(ingest_store, "run_sql", run_then_die)
    # 7 rows replaced by 1: allowed explicitly (issue 14: a batch shrinking the data by more than half)
    with duckdb.connect(str(workspace.db_path)) as conn, pytest.raises(KeyboardInterrupt):
        ingest_batch(conn, "initial", workspace.dataset_dir / "interactions.csv", shrink_policy=ShrinkPolicy(True))
    assert query(workspace, "SELECT * FROM raw_interactions ORDER BY source_line") == before
    monkeypatch.undo()
    assert materialize(workspace, selection=["raw_interactions"], allow_shrinking=True).success
    assert query(workspace, "SELECT user_id, item_id FROM raw_interactions") == [(9, 90)]


def test_missing_interactions_file_fails_clearly(workspace):
    result = materialize(workspace, selection=["raw_interactions"], raise_on_error=False)
    assert not result.success
    assert failure_message(result).startswith(
        f"no interactions file in {workspace.dataset_dir}: expected interactions.csv or interactions.parquet"
    )


def test_malformed_items_file_fails_item_catalog(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS, items="item_id,title\n10,a\n10,b\n")
    result = materialize(workspace, raise_on_error=False)
    assert result.get_failed_step_keys() == {"item_catalog"}
    assert failure_message(result).splitlines()[0] == (
        "items.csv line 3, column 'item_id': item 10 is listed again (first on line 2)"
    )


def test_demo_dataset_is_generated_when_dataset_is_demo(tmp_path, monkeypatch):
    from visrec_pipeline import demo

    small = functools.partial(demo.ensure_demo_dataset, n_items=60, n_users=12, target_interactions=120)
    monkeypatch.setattr(demo, "ensure_demo_dataset", small)
    ws = Workspace.from_settings(tmp_path / "data", "demo")
    result = materialize(ws)
    assert result.success
    assert (ws.dataset_dir / "interactions.csv").is_file()
    inter = metadata(result, "interactions")
    assert inter["users"] == 12 and inter["interactions"] > 0
    assert all(checks(result)[name] for name in ("no_duplicate_pairs", "train_and_holdout_equal_interactions"))
