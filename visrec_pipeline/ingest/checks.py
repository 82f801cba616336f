"""Data-quality checks of the ingest tables, as plain results (the Dagster layer wraps them).

Each check has a name, a description and a severity (``ERROR`` or ``WARN``),
declared in ``CHECKS`` so the asset layer can declare them before running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from visrec_pipeline.db import query_one

# Below this share of users with a holdout row the evaluation rests on few users.
MIN_HOLDOUT_USER_SHARE = 0.5


@dataclass(frozen=True)
class CheckDef:
    table: str  # the asset the check belongs to
    name: str
    description: str
    severity: str = "ERROR"


CHECKS = (
    CheckDef("raw_interactions", "no_rejected_rows", "No row of the input was quarantined as malformed.", "WARN"),
    CheckDef("interactions", "no_duplicate_pairs", "Each (user_id, item_id) pair occurs once."),
    CheckDef("interactions", "ids_non_negative", "User ids, item ids and timestamps are present and non-negative."),
    CheckDef("item_catalog", "interaction_items_in_catalog", "Every item of interactions is in item_catalog."),
    CheckDef("split", "holdout_rows_nonempty", "Every holdout user has a non-empty profile and a non-empty predict."),
    CheckDef("split", "predict_disjoint_from_profile", "No holdout item appears in that user's profile."),
    CheckDef(
        "split",
        "train_and_holdout_equal_interactions",
        "split_train plus every predict list is exactly interactions, and each profile is that user's training items.",
    ),
    CheckDef(
        "split",
        "holdout_user_share",
        f"At least {MIN_HOLDOUT_USER_SHARE:.0%} of the users have holdout rows.",
        "WARN",
    ),
)


def checks_for(table: str) -> list[CheckDef]:
    return [c for c in CHECKS if c.table == table]


def _def(name: str) -> CheckDef:
    return next(c for c in CHECKS if c.name == name)


@dataclass(frozen=True)
class CheckOutcome:
    check: CheckDef
    passed: bool
    metadata: dict = field(default_factory=dict)


def rejected_rows_check(n_rejected_rows: int) -> CheckOutcome:
    return CheckOutcome(_def("no_rejected_rows"), n_rejected_rows == 0, {"rejected_rows": n_rejected_rows})


def interactions_checks(conn: duckdb.DuckDBPyConnection) -> list[CheckOutcome]:
    dup = query_one(conn, "interactions_check_duplicates")
    ids = query_one(conn, "interactions_check_ids")
    return [
        CheckOutcome(
            _def("no_duplicate_pairs"),
            dup["duplicate_pairs"] == 0,
            {"duplicate_pairs": int(dup["duplicate_pairs"]), "examples (user:item)": ", ".join(dup["examples"])},
        ),
        CheckOutcome(_def("ids_non_negative"), not any(ids.values()), {k: int(v) for k, v in ids.items()}),
    ]


def catalog_checks(conn: duckdb.DuckDBPyConnection) -> list[CheckOutcome]:
    r = query_one(conn, "catalog_check_items")
    return [
        CheckOutcome(
            _def("interaction_items_in_catalog"),
            r["missing_items"] == 0,
            {"missing_items": int(r["missing_items"]), "examples": ", ".join(map(str, r["examples"]))},
        )
    ]


def split_checks(conn: duckdb.DuckDBPyConnection, share_users_with_holdout: float) -> list[CheckOutcome]:
    nonempty = query_one(conn, "split_check_nonempty")
    disjoint = query_one(conn, "split_check_disjoint")
    union = query_one(conn, "split_check_union")
    return [
        CheckOutcome(
            _def("holdout_rows_nonempty"),
            nonempty["empty_profiles"] == 0 and nonempty["empty_predicts"] == 0,
            {
                "empty_profiles": int(nonempty["empty_profiles"]),
                "empty_predicts": int(nonempty["empty_predicts"]),
                "example users": ", ".join(map(str, nonempty["examples"])),
            },
        ),
        CheckOutcome(
            _def("predict_disjoint_from_profile"),
            disjoint["overlapping_users"] == 0,
            {
                "overlapping_users": int(disjoint["overlapping_users"]),
                "example users": ", ".join(map(str, disjoint["examples"])),
            },
        ),
        CheckOutcome(
            _def("train_and_holdout_equal_interactions"),
            not any(union.values()),
            {k: int(v) for k, v in union.items()},
        ),
        CheckOutcome(
            _def("holdout_user_share"),
            share_users_with_holdout >= MIN_HOLDOUT_USER_SHARE,
            {"share_users_with_holdout": float(share_users_with_holdout), "minimum": MIN_HOLDOUT_USER_SHARE},
        ),
    ]
