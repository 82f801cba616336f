"""The shared training loop: losses, early stopping with best-state restore, seeding, validation, devices."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.data import CSR, Holdout
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.baselines import MostPopular
from visrec_pipeline.recsys.trainer import OptimizerGroup, TrainConfig, default_optimizer, fit_triples, make_validator


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Toy(nn.Module):
    """Regress ``w`` towards a target: a loss that a few Adam steps reduce."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.target = torch.tensor([1.0, -2.0, 3.0, 0.5])

    def loss(self, batch):
        x = batch["x"]
        return ((x * (self.w - self.target)) ** 2).mean()


def toy_batches(n_batches=5, size=16):
    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(n_batches):
            yield {"x": torch.randn(size, 4, generator=g)}

    return batches


def test_loss_per_epoch_recorded_and_decreasing(caplog):
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.1, device="cpu")
    model = Toy()
    with caplog.at_level(logging.INFO, logger="visrec.trainer"):
        hist = fit_triples(model, toy_batches(), cfg)
    assert len(hist.loss) == 6 and hist.val_auc == []
    assert hist.loss[-1] < hist.loss[0] / 2
    assert hist.best_epoch == 6 and hist.notes["epochs_run"] == 6
    assert hist.notes["triples_per_s"] > 0
    assert "epoch 6/6" in caplog.text and "triples/s=" in caplog.text


def test_early_stopping_restores_best_epoch():
    aucs = iter([0.50, 0.70, 0.60, 0.65, 0.99])  # best at epoch 2, then two without improvement
    seen: list[torch.Tensor] = []
    model = Toy()

    def validate():
        seen.append(model.w.detach().clone())
        return next(aucs)

    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.1, patience=2, device="cpu")
    hist = fit_triples(model, toy_batches(), cfg, validate=validate)
    assert len(hist.loss) == 4, "stops after two validations without improvement"
    assert hist.val_auc == [0.50, 0.70, 0.60, 0.65]
    assert hist.best_epoch == 2 and hist.notes["best_val_auc"] == 0.70
    assert torch.equal(model.w.detach(), seen[1]), "the weights of epoch 2 are restored"
    assert not torch.equal(seen[1], seen[3])


def test_eval_every_and_max_batches():
    calls = []
    model = Toy()
    counted = []

    def batches(epoch):
        for b in toy_batches(n_batches=10)(epoch):
            counted.append(epoch)
            yield b

    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.05, eval_every=2, max_batches_per_epoch=3, device="cpu")
    hist = fit_triples(model, batches, cfg, validate=lambda: calls.append(1) or 0.5 + 0.1 * len(calls))
    assert hist.notes["val_epochs"] == [2, 4, 5]  # every 2nd epoch and the last
    assert len(hist.val_auc) == 3
    assert all(counted.count(e) == 3 for e in range(5)), "only the batches used are drawn"


def test_seeded_runs_are_identical_and_custom_loss():
    def run(seed):
        torch.manual_seed(1234 + seed)  # perturb global state: fit_triples must reseed
        model = Toy()
        cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, seed=seed, device="cpu")

        def noisy_loss(m, batch):
            return m.loss(batch) + 0.01 * torch.randn(()) * m.w.sum()

        fit_triples(model, toy_batches(), cfg, loss_fn=noisy_loss)
        return model.w.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_non_finite_loss_is_a_clear_error():
    model = Toy()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, device="cpu")
    with pytest.raises(FloatingPointError, match="epoch 1"):
        fit_triples(model, toy_batches(), cfg, loss_fn=lambda m, b: m.loss(b) * float("nan"))
    with pytest.raises(RuntimeError, match="no triples"):
        fit_triples(model, lambda e: iter(()), cfg)
    with pytest.raises(ValueError, match="epochs"):
        fit_triples(model, toy_batches(), TrainConfig(epochs=0, batch_size=1, lr=0.1))


def test_custom_optimizer_is_used():
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fit_triples(model, toy_batches(), TrainConfig(epochs=2, batch_size=16, lr=1.0, device="cpu"), optimizer=opt)
    assert torch.equal(model.w.detach(), torch.zeros(4))


class SparseToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3, sparse=True)
        self.w = nn.Parameter(torch.ones(3))

    def loss(self, batch):
        return ((self.emb(batch["user"]) * self.w).sum(1) - 1.0).square().mean()


def test_sparse_embeddings_get_lazy_adam_and_untouched_rows_stay():
    model = SparseToy()
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.05, device="cpu")
    opt = default_optimizer(model, cfg)
    assert isinstance(opt, OptimizerGroup)
    assert [type(o).__name__ for o in opt.optimizers] == ["SparseAdam", "Adam"]
    before = model.emb.weight.detach().clone()

    def batches(epoch):
        yield {"user": torch.tensor([0, 1, 2, 1])}

    hist = fit_triples(model, batches, cfg)
    assert hist.loss[-1] < hist.loss[0]
    assert torch.equal(model.emb.weight[3:], before[3:]), "rows never in a batch are not moved"
    assert not torch.equal(model.emb.weight[:3], before[:3])
    with pytest.raises(ValueError, match="weight_decay"):
        default_optimizer(model, TrainConfig(epochs=1, batch_size=1, lr=0.1, weight_decay=0.1))
    assert isinstance(default_optimizer(Toy(), cfg), torch.optim.Adam)


def test_device_auto_picks_cpu_without_cuda():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="cuda"):
            resolve_device("cuda")
        hist = fit_triples(Toy(), toy_batches(), TrainConfig(epochs=1, batch_size=16, lr=0.1))
        assert hist.notes["device"] == "cpu" and hist.notes["amp"] == "off"


def test_make_validator_matches_evaluate_on_a_subset():
    n_items = 30
    rng = np.random.default_rng(0)
    profiles = [rng.choice(n_items, 5, replace=False) for _ in range(40)]
    predict = [[int(np.setdiff1d(np.arange(n_items), p)[rng.integers(0, 25)])] for p in profiles]
    holdout = Holdout(np.arange(40), CSR.from_lists(profiles, n_items), CSR.from_lists(predict, n_items))
    pop = MostPopular()
    pop.counts = torch.as_tensor(rng.random(n_items), dtype=torch.float32)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, val_max_users=15, seed=3, device="cpu")
    validate = make_validator(pop, holdout, n_items, cfg)
    auc = validate()
    assert auc == validate(), "the same subset at every call"
    expected = evaluate(pop.score, holdout, n_items, ks=(), max_users=15, seed=3).means["auc"]
    assert auc == pytest.approx(expected)
    full = evaluate(pop.score, holdout, n_items, ks=()).means["auc"]
    assert auc != pytest.approx(full)  # it really is a subset

    # a hand-checkable case: item 3 ranked above 2 of 3 candidates
    h = Holdout(np.array([0]), CSR.from_lists([[0]], 5), CSR.from_lists([[3]], 5))
    pop.counts = torch.tensor([9.0, 5.0, 1.0, 2.0, 3.0])
    assert make_validator(pop, h, 5, cfg)() == pytest.approx(1 / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_training_runs():
    for amp in ("bf16", "fp16"):
        model = Toy()
        cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, device="cuda", amp=amp)

        def batches(epoch):
            for b in toy_batches()(epoch):
                yield {"x": b["x"].cuda()}

        hist = fit_triples(model, batches, cfg)
        assert hist.notes["amp"] == ("bfloat16" if amp == "bf16" else "float16")
        assert hist.loss[-1] < hist.loss[0]
        assert model.w.device.type == "cuda"


def slow_batches(n_batches: int, seconds_per_batch: float):
    """Toy batches that take a known wall time each to produce (a stand-in for a slow batch source)."""
    import time

    def batches(epoch):
        for b in toy_batches(n_batches=n_batches)(epoch):
            time.sleep(seconds_per_batch)
            yield b

    return batches


def test_time_budget_stops_between_epochs_and_keeps_the_best_validated_weights(caplog):
    # epochs of ~0.1 s against a 0.45 s budget: a few epochs run, never the 200 asked for
    calls = []
    cfg = TrainConfig(epochs=200, batch_size=16, lr=0.1, device="cpu", max_minutes=0.45 / 60)
    model = Toy()
    with caplog.at_level(logging.INFO, logger="visrec.trainer"):
        hist = fit_triples(model, slow_batches(10, 0.01), cfg, validate=lambda: calls.append(1) or len(calls))
    run = hist.notes["epochs_run"]
    assert 2 <= run <= 6 and hist.notes["stopped_by"] == "time_budget"
    assert hist.notes["val_epochs"] == list(range(1, run + 1)), "the last epoch run is validated"
    assert hist.best_epoch == run
    assert hist.seconds < 0.45 + 0.3, "stopped before an epoch that would end past the budget"
    assert "time budget: max_minutes=" in caplog.text and f"after {run} of 200 epochs" in caplog.text


def test_time_budget_cuts_an_epoch_short_and_validates_it():
    counted, calls = [], []

    def batches(epoch):
        for b in slow_batches(100, 0.01)(epoch):
            counted.append(epoch)
            yield b

    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, device="cpu", max_minutes=0.2 / 60)
    hist = fit_triples(Toy(), batches, cfg, validate=lambda: calls.append(1) or 0.6)
    assert hist.notes["epochs_run"] == 1 and hist.notes["stopped_by"] == "time_budget"
    assert 10 <= len(counted) < 100, "the epoch ended at the first batch past the budget"
    assert calls == [1] and hist.best_epoch == 1


def test_without_a_budget_every_epoch_runs_and_the_reason_is_said():
    hist = fit_triples(Toy(), toy_batches(), TrainConfig(epochs=3, batch_size=16, lr=0.1, device="cpu"))
    assert hist.notes["epochs_run"] == 3 and hist.notes["stopped_by"] == "epochs"
    with pytest.raises(ValueError, match="max_minutes"):
        fit_triples(Toy(), toy_batches(), TrainConfig(epochs=3, batch_size=16, lr=0.1, device="cpu", max_minutes=-1))


def test_the_first_epoch_says_what_an_epoch_will_cost(caplog):
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, device="cpu", max_minutes=10)
    with caplog.at_level(logging.INFO, logger="visrec.trainer"):
        hist = fit_triples(Toy(), slow_batches(40, 0.02), cfg, batches_per_epoch=40)
    est = hist.notes["epoch_estimate"]
    assert est["batches"] == 40 and 3 <= est["measured_batches"] <= 20
    assert 0.5 <= est["epoch_seconds"] <= 3.0  # 40 batches of ~0.02 s
    assert "one epoch estimated at" in caplog.text and "room for about 2 of 2 epochs" in caplog.text
    assert "epoch_estimate" not in fit_triples(Toy(), toy_batches(), cfg).notes  # length unknown: nothing said
