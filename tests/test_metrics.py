"""Hand-computed checks of every metric, ties, chunking, and the vectorised path vs the per-row oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.metrics import (
    _count_np,
    ideal_dcg,
    metrics_from_ranks,
    rank_metrics,
    reference_row_metrics,
    relevant_ranks,
)

INF = math.inf
L2_3 = math.log2(3)  # 1.5849625...


def one_row(scores, profile, predict, *, ks=(1, 2, 3, 10), protocol="standard", item_chunk=32768, backend="auto"):
    """rank_metrics for a single row given as plain lists; returns floats (and the ranks)."""
    s = torch.tensor([scores], dtype=torch.float32)
    rel = torch.tensor([list(predict)], dtype=torch.long).reshape(1, -1)
    ex = torch.tensor([list(profile)], dtype=torch.long).reshape(1, -1)
    out = rank_metrics(
        s,
        rel,
        torch.ones_like(rel, dtype=torch.bool),
        ex,
        torch.ones_like(ex, dtype=torch.bool),
        ks=ks,
        protocol=protocol,
        item_chunk=item_chunk,
        backend=backend,
    )
    ranks, _ = relevant_ranks(
        s,
        rel,
        torch.ones_like(rel, dtype=torch.bool),
        ex,
        torch.ones_like(ex, dtype=torch.bool),
        item_chunk=item_chunk,
        backend=backend,
    )
    return {k: float(v[0]) for k, v in out.items()}, ranks[0].tolist()


BACKENDS = ["numpy", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("item_chunk", [1, 2, 32768])
def test_tie_between_relevant_and_non_relevant_is_broken_by_index_both_ways(item_chunk, backend):
    scores = [0.9, 0.1, 0.5, 0.5, 0.3, 0.7]
    # profile {0} is removed; candidates by score, ties by index: 5 (.7), 2 (.5), 3 (.5), 4 (.3), 1 (.1)
    m, ranks = one_row(scores, [0], [3], item_chunk=item_chunk, backend=backend)
    # item 3 ties with item 2 and loses (2 < 3): rank 2
    assert ranks == [2]
    # C = 5, n = 1; non-relevant candidates below item 3: {4, 1} -> AUC = 2 / (5 - 1) = 0.5
    assert m["auc"] == pytest.approx(0.5)
    assert m["rr"] == pytest.approx(1 / 3)
    assert m["recall@1"] == 0 and m["recall@2"] == 0 and m["recall@3"] == 1
    assert m["precision@3"] == pytest.approx(1 / 3) and m["precision@10"] == pytest.approx(0.1)
    # DCG@3 = 1/log2(2 + 2) = 0.5, IDCG over min(1, 3) = 1 item = 1
    assert m["ndcg@3"] == pytest.approx(0.5) and m["ndcg@2"] == 0
    assert m["n_candidates"] == 5

    m, ranks = one_row(scores, [0], [2], item_chunk=item_chunk, backend=backend)
    # item 2 ties with item 3 and wins (2 < 3): rank 1; below it {3, 4, 1} -> AUC = 3/4
    assert ranks == [1]
    assert m["auc"] == pytest.approx(0.75)
    assert m["rr"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx(1 / L2_3)  # DCG = 1/log2(1 + 2), IDCG = 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("item_chunk", [1, 3, 32768])
def test_equal_scores_everywhere_rank_by_index_with_several_relevant(item_chunk, backend):
    # all scores equal: the candidate ranking is the index order; profile {1} removed
    # candidates 0, 2, 3, 4 -> ranks 0, 1, 2, 3; relevant {0, 3} at ranks 0 and 2
    m, ranks = one_row([0.0] * 5, [1], [0, 3], item_chunk=item_chunk, backend=backend)
    assert ranks == [0, 2]
    # non-relevant candidates {2, 4}: below item 0 -> 2, below item 3 -> 1: AUC = 3 / (2 * 2)
    assert m["auc"] == pytest.approx(0.75)
    assert m["rr"] == 1.0
    assert m["recall@1"] == 0.5 and m["precision@1"] == 1.0
    assert m["ndcg@1"] == 1.0  # DCG = 1, IDCG over min(2, 1) = 1 item = 1
    assert m["recall@2"] == 0.5 and m["precision@2"] == 0.5
    # DCG@2 = 1 (rank 0 only); IDCG@2 = 1 + 1/log2(3) = 1.63093
    assert m["ndcg@2"] == pytest.approx(1 / (1 + 1 / L2_3))
    assert m["recall@3"] == 1.0 and m["precision@3"] == pytest.approx(2 / 3)
    # DCG@3 = 1 + 1/log2(2 + 2) = 1.5; IDCG@3 over min(2, 3) = 2 items = 1.63093
    assert m["ndcg@3"] == pytest.approx(1.5 / (1 + 1 / L2_3))


def test_tutorial_protocol_same_case_hand_computed():
    # same row as above, tutorial arithmetic: n_items = 5, n = 2, sorted candidate positions [0, 2]
    m, _ = one_row([0.0] * 5, [1], [0, 3], protocol="tutorial")
    # auc_exact: t=1: (5 - 1) - (2 - 1) = 3; t=2: (5 - 3) - (2 - 2) = 2; (3 + 2) / (5 - 2) / 2 = 5/6
    assert m["auc"] == pytest.approx(5 / 6)
    # nDCG normalised by the ideal DCG of the hits in the top k:
    # k=2: one hit (rank 0): DCG 1 / IDCG(1) = 1 -> 1.0 (standard gives 0.61315)
    assert m["ndcg@2"] == 1.0
    # k=3: two hits: 1.5 / IDCG(2) = same as standard
    assert m["ndcg@3"] == pytest.approx(1.5 / (1 + 1 / L2_3))
    # RR, R@k, P@k are the same in both protocols
    assert m["rr"] == 1.0 and m["recall@2"] == 0.5 and m["precision@3"] == pytest.approx(2 / 3)


def test_tutorial_ndcg_is_zero_without_hits_and_auc_counts_profile_below():
    # profile {0}; candidates 3 (.3), 2 (.2), 1 (.1); relevant {1} at rank 2 (k = 10 > 3 candidates)
    scores = [0.0, 0.1, 0.2, 0.3]
    m, ranks = one_row(scores, [0], [1], ks=(1, 10))
    assert ranks == [2]
    assert m["auc"] == 0.0  # nothing non-relevant below it among C - n = 2
    assert m["recall@10"] == 1.0 and m["precision@10"] == pytest.approx(0.1)  # P@k divides by k
    assert m["ndcg@10"] == pytest.approx(0.5)  # 1/log2(4) / IDCG(1) = 0.5
    assert m["ndcg@1"] == 0.0
    t, _ = one_row(scores, [0], [1], ks=(1, 10), protocol="tutorial")
    # auc_exact(pos=[2], 4): ((4 - 3) - (1 - 1)) / (4 - 1) / 1 = 1/3: the profile item counts as below
    assert t["auc"] == pytest.approx(1 / 3)
    assert t["ndcg@1"] == 0.0  # no hit in the top 1
    assert t["ndcg@10"] == pytest.approx(0.5)  # one hit: DCG 0.5 / IDCG(1) = 1


def test_empty_profile_both_protocols_agree():
    # scores descending by index; relevant {1} at rank 1; below it {2, 3}: AUC = 2/3 in both
    for protocol in ("standard", "tutorial"):
        m, ranks = one_row([0.4, 0.3, 0.2, 0.1], [], [1], protocol=protocol)
        assert ranks == [1]
        assert m["auc"] == pytest.approx(2 / 3)
        assert m["rr"] == 0.5
        assert m["n_candidates"] == 4


def test_all_candidates_relevant_gives_auc_one():
    # C == n: profile {0, 1}, relevant {2, 3}
    m, _ = one_row([0.1, 0.2, 0.3, 0.4], [0, 1], [2, 3])
    assert m["auc"] == 1.0
    # tutorial: positions [0, 1] of 4 items: ((4-1)-(2-1)) + ((4-2)-0) = 4; 4 / (4-2) / 2 = 1
    t, _ = one_row([0.1, 0.2, 0.3, 0.4], [0, 1], [2, 3], protocol="tutorial")
    assert t["auc"] == 1.0
    # no profile, every item relevant (n_items == n): 1 by definition in both
    for protocol in ("standard", "tutorial"):
        m, _ = one_row([0.5, 0.5, 0.1], [], [0, 1, 2], protocol=protocol)
        assert m["auc"] == 1.0 and m["recall@3"] == 1.0 and m["ndcg@3"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("item_chunk", [1, 2, 4, 32768])
def test_infinite_scores_and_profile_items_tied_with_candidates(item_chunk, backend):
    # profile {1} also scores -inf: it must not take a place among the -inf candidates
    scores = [-INF, -INF, 1.0, -INF, -INF, INF]
    # candidates: 5 (+inf), 2 (1.0), then -inf by index: 0, 3, 4
    m, ranks = one_row(scores, [1], [3, 5], item_chunk=item_chunk, backend=backend)
    assert ranks == [3, 0]
    # non-relevant {2, 0, 4}: below item 3 -> {4} = 1; below item 5 -> 3; AUC = 4 / (2 * 3)
    assert m["auc"] == pytest.approx(4 / 6)
    m, ranks = one_row(scores, [1, 5], [0], item_chunk=item_chunk, backend=backend)
    assert ranks == [1]  # only item 2 is above item 0


def test_predict_item_also_in_profile_stays_a_candidate():
    # a malformed holdout lists item 2 in both; it is ranked, only item 0 is removed: C = 3
    m, ranks = one_row([0.9, 0.1, 0.5, 0.3], [0, 2], [2])
    assert ranks == [0] and m["n_candidates"] == 3 and m["auc"] == 1.0


def test_ideal_dcg_table():
    idcg = ideal_dcg(3)
    assert idcg.tolist() == pytest.approx([0.0, 1.0, 1 + 1 / L2_3, 1 + 1 / L2_3 + 0.5])


def test_padding_slots_are_ignored_and_rows_are_independent():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    rel = torch.tensor([[0, 99], [0, 1]]).clamp(max=3)
    rel_mask = torch.tensor([[True, False], [True, True]])
    ex = torch.zeros((2, 0), dtype=torch.long)
    out = rank_metrics(scores, rel, rel_mask, ex, torch.zeros((2, 0), dtype=torch.bool), ks=(2,))
    # row 0: item 0 is last of 4 -> rank 3, AUC 0; row 1: items 0, 1 at ranks 0, 1 -> AUC 1, R@2 1
    assert out["auc"].tolist() == [0.0, 1.0]
    assert out["recall@2"].tolist() == [0.0, 1.0]
    assert out["rr"].tolist() == pytest.approx([0.25, 1.0])


def test_row_without_relevant_items_is_nan():
    ranks = torch.zeros((1, 1), dtype=torch.long)
    out = metrics_from_ranks(ranks, torch.zeros((1, 1), dtype=torch.bool), torch.tensor([5]), 5, ks=(2,))
    assert all(math.isnan(float(v[0])) for v in out.values())


def test_ks_empty_gives_auc_and_rr_only():
    m, _ = one_row([0.3, 0.2, 0.1], [], [1], ks=())
    assert set(m) == {"auc", "rr", "n_candidates"}


@pytest.mark.parametrize(
    "bad", [{"ks": (0,)}, {"ks": (2.5,)}, {"protocol": "nope"}, {"item_chunk": 0}, {"backend": "cuda"}]
)
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        one_row([0.3, 0.2, 0.1], [], [1], **{"ks": (1,), **bad})


def random_case(seed, m=40, n_items=300, decimals=1):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.standard_normal((m, n_items)), decimals).astype(np.float32)
    scores[0] = 0.0  # a row of equal scores
    scores[1, ::4] = -np.inf
    scores[2, ::5] = np.inf
    profiles = [rng.choice(n_items, rng.integers(0, 40), replace=False) for _ in range(m)]
    predicts = [
        rng.choice(np.setdiff1d(np.arange(n_items), p), rng.integers(1, 7), replace=False) for p in profiles
    ]
    return scores, profiles, predicts


def batch_tensors(scores, profiles, predicts):
    def pad(lists):
        width = max(1, max(len(x) for x in lists))
        items = torch.zeros((len(lists), width), dtype=torch.long)
        mask = torch.zeros((len(lists), width), dtype=torch.bool)
        for r, x in enumerate(lists):
            items[r, : len(x)] = torch.as_tensor(np.asarray(x, np.int64))
            mask[r, : len(x)] = True
        return items, mask

    rel, rel_mask = pad(predicts)
    ex, ex_mask = pad(profiles)
    return torch.from_numpy(scores), rel, rel_mask, ex, ex_mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", ["standard", "tutorial"])
def test_vectorised_equals_per_row_argsort_reference_on_tied_random_data(protocol, backend):
    ks = (1, 5, 20, 100, 500)
    scores, profiles, predicts = random_case(7)
    tensors = batch_tensors(scores, profiles, predicts)
    expected = [
        reference_row_metrics(scores[u], profiles[u], predicts[u], ks=ks, protocol=protocol)
        for u in range(len(scores))
    ]
    for item_chunk in (3, 64, 32768):
        out = rank_metrics(*tensors, ks=ks, protocol=protocol, item_chunk=item_chunk, backend=backend)
        for name in expected[0]:
            got = out[name].numpy()
            want = np.array([e[name] for e in expected])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{name}, item_chunk={item_chunk}")


def test_chunking_and_backend_invariance_of_ranks_is_exact():
    scores, profiles, predicts = random_case(11, m=25, n_items=257, decimals=0)
    tensors = batch_tensors(scores, profiles, predicts)
    base, base_c = relevant_ranks(*tensors, item_chunk=10**6, backend="torch")
    for item_chunk, backend in [(c, b) for c in (1, 2, 3, 7, 8, 64, 256, 10**6) for b in BACKENDS]:
        ranks, c = relevant_ranks(*tensors, item_chunk=item_chunk, backend=backend)
        assert torch.equal(ranks[tensors[2]], base[tensors[2]]), (item_chunk, backend)
        assert torch.equal(c, base_c)


def test_float64_and_half_scores_rank_like_float32():
    scores, profiles, predicts = random_case(3, m=10, n_items=120)
    s, *rest = batch_tensors(scores, profiles, predicts)
    r32, _ = relevant_ranks(s, *rest, item_chunk=16)
    r64, _ = relevant_ranks(s.double(), *rest, item_chunk=16)
    # half scores are ranked as their (exact) float32 values
    r16, _ = relevant_ranks(s.half(), *rest, item_chunk=16)
    want16, _ = relevant_ranks(s.half().float(), *rest, item_chunk=16)
    mask = rest[1]
    assert torch.equal(r32[mask], r64[mask])
    assert torch.equal(r16[mask], want16[mask])


def test_large_catalogue_small_memory_matches_reference():
    # 100,000 items: chunked comparisons agree with the argsort oracle
    rng = np.random.default_rng(5)
    m, n_items = 6, 100_000
    scores = np.round(rng.random((m, n_items)), 3).astype(np.float32)
    profiles = [rng.choice(n_items, 150, replace=False) for _ in range(m)]
    predicts = [np.setdiff1d(rng.choice(n_items, 4, replace=False), p) for p in profiles]
    out = rank_metrics(*batch_tensors(scores, profiles, predicts), ks=(20, 100))
    for u in range(m):
        want = reference_row_metrics(scores[u], profiles[u], predicts[u], ks=(20, 100))
        for name, value in want.items():
            assert float(out[name][u]) == pytest.approx(value, abs=1e-12), (u, name)


@pytest.mark.parametrize("n", [1, 7, 8, 64, 2032, 2040, 2048, 5000])
def test_count_of_flags_is_exact_on_every_path(n):
    # all-true rows put 255 into every byte lane at n = 2040 (the fast path's limit)
    rng = np.random.default_rng(n)
    flags = rng.random((3, 2, n)) < 0.5
    flags[0, 0] = True
    flags[0, 1] = False
    got = _count_np(flags)
    assert got.tolist() == flags.sum(-1).tolist()
    assert _count_np(flags[:, :, : n // 2]).tolist() == flags[:, :, : n // 2].sum(-1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_zero_stay_exact_when_the_cpu_flushes_denormals(monkeypatch, backend):
    # with DAZ on, nextafter(0, -inf) would read as 0; the threshold falls back to -tiny_normal
    import visrec_pipeline.recsys.metrics as metrics

    monkeypatch.setattr(metrics, "_denormals_compare_exactly", lambda device=None: False)
    scores = [0.0, 0.0, 0.5, 0.0, -1.0, 0.0]
    # candidates: 2 (.5), then the zeros by index 0, 1, 3, 5, then 4 (-1): item 5 at rank 4
    for chunk in (1, 2, 32768):
        _, ranks = one_row(scores, [], [5, 3], item_chunk=chunk, backend=backend)
        assert ranks == [4, 3]
    assert metrics._ge_threshold(np.zeros(1, np.float32), np).tolist() == [-np.finfo(np.float32).tiny]

