"""DVBPR: the CNN cache in item-index order, end-to-end training from images, checkpoints, architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.checkpoint import load_checkpoint, save_checkpoint
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.dvbpr import DVBPR, DVBPRConfig, ImageCNN, cnn_spec, resize_images
from visrec_pipeline.recsys.registry import MODEL_SPECS, build_model
from visrec_pipeline.recsys.synthetic import planted_dataset

SIZE = 32  # the test's "thumbnails"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def syn():
    return planted_dataset(n_users=100, n_items=200, n_clusters=5, dim=8, per_user=(8, 30), seed=2)


class ImageSource:
    """``FitInputs.images``: a colour per visual cluster plus an item-specific pattern; records calls."""

    def __init__(self, clusters: np.ndarray, seed: int = 0):
        rng = np.random.default_rng(seed)
        colours = rng.integers(30, 226, (int(clusters.max()) + 1, 3))
        noise = rng.normal(0, 25, (clusters.size, 3, 4, 4)).repeat(SIZE // 4, 2).repeat(SIZE // 4, 3)
        self.table = torch.from_numpy(np.clip(colours[clusters][:, :, None, None] + noise, 0, 255).astype(np.uint8))
        self.calls: list[torch.Tensor] = []

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls.append(idx.clone())
        return self.table[idx]


def _config(train: dict | None = None, **kw):
    base = dict(
        reg=1e-4,
        k=8,
        gamma_dim=4,
        input_size=48,
        width_mult=0.125,
        fc_dim=32,
        lrn=False,
        dropout=0.0,
        cache_batch_size=64,
    )
    base.update(kw)
    train = {"epochs": 6, "batch_size": 512, "lr": 1e-2, "weight_decay": 1e-5, "device": "cpu", **(train or {})}
    return DVBPRConfig(train=train, **base)


def _batch(holdout, rows=None):
    rows = np.arange(len(holdout)) if rows is None else np.asarray(rows)
    items, mask = holdout.profile.padded(rows)
    return ScoreBatch(torch.as_tensor(holdout.user_idx[rows]), items, mask)


@pytest.fixture(scope="module")
def trained(syn):
    fit, validation = syn.data.validation_split()
    images = ImageSource(syn.clusters)
    model = DVBPR(_config())
    history = model.fit(fit, FitInputs(images=images, validation=validation))
    return model, history, images


def test_registered_with_its_needs_and_presets():
    assert MODEL_SPECS["dvbpr"].needs == frozenset({"images", "triples_random"})
    paper = build_model("dvbpr").config
    assert (paper.architecture, paper.input_size, paper.k, paper.lrn, paper.fc_dim) == ("cnnf", 224, 50, True, 4096)
    demo = DVBPRConfig.demo(train={"epochs": 2})
    assert demo.input_size == 64 and demo.train.epochs == 2 and demo.architecture == "cnnf"
    assert (demo.train.batch_size, demo.train.lr) == (4096, 1e-2)  # the preset's, not the paper's defaults
    with pytest.raises(ValueError, match="architecture"):
        DVBPRConfig(architecture="vgg")


def test_architectures_have_the_paper_shapes():
    for arch in ("cnnf", "alexnet"):
        cnn = ImageCNN(cnn_spec(arch, fc_dim=8), 224, 50)
        assert cnn.features(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 6, 6), arch
        assert cnn(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2, 50)
    convs = [m for m in ImageCNN(cnn_spec("cnnf", fc_dim=8), 224, 50).features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (64, 11, 4),
        (256, 5, 1),
        (256, 3, 1),
        (256, 3, 1),
        (256, 3, 1),
    ]
    layers = ImageCNN(cnn_spec("cnnf", fc_dim=8), 224, 50).features
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in layers) == 2
    with pytest.raises(ValueError, match="too small"):
        ImageCNN(cnn_spec("cnnf"), 20, 50)


def test_cache_row_r_is_phi_of_the_image_of_item_r(syn, trained):
    model, _, images = trained
    cache = model.item_cache()
    assert cache.shape == (syn.data.n_items, 8)
    module = model.module
    module.eval()
    rows = [0, 1, 17, 99, 150, syn.data.n_items - 1]
    with torch.no_grad():
        alone = torch.cat([module.cnn(resize_images(images.table[[r]], 48)) for r in rows])
    assert torch.allclose(cache[rows], alone, atol=1e-5)
    # the images were requested by item index, in ascending index order
    requested = torch.cat(images.calls)[: syn.data.n_items]  # the first requests: the preload
    assert torch.equal(requested, torch.arange(syn.data.n_items))
    # distinct images give distinct rows, so a permuted cache could not pass the check above
    assert not torch.allclose(cache[0], cache[1])


def test_scores_are_latent_plus_visual_factors(syn, trained):
    model, _, _ = trained
    batch = _batch(syn.data.holdout, range(10))
    m = model.module
    u = batch.user_idx
    expected = m.gamma_user(u) @ m.gamma_item.weight.T + m.theta(u) @ model.item_cache().T
    assert torch.allclose(model.score(batch), expected, atol=1e-5)
    unknown = ScoreBatch(torch.full((3,), -1), batch.profile_items[:3], batch.profile_mask[:3])
    assert torch.all(model.score(unknown) == 0)


def test_training_lowers_the_loss_and_learns_from_the_images(syn, trained):
    model, history, _ = trained
    assert history.loss[-1] < history.loss[0]
    assert history.notes["images"]["in_memory"] is True
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.65


def test_images_decoded_per_batch_train_the_same_model(syn):
    fit, _ = syn.data.validation_split()
    cfg = _config({"epochs": 1})
    preloaded = DVBPR(cfg)
    preloaded.fit(fit, FitInputs(images=ImageSource(syn.clusters)))
    on_demand = DVBPR(_config({"epochs": 1}, image_cache_mb=0))
    history = on_demand.fit(fit, FitInputs(images=ImageSource(syn.clusters)))
    assert history.notes["images"]["in_memory"] is False
    assert torch.allclose(on_demand.item_cache(), preloaded.item_cache(), atol=1e-5)


def test_checkpoint_round_trip_needs_no_images(syn, trained, tmp_path):
    model, history, _ = trained
    path = save_checkpoint(
        tmp_path / "dvbpr.pt",
        model_name="dvbpr",
        config=model.config,
        state=model.state_dict(),
        data_versions={},
        history=history,
    )
    ckpt = load_checkpoint(path)
    fresh = build_model("dvbpr", ckpt["config"])
    fresh.load_state_dict(ckpt["state"])
    batch = _batch(syn.data.holdout)
    assert torch.equal(fresh.score(batch), model.score(batch))


def test_bad_images_are_reported(syn):
    fit, _ = syn.data.validation_split()
    with pytest.raises(ValueError, match="FitInputs.images"):
        DVBPR(_config()).fit(fit, FitInputs())
    with pytest.raises(ValueError, match="uint8"):
        DVBPR(_config()).fit(fit, FitInputs(images=lambda idx: torch.zeros(len(idx), 3, 8, 8)))
    with pytest.raises(ValueError, match="returned 1 images"):
        DVBPR(_config()).fit(fit, FitInputs(images=lambda idx: torch.zeros(1, 3, 8, 8, dtype=torch.uint8)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_mixed_precision(syn):
    fit, validation = syn.data.validation_split()
    images = ImageSource(syn.clusters)
    model = DVBPR(_config({"device": "cuda", "epochs": 3}))
    history = model.fit(fit, FitInputs(images=images, validation=validation))
    assert history.notes["amp"] in ("bfloat16", "float16")
    assert history.loss[-1] < history.loss[0]
    cache = model.item_cache()
    assert cache.is_cuda and torch.isfinite(cache).all()
    module = model.module.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        alone = module.cnn(resize_images(images.table[[5]], 48).cuda()).float()
    assert torch.allclose(cache[5], alone[0], atol=5e-2, rtol=5e-2)
    assert evaluate(model.score, syn.data.holdout, syn.data.n_items, ks=(20,)).means["auc"] > 0.6
