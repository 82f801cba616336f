"""Each data-quality check passes on built tables and fails on tables broken the way it guards against."""

from __future__ import annotations

import duckdb
import pytest

from visrec_pipeline.ingest import build_catalog, build_interactions, build_split, ingest_batch
from visrec_pipeline.ingest.checks import catalog_checks, interactions_checks, rejected_rows_check, split_checks


@pytest.fixture
def conn(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user_id,item_id,timestamp\n1,10,1\n1,11,2\n1,12,3\n2,10,1\n2,12,2\n3,11,5\n")
    with duckdb.connect(str(tmp_path / "t.duckdb")) as c:
        ingest_batch(c, "initial", path)
        build_interactions(c)
        build_catalog(c, None)
        build_split(c)
        yield c


def by_name(outcomes) -> dict:
    return {o.check.name: o for o in outcomes}


def test_all_checks_pass_on_built_tables(conn):
    outcomes = interactions_checks(conn) + catalog_checks(conn) + split_checks(conn, 2 / 3)
    assert all(o.passed for o in outcomes), [o for o in outcomes if not o.passed]


def test_duplicate_pair_and_negative_id_fail(conn):
    conn.execute("INSERT INTO interactions VALUES (1, 10, 9, NULL), (-1, 10, 1, NULL)")
    checks = by_name(interactions_checks(conn))
    assert not checks["no_duplicate_pairs"].passed
    assert checks["no_duplicate_pairs"].metadata == {"duplicate_pairs": 1, "examples (user:item)": "1:10"}
    assert not checks["ids_non_negative"].passed
    assert checks["ids_non_negative"].metadata["bad_user_ids"] == 1


def test_item_missing_from_catalog_fails(conn):
    conn.execute("DELETE FROM item_catalog WHERE item_id = 12")
    (check,) = catalog_checks(conn)
    assert not check.passed and check.metadata == {"missing_items": 1, "examples": "12"}


def test_empty_profile_overlap_and_lost_rows_fail(conn):
    conn.execute("UPDATE split_holdout SET profile = [] WHERE user_id = 2")
    conn.execute("UPDATE split_holdout SET predict = [10, 11] WHERE user_id = 1")
    conn.execute("DELETE FROM split_train WHERE user_id = 3")
    checks = by_name(split_checks(conn, 0.2))
    assert not checks["holdout_rows_nonempty"].passed
    assert checks["holdout_rows_nonempty"].metadata["empty_profiles"] == 1
    assert not checks["predict_disjoint_from_profile"].passed
    assert checks["predict_disjoint_from_profile"].metadata["example users"] == "1"
    union = checks["train_and_holdout_equal_interactions"]
    assert not union.passed
    # missing: (1, 12) no longer predicted, (3, 11) deleted; extra: (1, 10) and (1, 11) both in
    # train and predict; user 2's profile no longer matches the training rows
    assert union.metadata == {"missing_pairs": 2, "extra_pairs": 2, "wrong_profiles": 1}
    share = checks["holdout_user_share"]
    assert not share.passed and share.check.severity == "WARN"


def test_rejected_rows_warning():
    assert rejected_rows_check(0).passed
    outcome = rejected_rows_check(3)
    assert not outcome.passed and outcome.check.severity == "WARN"
