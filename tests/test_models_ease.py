"""EASE: the closed form against a direct constrained solve, both forms, cold items, lambda selection,
the memory guard and the top-items variant."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.data import CSR, RecData
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.ease import EASE, EASEConfig, solve_bytes
from visrec_pipeline.recsys.synthetic import planted_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def random_data(n_users, n_items, density=0.3, seed=0, cold=()) -> RecData:
    rng = np.random.default_rng(seed)
    X = rng.random((n_users, n_items)) < density
    X[:, list(cold)] = False
    X[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    X[:, list(cold)] = False
    u, i = np.nonzero(X)
    frame = pd.DataFrame({"user_id": u + 100, "item_id": i + 1000, "ts": np.arange(u.size)})
    return RecData.from_frames(frame, np.arange(n_items) + 1000)


def direct_B(X: np.ndarray, lam: float) -> np.ndarray:
    """argmin ||X - XB||^2 + lam ||B||^2 s.t. diag(B) = 0, one column at a time: with b_jj fixed at 0,
    column j is a ridge regression of X_j on the other columns."""
    n = X.shape[1]
    G = X.T @ X
    B = np.zeros((n, n))
    for j in range(n):
        others = np.delete(np.arange(n), j)
        A = G[np.ix_(others, others)] + lam * np.eye(n - 1)
        B[others, j] = np.linalg.solve(A, G[others, j])
    return B


def all_users(data: RecData) -> ScoreBatch:
    items, mask = data.train.padded()
    return ScoreBatch(torch.arange(data.n_users), items, mask)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_closed_form_equals_direct_constrained_solve(form):
    data = random_data(25, 18, seed=1, cold=(4, 11))
    lam = 7.5
    model = EASE(EASEConfig(l2=lam, l2_grid=(), form=form, device="cpu"))
    hist = model.fit(data, FitInputs())
    assert hist.notes["form"] == form and hist.notes["active_items"] == 16
    X = data.train.to_dense(dtype=torch.float64).numpy()
    expected = X @ direct_B(X, lam)
    got = model.score(all_users(data)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.all(got[:, [4, 11]] == 0.0), "items without interactions score exactly 0"


def test_explicit_formula_and_auto_form():
    data = random_data(12, 30, seed=2)  # fewer users than items: auto picks the dual form
    lam = 3.0
    X = torch.as_tensor(data.train.to_dense(dtype=torch.float64))
    P = torch.linalg.solve(X.T @ X + lam * torch.eye(30, dtype=torch.float64), torch.eye(30, dtype=torch.float64))
    B = torch.eye(30, dtype=torch.float64) - P / torch.diagonal(P).unsqueeze(0)
    model = EASE(EASEConfig(l2=lam, l2_grid=(), device="cpu"))
    assert model.fit(data, FitInputs()).notes["form"] == "dual"
    np.testing.assert_allclose(model.score(all_users(data)).double().numpy(), (X @ B).numpy(), rtol=1e-4, atol=1e-5)
    tall = random_data(40, 10, seed=2)
    assert EASE(EASEConfig(l2=lam, l2_grid=(), device="cpu")).fit(tall, FitInputs()).notes["form"] == "primal"


def test_scores_any_profile_including_unknown_users():
    data = random_data(20, 15, seed=3)
    for form in ("primal", "dual"):
        model = EASE(EASEConfig(l2=5.0, l2_grid=(), form=form, device="cpu"))
        model.fit(data, FitInputs())
        profile = [2, 7, 9]
        x = torch.zeros(1, 15, dtype=torch.float64)
        x[0, profile] = 1
        X = torch.as_tensor(data.train.to_dense(dtype=torch.float64))
        B = torch.as_tensor(direct_B(X.numpy(), 5.0))
        batch = ScoreBatch(torch.tensor([-1]), torch.tensor([profile + [0]]), torch.tensor([[True, True, True, False]]))
        np.testing.assert_allclose(model.score(batch).double().numpy(), (x @ B).numpy(), rtol=1e-4, atol=1e-5)
        # the padding item (0) is ignored: masked out
        empty = ScoreBatch(torch.tensor([3]), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool))
        assert torch.count_nonzero(model.score(empty)) == 0


def test_state_round_trip_and_memory_guard():
    data = random_data(20, 15, seed=4)
    for form in ("primal", "dual"):
        model = EASE(EASEConfig(l2=5.0, l2_grid=(), form=form, device="cpu"))
        model.fit(data, FitInputs())
        again = EASE(EASEConfig(form=form, device="cpu"))
        again.load_state_dict(model.state_dict())
        assert torch.equal(model.score(all_users(data)), again.score(all_users(data)))
    with pytest.raises(MemoryError, match="max_dense_gb"):
        EASE(EASEConfig(l2_grid=(), max_dense_gb=1e-9, device="cpu")).fit(data, FitInputs())
    with pytest.raises(ValueError, match="lambda"):
        EASE(EASEConfig(l2=-1.0, l2_grid=(), device="cpu")).fit(data, FitInputs())


def test_lambda_chosen_on_validation_split_only():
    syn = planted_dataset(150, 200, seed=5)
    fit, validation = syn.data.validation_split()
    model = EASE(EASEConfig(l2_grid=(1.0, 20.0, 400.0), device="cpu"))
    hist = model.fit(fit, FitInputs(validation=validation))
    aucs = hist.notes["validation_auc_by_lambda"]
    assert set(aucs) == {"1.0", "20.0", "400.0"}
    assert hist.notes["lambda"] == float(max(aucs, key=aucs.get))
    test_auc = evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=()).means["auc"]
    assert test_auc > 0.85
    # without a validation split the configured lambda is used
    assert EASE(EASEConfig(l2=20.0, device="cpu")).fit(fit, FitInputs()).notes["lambda"] == 20.0


def test_dual_form_scales_to_many_items():
    # 60 users x 3000 items: the primal form would factor a 3000 x 3000 matrix; the dual factors 60 x 60
    rng = np.random.default_rng(0)
    lists = [rng.choice(3000, 40, replace=False) for _ in range(60)]
    csr = CSR.from_lists(lists, 3000)
    u = csr.row_ids()
    frame = pd.DataFrame({"user_id": u, "item_id": csr.indices, "ts": 0})
    data = RecData.from_frames(frame, np.arange(3000))
    model = EASE(EASEConfig(l2=10.0, l2_grid=(), max_solve_side=100, device="cpu"))
    notes = model.fit(data, FitInputs()).notes
    assert notes["form"] == "dual" and notes["variant"] == "exact"
    # the checkpoint holds parameters only: no users x users matrix, no training interactions
    state = model.state_dict()
    assert set(state) == {"B", "active_items", "n_items", "l2"}
    s = model.score(all_users(data))
    assert s.shape == (60, 3000) and torch.isfinite(s).all()
    primal = EASE(EASEConfig(l2=10.0, l2_grid=(), form="primal", device="cpu"))
    primal.fit(data, FitInputs())
    np.testing.assert_allclose(state["B"].numpy(), primal.state_dict()["B"].numpy(), atol=1e-5)


def popularity_data(seed=0, n_users=80, n_items=40) -> RecData:
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    lists = [rng.choice(n_items, rng.integers(2, 12), replace=False, p=pop / pop.sum()) for _ in range(n_users)]
    csr = CSR.from_lists(lists, n_items)
    frame = pd.DataFrame({"user_id": csr.row_ids(), "item_id": csr.indices, "ts": 0})
    return RecData.from_frames(frame, np.arange(n_items))


def test_top_items_variant_is_exact_ease_on_the_head_and_popularity_below():
    data = popularity_data()
    counts = np.bincount(data.train.indices, minlength=data.n_items)
    cfg = dict(l2=4.0, l2_grid=(), device="cpu")
    exact = EASE(EASEConfig(**cfg))
    assert exact.fit(data, FitInputs()).notes["variant"] == "exact"
    # N = every item: a side cap at the item count is the exact solve, bit for bit
    at_limit = EASE(EASEConfig(max_solve_side=int((counts > 0).sum()), **cfg))
    at_limit.fit(data, FitInputs())
    assert torch.equal(at_limit.state_dict()["B"], exact.state_dict()["B"])
    assert torch.equal(at_limit.score(all_users(data)), exact.score(all_users(data)))

    n = 15
    top = EASE(EASEConfig(max_solve_side=n, **cfg))
    notes = top.fit(data, FitInputs()).notes
    assert notes["variant"] == "top_items" and notes["active_items"] == n and "max_solve_side" in notes["variant_reason"]
    head = np.lexsort((np.arange(data.n_items), -counts))[:n]
    assert set(top.state_dict()["active_items"].tolist()) == set(head.tolist())
    # exact EASE on the data restricted to the head items
    X = data.train.to_dense(dtype=torch.float64).numpy()[:, np.sort(head)]
    np.testing.assert_allclose(top.state_dict()["B"].numpy(), direct_B(X, 4.0), rtol=1e-4, atol=1e-5)
    scores = top.score(all_users(data)).numpy()
    np.testing.assert_allclose(scores[:, np.sort(head)], X @ direct_B(X, 4.0), rtol=1e-4, atol=1e-5)
    # every tail item below every head item, in popularity order
    tail = np.setdiff1d(np.arange(data.n_items), head)
    assert (scores[:, tail].max(1) < scores[:, head].min(1)).all()
    by_pop = tail[np.argsort(-counts[tail], kind="stable")]
    assert (np.diff(scores[:, by_pop], axis=1) <= 0).all()


def test_memory_guard_counts_every_matrix_and_falls_back_to_the_variant():
    # the estimate holds the primal form's Gram, shifted copy and factor (3 x 8 n^2), float32 B and the rest
    n, users, nnz, cat = 1000, 5000, 10_000, 2000
    assert solve_bytes("primal", n, users, nnz, cat) >= 3 * 8 * n * n + 4 * n * n
    # the dual form: the three users x users matrices and B
    assert solve_bytes("dual", 5 * users, users, nnz, cat) >= 3 * 8 * users**2 + 4 * (5 * users) ** 2
    data = popularity_data(seed=1)
    counts = np.bincount(data.train.indices, minlength=data.n_items)
    active = int((counts > 0).sum())
    full = solve_bytes("primal", active, data.n_users, int(counts.sum()), data.n_items)
    small = solve_bytes("primal", active - 10, data.n_users, int(counts.sum()), data.n_items)
    budget_gb = (small + full) / 2 / 1e9  # fits about active - 5 items, not all of them
    model = EASE(EASEConfig(l2=4.0, l2_grid=(), max_dense_gb=budget_gb, device="cpu"))
    notes = model.fit(data, FitInputs()).notes
    assert notes["variant"] == "top_items" and active - 10 <= notes["active_items"] < active
    assert notes["memory_estimate_gb"] <= budget_gb and "max_dense_gb" in notes["variant_reason"]
    assert 0.0 < notes["interaction_coverage"] < 1.0
    with pytest.raises(MemoryError, match="variant='auto'"):
        EASE(EASEConfig(l2=4.0, l2_grid=(), max_dense_gb=budget_gb, variant="exact", device="cpu")).fit(data, FitInputs())
    # the variant survives a checkpoint round trip
    again = EASE(EASEConfig(device="cpu"))
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.score(all_users(data)), model.score(all_users(data)))
    with pytest.raises(ValueError, match="old dual-form"):
        again.load_state_dict({"K": torch.eye(2), "n_items": torch.tensor(3)})
