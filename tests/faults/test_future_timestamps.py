"""Issue 14, case 8: timestamps later than now plus a tolerance are malformed values, with line and column.

Through ``dagster.materialize`` of the ingest assets (CSV and Parquet) and of an incoming batch.
"""

from __future__ import annotations

import time

import dagster as dg
import pandas as pd
import pytest

from ingest_runs import ingest_resources, step_failure
from visrec_pipeline import db
from visrec_pipeline.defs.incoming import incoming_interactions
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import VisrecSettings
from visrec_pipeline.ingest import InputFileError, read_interactions
from visrec_pipeline.ingest.incoming import scan_incoming
from visrec_pipeline.paths import Workspace

YEAR_3000 = "3000-01-01T00:00:00Z"  # the last instant the year-3000 rule (milliseconds by mistake) lets through


def _raw_rows(ws: Workspace) -> int:
    with db.connect(ws.db_path, read_only=True) as conn:
        return conn.execute("SELECT count(*) FROM raw_interactions").fetchone()[0]


def test_a_csv_row_in_the_year_3000_is_refused_with_line_and_column(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, f"user_id,item_id,timestamp\n1,10,100\n1,11,200\n2,10,{YEAR_3000}\n")
    result = dg.materialize(INGEST_ASSETS, resources=ingest_resources(workspace), raise_on_error=False)
    assert result.get_failed_step_keys() == {"raw_interactions"}
    first = step_failure(result).splitlines()[0]
    assert first.startswith(
        f"interactions.csv line 4, column 'timestamp': '{YEAR_3000}' is in the future: later than "
    )
    assert first.endswith("(now plus the future_tolerance_hours setting)")


def test_a_parquet_row_in_the_future_is_refused_with_its_row_index(workspace, make_dataset):
    df = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10]}).assign(
        timestamp=pd.to_datetime(["2021-05-01", "2999-12-31", "2021-05-02"], utc=True)
    )
    make_dataset(workspace.dataset_dir, df, fmt="parquet")
    result = dg.materialize(INGEST_ASSETS, resources=ingest_resources(workspace), raise_on_error=False)
    assert result.get_failed_step_keys() == {"raw_interactions"}
    assert step_failure(result).splitlines()[0].startswith(
        "interactions.parquet row index 1, column 'timestamp': '2999-12-31 00:00:00+00:00' is in the future"
    )


def test_an_incoming_batch_with_a_future_row_is_rejected_whole(workspace, make_dataset):
    make_dataset(workspace.dataset_dir, [{"user_id": 1, "item_id": 10, "timestamp": 100}])
    assert dg.materialize(INGEST_ASSETS[:1], resources=ingest_resources(workspace)).success
    workspace.incoming_dir.mkdir()
    soon = int(time.time()) + 3 * 3600
    (workspace.incoming_dir / "2021-07.csv").write_text(f"user_id,item_id,timestamp\n2,11,300\n3,12,{soon}\n")
    (found,) = scan_incoming(workspace.incoming_dir)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("incoming_batches", [found.key])

        def ingest(**settings):
            return dg.materialize(
                [incoming_interactions],
                resources=ingest_resources(workspace, **settings),
                instance=instance,
                partition_key=found.key,
                raise_on_error=False,
            )

        refused = ingest(future_tolerance_hours=1)
        lines = step_failure(refused).splitlines()
        assert lines[0] == "batch incoming/2021-07.csv rejected whole, nothing written (earlier batches are untouched):"
        assert lines[1].startswith(f"incoming/2021-07.csv line 3, column 'timestamp': '{soon}' is in the future")
        assert _raw_rows(workspace) == 1
        # three hours ahead is within the default tolerance of a day
        assert ingest().success
    assert _raw_rows(workspace) == 3


def test_the_tolerance_is_a_setting_and_none_turns_it_off(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_text(f"user_id,item_id,timestamp\n1,10,{int(time.time()) + 7200}\n")
    assert read_interactions(path).n_rows == 1  # two hours ahead: within a day
    with pytest.raises(InputFileError, match="line 2, column 'timestamp'.* is in the future"):
        read_interactions(path, future_tolerance_s=3600)
    path.write_text(f"user_id,item_id,timestamp\n1,10,{YEAR_3000}\n")
    assert read_interactions(path, future_tolerance_s=None).n_rows == 1
    monkeypatch.setenv("VISREC_FUTURE_TOLERANCE_HOURS", "2.5")
    assert VisrecSettings(data_dir=str(tmp_path), dataset=str(tmp_path)).future_tolerance_s == 9000
