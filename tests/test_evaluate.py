"""evaluate(), holdout_batches() and top_k() on small holdouts built in the test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from visrec_pipeline.recsys.data import Holdout, RecData
from visrec_pipeline.recsys.evaluate import TUTORIAL_PROFILE_LEN, EvalResult, evaluate, holdout_batches, top_k
from visrec_pipeline.recsys.metrics import reference_row_metrics


def make_holdout(profiles, predicts, n_items, user_ids=None, user_idx=None):
    """Each profile lists its items oldest first."""
    m = len(profiles)
    user_idx = np.arange(m, dtype=np.int64) if user_idx is None else user_idx
    return Holdout.from_lists(user_idx, profiles, predicts, n_items, user_ids)


def matrix_score_fn(scores: np.ndarray, calls: list | None = None):
    table = torch.from_numpy(scores)

    def score(batch):
        if calls is not None:
            calls.append(batch)
        return table[batch.user_idx]

    return score


def random_holdout(seed, m=50, n_items=400):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.standard_normal((m, n_items)), 1).astype(np.float32)
    scores[3] = 1.0
    profiles = [rng.choice(n_items, rng.integers(0, 60), replace=False) for _ in range(m)]
    predicts = [rng.choice(np.setdiff1d(np.arange(n_items), p), rng.integers(1, 6), replace=False) for p in profiles]
    return scores, profiles, predicts


# --- a tiny holdout with hand-computed figures ---------------------------------------------------
# 6 items; three users (ids 10, 11, 12)
SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.5, 0.3, 0.7],  # u10: profile {0}; ranking 5, 2, 3, 4, 1; predict {3} -> rank 2
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # u11: profile {1}; ranking 0, 2, 3, 4, 5; predict {0, 3} -> ranks 0, 2
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # u12: no profile; ranking 5, 4, 3, 2, 1, 0; predict {5} -> rank 0
    ],
    dtype=np.float32,
)
PROFILES = [[0], [1], []]
PREDICTS = [[3], [0, 3], [5]]


def tiny():
    return make_holdout(PROFILES, PREDICTS, 6, user_ids=[10, 11, 12])


def test_per_row_columns_and_hand_computed_values():
    result = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=(1, 3))
    assert isinstance(result, EvalResult) and result.protocol == "standard" and result.ks == (1, 3)
    rows = result.per_row
    assert list(rows.columns) == [
        "row", "user_id", "profile_size", "n_relevant", "n_candidates",
        "auc", "rr", "recall@1", "precision@1", "ndcg@1", "recall@3", "precision@3", "ndcg@3",
    ]  # fmt: skip
    assert rows["row"].tolist() == [0, 1, 2] and rows["user_id"].tolist() == [10, 11, 12]
    assert rows["profile_size"].tolist() == [1, 1, 0]
    assert rows["n_relevant"].tolist() == [1, 2, 1]
    assert rows["n_candidates"].tolist() == [5, 5, 6]
    # u10: AUC 2/4 (below: 4, 1); u11: below item 0 -> {2, 4, 5} = 3, below item 3 -> {4, 5} = 2,
    # (3 + 2) / (2 * 3) = 5/6; u12: top of 6, AUC 1
    assert rows["auc"].tolist() == pytest.approx([0.5, 5 / 6, 1.0])
    assert rows["rr"].tolist() == pytest.approx([1 / 3, 1.0, 1.0])
    assert rows["recall@1"].tolist() == [0.0, 0.5, 1.0]
    assert rows["precision@3"].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    # u11 nDCG@3: (1 + 1/log2 4) / (1 + 1/log2 3)
    assert rows["ndcg@3"].tolist() == pytest.approx([0.5, 1.5 / (1 + 1 / math.log2(3)), 1.0])
    assert result.means["auc"] == pytest.approx((0.5 + 5 / 6 + 1.0) / 3)
    assert result.n_rows == 3 and result.n_cold_rows is None and result.means_cold is None
    md = result.table_markdown()
    assert "standard" in md and "| AUC | RR | R@1 | P@1 | nDCG@1 | R@3 |" in md


def test_tutorial_protocol_named_and_hand_computed():
    result = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=(1, 3), protocol="tutorial")
    assert result.protocol == "tutorial" and "tutorial" in result.table_markdown()
    # u10: auc_exact([2], 6) = ((6 - 3) - 0) / (6 - 1) = 3/5
    # u11: auc_exact([0, 2], 6) = (((6-1)-(2-1)) + ((6-3)-0)) / (6-2) / 2 = (4 + 3) / 8 = 7/8
    # u12: no profile -> same as standard: ((6 - 1) - 0) / 5 = 1
    assert result.per_row["auc"].tolist() == pytest.approx([0.6, 7 / 8, 1.0])
    # u11 nDCG@1 one hit of two relevant: tutorial 1/IDCG(1) = 1 (standard also 1: min(2,1) = 1)
    # u11 nDCG@3: two hits -> same as standard
    assert result.per_row["ndcg@3"].tolist() == pytest.approx([0.5, 1.5 / (1 + 1 / math.log2(3)), 1.0])


def test_ks_empty_is_auc_and_rr_only():
    result = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=())
    ids = ("row", "user_id", "profile_size", "n_relevant", "n_candidates")
    assert [c for c in result.per_row.columns if c not in ids] == ["auc", "rr"]
    assert set(result.means) == {"auc", "rr"}


def test_cold_breakdown():
    # item 5 never seen in training: only u12's predict holds it
    result = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=(3,), cold_items=np.array([5]))
    assert result.per_row["has_cold"].tolist() == [False, False, True]
    assert result.n_cold_rows == 1
    assert result.means["cold:auc"] == pytest.approx(1.0)
    assert result.means["warm:auc"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert result.means_cold["auc"] == pytest.approx(1.0)
    assert result.means_warm["recall@3"] == pytest.approx(1.0)
    assert result.means["auc"] == pytest.approx((0.5 + 5 / 6 + 1.0) / 3)
    assert "with cold items" in result.table_markdown()
    # no cold row at all: the cold group's means are NaN, never a crash
    none = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=(3,), cold_items=np.array([], np.int64))
    assert none.n_cold_rows == 0 and math.isnan(none.means["cold:auc"])


@pytest.mark.parametrize("protocol", ["standard", "tutorial"])
def test_matches_reference_and_is_invariant_to_batch_and_chunk_size(protocol):
    ks = (1, 10, 50)
    scores, profiles, predicts = random_holdout(3)
    holdout = make_holdout(profiles, predicts, scores.shape[1])
    # the tutorial scores and excludes each user's last TUTORIAL_PROFILE_LEN profile items only
    shown = [p[-TUTORIAL_PROFILE_LEN:] if protocol == "tutorial" else p for p in profiles]
    want = pd.DataFrame(
        [
            reference_row_metrics(scores[u], shown[u], predicts[u], ks=ks, protocol=protocol)
            for u in range(len(scores))
        ]
    )
    results = [
        evaluate(
            matrix_score_fn(scores), holdout, scores.shape[1], ks=ks, protocol=protocol, batch_size=bs, item_chunk=ch
        )
        for bs, ch in ((1, 3), (7, 50), (256, 32768))
    ]
    for result in results:
        np.testing.assert_allclose(result.per_row[want.columns].to_numpy(), want.to_numpy(), rtol=0, atol=1e-12)
    pd.testing.assert_frame_equal(results[0].per_row, results[2].per_row)
    pd.testing.assert_frame_equal(results[1].per_row, results[2].per_row)


def test_max_users_samples_rows_with_a_seed():
    scores, profiles, predicts = random_holdout(4, m=30)
    holdout = make_holdout(profiles, predicts, scores.shape[1])
    fn = matrix_score_fn(scores)
    a = evaluate(fn, holdout, scores.shape[1], ks=(), max_users=10, seed=1)
    b = evaluate(fn, holdout, scores.shape[1], ks=(), max_users=10, seed=1)
    c = evaluate(fn, holdout, scores.shape[1], ks=(), max_users=10, seed=2)
    assert len(a.per_row) == 10 and a.per_row["row"].is_monotonic_increasing
    assert a.per_row["row"].tolist() == b.per_row["row"].tolist() != c.per_row["row"].tolist()
    full = evaluate(fn, holdout, scores.shape[1], ks=()).per_row.set_index("row")
    assert a.per_row.set_index("row")["auc"].equals(full.loc[a.per_row["row"], "auc"])
    assert len(evaluate(fn, holdout, scores.shape[1], ks=(), max_users=500).per_row) == 30


def test_score_fn_receives_profiles_and_rows_grouped_by_relevant_count():
    calls = []
    holdout = tiny()
    evaluate(matrix_score_fn(SCORES, calls), holdout, 6, ks=(1,), batch_size=2)
    seen = torch.cat([c.user_idx for c in calls]).tolist()
    assert sorted(seen) == [0, 1, 2] and seen[-1] == 1  # the two-item row comes last
    for c in calls:
        for u, items, mask in zip(c.user_idx.tolist(), c.profile_items, c.profile_mask):
            assert sorted(items[mask].tolist()) == sorted(PROFILES[u])


def test_holdout_batches_profile_truncation_and_unknown_users():
    holdout = make_holdout([[1, 2, 3, 4], [5]], [[0], [0]], 8, user_idx=[-1, 4])
    batches = list(holdout_batches(holdout, 1, max_profile_len=2))
    assert [rows.tolist() for rows, _ in batches] == [[0], [1]]
    first = batches[0][1]
    assert first.user_idx.tolist() == [-1]
    assert first.profile_items[first.profile_mask].tolist() == [3, 4]  # the last two
    rows, batch = next(holdout_batches(holdout, 5, rows=np.array([1, 0])))
    assert rows.tolist() == [1, 0] and batch.user_idx.tolist() == [4, -1]


def test_profile_is_excluded_even_when_the_model_is_shown_a_truncated_profile():
    full = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=(3,))
    cut = evaluate(matrix_score_fn(SCORES), tiny(), 6, ks=(3,), max_profile_len=1)
    pd.testing.assert_frame_equal(full.per_row, cut.per_row)


@pytest.mark.parametrize(
    "score_fn, message",
    [
        (lambda b: torch.full((len(b.user_idx), 6), float("nan")), "NaN"),
        (lambda b: torch.zeros((len(b.user_idx), 5)), "shape"),
        (lambda b: np.zeros((len(b.user_idx), 6)), "torch.Tensor"),
    ],
)
def test_bad_scores_raise_clear_errors(score_fn, message):
    with pytest.raises((ValueError, TypeError), match=message):
        evaluate(score_fn, tiny(), 6)


def test_nan_error_names_the_user():
    scores = SCORES.copy()
    scores[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"user_id \[11\]"):
        evaluate(matrix_score_fn(scores), tiny(), 6)


def test_inf_scores_are_not_mistaken_for_nan():
    scores = SCORES.copy()
    scores[0, 1] = np.inf
    scores[0, 4] = -np.inf
    result = evaluate(matrix_score_fn(scores), tiny(), 6, ks=(3,))
    # u10: candidates 1 (+inf), 5, 2, 3, 4 (-inf): item 3 at rank 3; below it {4}: AUC 1/4
    assert result.per_row["auc"].tolist()[0] == pytest.approx(0.25)


def test_bad_holdouts_raise():
    fn = matrix_score_fn(SCORES)
    with pytest.raises(ValueError, match="nothing to predict"):
        evaluate(fn, make_holdout([[0], [1]], [[2], []], 6, user_ids=[10, 11]), 6)
    with pytest.raises(ValueError, match="item columns"):
        evaluate(fn, tiny(), 7)
    with pytest.raises(ValueError, match="no rows"):
        evaluate(fn, make_holdout([], [], 6), 6)
    with pytest.raises(ValueError, match="cold_items"):
        evaluate(fn, tiny(), 6, cold_items=np.array([6]))
    with pytest.raises(ValueError, match="protocol"):
        evaluate(fn, tiny(), 6, protocol="paper")
    with pytest.raises(ValueError, match="max_users"):
        evaluate(fn, tiny(), 6, max_users=0)


# --- top_k ------------------------------------------------------------------------------------------


def reference_top_k(scores, profile, k):
    s = scores.astype(np.float64)
    candidates = np.setdiff1d(np.arange(s.size), profile)
    return candidates[np.argsort(-s[candidates], kind="stable")][:k]


def test_top_k_hand_computed_ties_and_profile_exclusion():
    items, scores = top_k(matrix_score_fn(SCORES), tiny(), 6, 3)
    # u10: 5 (.7), 2 (.5), 3 (.5) ; u11 all tied: 0, 2, 3 ; u12: 5, 4, 3
    assert items.tolist() == [[5, 2, 3], [0, 2, 3], [5, 4, 3]]
    assert scores[0].tolist() == pytest.approx([0.7, 0.5, 0.5])
    assert scores.dtype == np.float64 and items.dtype == np.int64
    keep, _ = top_k(matrix_score_fn(SCORES), tiny(), 6, 2, exclude_profile=False)
    assert keep.tolist() == [[0, 5], [0, 1], [5, 4]]


def test_top_k_pads_rows_with_fewer_candidates():
    holdout = make_holdout([[0, 1, 2, 3], []], [[4], [0]], 6)
    items, scores = top_k(matrix_score_fn(SCORES[:2]), holdout, 6, 4)
    assert items.tolist() == [[5, 4, -1, -1], [0, 1, 2, 3]]
    assert np.isnan(scores[0, 2:]).all() and not np.isnan(scores[1]).any()


def test_top_k_with_infinite_scores_keeps_order_and_excludes_profile():
    s = np.array([[-np.inf, -np.inf, 1.0, -np.inf, np.inf]], np.float32)
    holdout = make_holdout([[1]], [[0]], 5)
    items, scores = top_k(matrix_score_fn(s), holdout, 5, 5)
    assert items.tolist() == [[4, 2, 0, 3, -1]]
    assert scores[0, :4].tolist() == [np.inf, 1.0, -np.inf, -np.inf]


def test_top_k_matches_stable_argsort_on_tied_random_data():
    scores, profiles, predicts = random_holdout(9, m=40, n_items=300)
    scores = np.round(scores, 0)  # heavy ties
    holdout = make_holdout(profiles, predicts, scores.shape[1])
    for k, bs in ((1, 256), (25, 7), (300, 16)):
        items, vals = top_k(matrix_score_fn(scores), holdout, scores.shape[1], k, batch_size=bs)
        for u in range(len(scores)):
            want = reference_top_k(scores[u], profiles[u], k)
            got = items[u][items[u] >= 0]
            assert got.tolist() == want.tolist(), (k, u)
            assert vals[u, : got.size].tolist() == scores[u, want].astype(np.float64).tolist()


def test_top_k_over_training_users_of_recdata():
    train = pd.DataFrame({"user_id": [7, 7, 9], "item_id": [100, 101, 102], "ts": [1, 2, 3]})
    data = RecData.from_frames(train, item_ids=[100, 101, 102, 103])
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    items, _ = top_k(matrix_score_fn(scores), data, 4, 2)
    assert items.tolist() == [[2, 3], [3, 1]]  # user 7 owns items 0, 1; user 9 owns item 2
    with pytest.raises(ValueError, match="k must be"):
        top_k(matrix_score_fn(scores), data, 4, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("protocol", ["standard", "tutorial"])
def test_cuda_evaluation_and_top_k_equal_the_cpu_ones(protocol):
    scores, profiles, predicts = random_holdout(12, m=70, n_items=5000)
    holdout = make_holdout(profiles, predicts, scores.shape[1])
    on_gpu = torch.from_numpy(scores).cuda()

    def gpu_fn(batch):
        assert batch.user_idx.is_cuda
        return on_gpu[batch.user_idx]

    cpu = evaluate(matrix_score_fn(scores), holdout, scores.shape[1], ks=(5, 50), protocol=protocol)
    gpu = evaluate(gpu_fn, holdout, scores.shape[1], ks=(5, 50), protocol=protocol, device="cuda", batch_size=16)
    pd.testing.assert_frame_equal(cpu.per_row, gpu.per_row)
    cpu_items, cpu_scores = top_k(matrix_score_fn(scores), holdout, scores.shape[1], 30)
    gpu_items, gpu_scores = top_k(gpu_fn, holdout, scores.shape[1], 30, device="cuda")
    np.testing.assert_array_equal(cpu_items, gpu_items)
    np.testing.assert_array_equal(cpu_scores, gpu_scores)
