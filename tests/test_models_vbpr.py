"""VBPR: learning on planted data, the projection shortcuts, unknown users, inference cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.bpr_mf import BPRMF, BPRMFConfig
from visrec_pipeline.recsys.models.vbpr import VBPR, VBPRConfig, VBPRModule, scale_to_unit_norm
from visrec_pipeline.recsys.synthetic import planted_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted():
    return planted_dataset(200, 300, seed=0)


def fast_config(**train) -> VBPRConfig:
    """Small dimensions; ``train`` overrides the training settings."""
    base = dict(epochs=12, batch_size=512, lr=1e-2, patience=50, device="cpu")
    return VBPRConfig(train={**base, **train}, dim_gamma=16, dim_theta=16)


def test_loss_decreases_and_validation_auc_improves(planted):
    fit, validation = planted.data.validation_split()
    inputs = planted.inputs()
    inputs.validation = validation
    model = VBPR(fast_config())
    hist = model.fit(fit, inputs)
    assert len(hist.loss) == 12 and len(hist.val_auc) == 12
    assert all(b < a for a, b in zip(hist.loss[:6], hist.loss[1:7], strict=True)), hist.loss
    assert hist.loss[-1] < 0.75 * hist.loss[0]
    assert max(hist.val_auc) > hist.val_auc[0] + 0.05, hist.val_auc
    assert hist.notes["sampler"]["positives"] == fit.train.nnz
    # the restored weights are the best epoch's: re-validating reproduces the best AUC
    assert hist.best_epoch == int(np.argmax(hist.val_auc)) + 1
    sub = evaluate(model.score, validation, fit.n_items, ks=(), max_users=500, seed=0).means["auc"]
    assert sub == pytest.approx(max(hist.val_auc), abs=1e-9)
    test_auc = evaluate(model.score, planted.data.holdout, planted.data.n_items, ks=()).means["auc"]
    assert test_auc > 0.85


def test_visual_terms_help_on_cold_items():
    # items without training interactions can only be ranked through their features
    syn = planted_dataset(200, 300, seed=4, per_user=(4, 10))
    inputs = syn.inputs()
    vbpr = VBPR(fast_config(epochs=15))
    vbpr.fit(syn.data, inputs)
    bpr = BPRMF(BPRMFConfig(factors=16, train={"epochs": 15, "batch_size": 512, "lr": 1e-2, "device": "cpu"}))
    bpr.fit(syn.data, inputs)
    seen = np.zeros(syn.data.n_items, bool)
    seen[syn.data.train.indices] = True
    cold = np.flatnonzero(~seen)
    assert cold.size > 0
    r_v = evaluate(vbpr.score, syn.data.holdout, syn.data.n_items, ks=(), cold_items=cold).means
    r_b = evaluate(bpr.score, syn.data.holdout, syn.data.n_items, ks=(), cold_items=cold).means
    assert r_v["auc"] > r_b["auc"]


@pytest.mark.parametrize("b,n_distinct", [(80, None), (30, 8), (30, None)])
def test_projection_shortcuts_match_the_per_triple_formula(b, n_distinct):
    # (80, None): catalogue (50) <= batch -> whole-catalogue path; (30, 8): few distinct -> unique path;
    # (30, None): many distinct items -> per-triple differences
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(50, 12, generator=g)
    mod = VBPRModule(5, 50, feats, 4, 3, reg=0.0, reg_visual=0.0, init_std=0.5)
    pool = torch.randperm(50, generator=g)[: n_distinct or 50]
    i = pool[torch.randint(0, pool.numel(), (b,), generator=g)]
    j = pool[torch.randint(0, pool.numel(), (b,), generator=g)]
    w = torch.randn(b, 4, generator=g)
    out = mod._visual_diff(i, j)
    (out * w).sum().backward()
    grad = mod.visual.grad.clone()
    mod.visual.grad = None
    ref = (feats[i] - feats[j]) @ mod.visual
    (ref * w).sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad.numpy(), mod.visual.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_scores_equal_the_model_formula_and_unknown_users_get_item_part(planted):
    model = VBPR(fast_config(epochs=2))
    model.fit(planted.data, planted.inputs())
    mod = model.module
    f = mod.features
    E, bp = mod.visual[:, :-1], mod.visual[:, -1]
    users = torch.tensor([0, 7, -1])
    batch = ScoreBatch(users, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.bool))
    got = model.score(batch)
    with torch.no_grad():
        item_part = mod.beta_item.weight[:, 0] + f @ bp
        known = users[:2]
        expected = (
            item_part
            + mod.gamma_user.weight[known] @ mod.gamma_item.weight.T
            + mod.theta_user.weight[known] @ (f @ E).T
        )
    np.testing.assert_allclose(got[:2].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[2].numpy(), item_part.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(IndexError):
        model.score(ScoreBatch(torch.tensor([10_000]), batch.profile_items[:1], batch.profile_mask[:1]))


def test_feature_scaling_and_missing_features(planted):
    f = torch.as_tensor(planted.features)
    mask = torch.ones(f.shape[0], dtype=torch.bool)
    mask[3] = False
    l2 = scale_to_unit_norm(f, mask, "l2")
    assert torch.allclose(l2[mask].norm(dim=1), torch.ones(int(mask.sum())), atol=1e-5)
    assert torch.count_nonzero(l2[3]) == 0
    std = scale_to_unit_norm(f, mask, "standard")
    assert torch.allclose(std[mask].mean(0), torch.zeros(f.shape[1]), atol=1e-4)
    assert torch.equal(scale_to_unit_norm(f, mask, "none"), f)
    with pytest.raises(ValueError, match="feature_scale"):
        scale_to_unit_norm(f, mask, "minmax")
    with pytest.raises(ValueError, match="features"):
        VBPR(fast_config()).fit(planted.data, FitInputs())


def test_bpr_mf_learns_and_scores_unknown_users_by_item_bias(planted):
    fit, validation = planted.data.validation_split()
    model = BPRMF(BPRMFConfig(factors=16, train={"epochs": 10, "batch_size": 512, "lr": 1e-2, "device": "cpu"}))
    hist = model.fit(fit, FitInputs(validation=validation))
    assert hist.loss[-1] < hist.loss[0] and max(hist.val_auc) > hist.val_auc[0]
    auc = evaluate(model.score, planted.data.holdout, planted.data.n_items, ks=()).means["auc"]
    assert auc > 0.8
    s = model.score(ScoreBatch(torch.tensor([-1]), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)))
    np.testing.assert_allclose(s[0].numpy(), model.module.beta_item.weight[:, 0].detach().numpy(), rtol=1e-6)


def test_without_validation_all_epochs_run_on_the_auto_device(planted):
    model = VBPR(fast_config(epochs=3, device="auto"))
    hist = model.fit(planted.data, planted.inputs())
    assert len(hist.loss) == 3 and hist.val_auc == [] and hist.best_epoch == 3
    assert "none given" in hist.notes["validation"]
    assert hist.notes["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vbpr_trains_on_cuda_and_scores_match_on_cpu(planted):
    model = VBPR(fast_config(epochs=3, device="cuda"))
    hist = model.fit(planted.data, planted.inputs())
    assert hist.notes["device"].startswith("cuda") and hist.loss[-1] < hist.loss[0]
    batch = ScoreBatch(torch.arange(10), torch.zeros(10, 1, dtype=torch.long), torch.ones(10, 1, dtype=torch.bool))
    on_gpu = model.score(batch)
    assert on_gpu.device.type == "cuda"
    cpu = VBPR(fast_config(device="cpu"))
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    np.testing.assert_allclose(cpu.score(batch).numpy(), on_gpu.cpu().numpy(), rtol=1e-4, atol=1e-4)


def test_the_visual_projection_and_bias_are_regularised_by_default():
    config = VBPRConfig()
    assert config.reg_visual == config.reg > 0  # the paper's one lambda for E and beta' too
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(30, 12, generator=g)
    batch = {"user": torch.tensor([0, 1, 2]), "pos": torch.tensor([3, 4, 5]), "neg": torch.tensor([6, 7, 8])}
    free = VBPRModule(4, 30, feats, 4, 3, reg=config.reg, reg_visual=0.0, init_std=0.5)
    tied = VBPRModule(4, 30, feats, 4, 3, reg=config.reg, reg_visual=config.reg_visual, init_std=0.5)
    tied.load_state_dict(free.state_dict())
    extra = tied.loss(batch) - free.loss(batch)
    assert torch.allclose(extra, config.reg_visual * free.visual.square().sum(), rtol=1e-4, atol=1e-6)
