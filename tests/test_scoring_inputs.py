"""Issue 13: the holdout comes from DuckDB as CSR arrays (no per-user Python objects), scoring reads only
the inputs it uses, and top_k's fast path agrees with the exact one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec_pipeline import db
from visrec_pipeline.model_io import load_rec_data
from visrec_pipeline.pipeline.trained import scoring_needs
from visrec_pipeline.recsys.data import Holdout, UnknownIdError
from visrec_pipeline.recsys.evaluate import _top_k_exact, top_k
from visrec_pipeline.recsys.registry import FEATURE_BACKBONE, MODEL_SPECS


def _split_tables(conn, holdout_rows):
    conn.execute("CREATE TABLE item_catalog AS SELECT range + 100 AS item_id FROM range(8)")
    conn.execute(
        "CREATE TABLE split_train AS SELECT * FROM (VALUES (1, 100, 5), (1, 103, 1), (2, 101, 2), (3, 107, 9)) "
        "t(user_id, item_id, ts)"
    )
    conn.execute("CREATE TABLE split_holdout (user_id BIGINT, profile BIGINT[], predict BIGINT[])")
    conn.executemany("INSERT INTO split_holdout VALUES (?, ?, ?)", holdout_rows)


def test_the_holdout_loaded_from_duckdb_equals_the_one_built_from_lists(tmp_path):
    rows = [(3, [107], [100, 102]), (1, [103, 100], [104]), (2, [101], [106]), (9, [], [105, 101])]
    with db.connect(tmp_path / "h.duckdb") as conn:
        _split_tables(conn, rows)
        data = load_rec_data(conn)
        frame = conn.execute("SELECT user_id, profile, predict FROM split_holdout ORDER BY user_id").df()
    want = data.make_holdout(frame)  # the per-row path
    got = data.holdout
    assert got.user_ids.tolist() == [1, 2, 3, 9] and got.user_idx.tolist() == [0, 1, 2, -1]
    for a, b in (
        (got.profile.indptr, want.profile.indptr),
        (got.profile.indices, want.profile.indices),
        (got.predict.indptr, want.predict.indptr),
        (got.predict.indices, want.predict.indices),
        (got.profile_rank, want.profile_rank),
    ):
        assert np.array_equal(a, b)
    # user 1's profile is 103 (oldest) then 100: the most recent one is item index 0
    assert got.recent_profile(1).row(0).tolist() == [0]


def test_a_holdout_naming_an_item_outside_the_catalogue_is_an_error(tmp_path):
    with db.connect(tmp_path / "h.duckdb") as conn:
        _split_tables(conn, [(1, [100], [999])])
        with pytest.raises(UnknownIdError, match="holdout items not in the catalogue.*999"):
            load_rec_data(conn)


def test_holdout_from_entries_keeps_the_later_position_of_a_repeated_item():
    h = Holdout.from_entries([0], [0, 0, 0], [3, 1, 3], [0, 1, 2], [0], [4], 5)
    assert h.profile.row(0).tolist() == [1, 3] and h.profile_rank.tolist() == [0, 1]
    with pytest.raises(ValueError, match="rows outside"):
        Holdout.from_entries([0], [1], [2], [0], [0], [4], 5)


def test_scoring_reads_no_triples_and_only_models_that_reattach_inputs_read_any():
    needs = {name: scoring_needs(name) for name in MODEL_SPECS}
    assert not any(n.startswith("triples") for ns in needs.values() for n in ns)
    assert needs["visrank"] == {f"features:{FEATURE_BACKBONE}"}  # VisRank scores from the feature store
    assert needs["curatornet"] == needs["bpr_mf"] == needs["vbpr"] == frozenset()  # all in the checkpoint


def test_top_k_fast_path_equals_the_exact_path_on_mixed_rows():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(50, 400, generator=gen)
    scores[:15] = torch.round(scores[:15])  # ties across the cut in some rows
    scores[15, :5] = torch.inf
    rng = np.random.default_rng(3)
    profiles = [rng.choice(400, size=int(rng.integers(0, 30)), replace=False) for _ in range(50)]
    holdout = Holdout.from_lists(np.arange(50), profiles, [[0]] * 50, 400)
    for k in (1, 10, 399):
        items, vals = top_k(lambda b: scores[b.user_idx], holdout, 400, k)  # user_idx is the row here
        want_items, want_vals = _top_k_exact(scores, holdout.profile, np.arange(50), k, True)
        assert np.array_equal(items[:, : want_items.shape[1]], want_items)
        valid = want_items >= 0
        assert np.array_equal(vals[:, : want_items.shape[1]][valid], want_vals[valid])
