"""Issue 14, case 2: a batch with no rows, or one that removes most of the data, is refused unless allowed.

The ingest assets materialized with Dagster on real dataset folders and DuckDB files; after a
refusal every table is exactly as before.
"""

from __future__ import annotations

import dagster as dg
import pytest

from ingest_runs import ingest_resources, step_failure
from visrec_pipeline import db
from visrec_pipeline.defs.incoming import incoming_interactions
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import VisrecSettings
from visrec_pipeline.ingest.incoming import scan_incoming
from visrec_pipeline.paths import Workspace

TABLES = ("raw_interactions", "ingest_batches", "interactions", "item_catalog", "split_train", "split_holdout")
# 10 rows: five users with two items each
ROWS = [{"user_id": u, "item_id": 10 + (3 * u + k) % 7, "timestamp": 1000 * u + k} for u in range(1, 6) for k in (0, 1)]


def _materialize(ws: Workspace, assets=INGEST_ASSETS, **settings) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, resources=ingest_resources(ws, **settings), raise_on_error=False)


def _tables(ws: Workspace) -> dict[str, list[tuple]]:
    with db.connect(ws.db_path, read_only=True) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def test_a_header_only_interactions_file_is_refused_and_the_tables_stay(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    assert _materialize(workspace).success
    before = _tables(workspace)
    assert len(before["raw_interactions"]) == len(ROWS)

    make_dataset(workspace.dataset_dir, "user_id,item_id,timestamp\n")
    refused = _materialize(workspace)
    assert not refused.success and refused.get_failed_step_keys() == {"raw_interactions"}
    message = step_failure(refused)
    assert message.startswith(
        "interactions.csv has a header and no data rows: loading it as batch 'initial' would remove that batch's "
        "10 rows, leaving raw_interactions with 0 of its 10 rows (interactions, item_catalog and split follow). "
        "Nothing was written."
    )
    assert "allow_shrinking: true" in message
    assert "VISREC_ALLOW_SHRINKING=1" in message
    assert _tables(workspace) == before

    # the explicit setting lets it empty the data
    allowed = dg.materialize(
        [INGEST_ASSETS[0]], resources=ingest_resources(workspace, allow_shrinking=True), raise_on_error=False
    )
    assert allowed.success
    assert _tables(workspace)["raw_interactions"] == []


def test_a_batch_removing_more_than_the_allowed_share_is_refused(workspace, make_dataset, monkeypatch):
    make_dataset(workspace.dataset_dir, ROWS)
    assert _materialize(workspace).success
    before = _tables(workspace)

    make_dataset(workspace.dataset_dir, ROWS[:4])  # 10 rows -> 4: 60 % fewer
    refused = _materialize(workspace)
    assert refused.get_failed_step_keys() == {"raw_interactions"}
    assert step_failure(refused).startswith(
        "interactions.csv is much smaller than the data it replaces: loading it as batch 'initial' would shrink "
        "raw_interactions to 4 of its 10 rows (interactions, item_catalog and split follow), 60% fewer, more than "
        "max_shrink_share 50% allows. Nothing was written."
    )
    assert _tables(workspace) == before

    # a larger share allowed in the settings (here from the environment's default) lets it through
    monkeypatch.setenv("VISREC_MAX_SHRINK_SHARE", "0.7")
    assert VisrecSettings(data_dir=str(workspace.data_dir), dataset=workspace.dataset).max_shrink_share == 0.7
    assert _materialize(workspace, max_shrink_share=0.7).success
    assert len(_tables(workspace)["raw_interactions"]) == 4

    # removing exactly the allowed share needs nothing
    make_dataset(workspace.dataset_dir, ROWS[:2])
    assert _materialize(workspace, max_shrink_share=0.5).success


def test_an_incoming_batch_with_no_rows_is_refused(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, ROWS)
    assert _materialize(workspace).success
    before = _tables(workspace)
    incoming = workspace.incoming_dir
    incoming.mkdir()
    (incoming / "2021-07.csv").write_text("user_id,item_id,timestamp\n")
    (found,) = scan_incoming(incoming)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("incoming_batches", [found.key])
        result = dg.materialize(
            [incoming_interactions],
            resources=ingest_resources(workspace),
            instance=instance,
            partition_key=found.key,
            raise_on_error=False,
        )
    assert not result.success
    assert step_failure(result).startswith(
        f"incoming/2021-07.csv has a header and no data rows: an empty batch '{found.key}' is most likely a "
        "failed export or copy. Nothing was written."
    )
    assert _tables(workspace) == before


@pytest.mark.parametrize("value", ["yes", "1", "TRUE"])
def test_allow_shrinking_defaults_from_the_environment(workspace, monkeypatch, value):
    monkeypatch.setenv("VISREC_ALLOW_SHRINKING", value)
    assert VisrecSettings(data_dir=str(workspace.data_dir), dataset=workspace.dataset).allow_shrinking
