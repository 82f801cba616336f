"""The model registry: specs, config overrides, registration rules."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.checkpoint import load_checkpoint, save_checkpoint
from visrec_pipeline.recsys.models.ease import EASE
from visrec_pipeline.recsys.registry import MODEL_SPECS, ModelSpec, build_model, make_config, register
from visrec_pipeline.recsys.trainer import TrainConfig
from visrec_pipeline.recsys.triple_model import TripleTrainedConfig, TripleTrainedModel

# the registration order orders the Dagster assets and the reports
ORDER = ["random", "most_popular", "bpr_mf", "ease", "visrank", "vbpr", "dvbpr", "curatornet", "curatornet_random", "acf"]
TRIPLE_TRAINED = ["bpr_mf", "vbpr", "dvbpr", "curatornet", "curatornet_random", "acf"]


def test_specs_and_needs():
    assert list(MODEL_SPECS) == ORDER
    assert MODEL_SPECS["vbpr"].needs == frozenset({"features:resnet50", "triples_random"})
    assert MODEL_SPECS["visrank"].needs == frozenset({"features:resnet50"})
    assert MODEL_SPECS["bpr_mf"].needs == frozenset({"triples_random"})
    for spec in MODEL_SPECS.values():
        assert dataclasses.is_dataclass(spec.config_cls) and spec.description
        cfg = spec.config_cls()
        # triple-trained models keep seed and device with the other training settings
        triple = issubclass(spec.cls, TripleTrainedModel)
        assert triple == (spec.name in TRIPLE_TRAINED) == isinstance(cfg, TripleTrainedConfig)
        settings = cfg.train if triple else cfg
        assert isinstance(settings.seed, int) and settings.device in ("auto", "cpu", "cuda")
        assert spec.cls(cfg).name == spec.name


@pytest.mark.parametrize("first", ["visrec_pipeline.recsys.models.dvbpr", "visrec_pipeline.recsys.model_spec"])
def test_the_registry_is_complete_and_ordered_whatever_is_imported_first(first):
    code = f"import {first}\nfrom visrec_pipeline.recsys.registry import MODEL_SPECS\nprint(','.join(MODEL_SPECS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",") == ORDER


def test_each_model_keeps_its_own_training_defaults():
    trains = {name: MODEL_SPECS[name].config_cls().train for name in TRIPLE_TRAINED}
    assert all(isinstance(t, TrainConfig) for t in trains.values())
    assert (trains["vbpr"].epochs, trains["vbpr"].batch_size, trains["vbpr"].lr) == (50, 4096, 3e-3)
    assert (trains["dvbpr"].epochs, trains["dvbpr"].lr, trains["dvbpr"].weight_decay) == (10, 1e-4, 1e-4)
    assert (trains["acf"].epochs, trains["acf"].weight_decay) == (20, 1e-6)
    # a dict names only what it changes; the rest are the model's defaults, not TrainConfig's
    cfg = make_config("curatornet", {"train": {"epochs": 2, "device": "cpu"}})
    assert cfg.train == dataclasses.replace(trains["curatornet"], epochs=2, device="cpu")
    assert make_config("bpr_mf", {"train": {"epochs": 2}}).train.batch_size == 4096
    with pytest.raises(ValueError, match="unknown config key.*'epoch'"):
        make_config("vbpr", {"train": {"epoch": 2}})


def test_build_model_applies_overrides():
    m = build_model("ease", {"l2": 42.0, "l2_grid": [1.0, 2.0], "device": "cpu"})
    assert isinstance(m, EASE)
    assert m.config.l2 == 42.0 and m.config.l2_grid == (1.0, 2.0)  # lists from JSON become tuples
    assert build_model("vbpr").config.dim_gamma == 200
    with pytest.raises(ValueError, match="unknown config key"):
        build_model("vbpr", {"dim_gama": 3})
    with pytest.raises(KeyError, match="unknown model"):
        build_model("nope")
    assert make_config("bpr_mf", {"factors": 3}).factors == 3


# the config of a VBPR checkpoint written before the configs had a ``train`` section
LEGACY_VBPR = {
    "dim_gamma": 8, "dim_theta": 4, "epochs": 2, "batch_size": 256, "lr": 0.01, "reg": 1e-4, "reg_visual": 0.0,
    "init_std": 0.01, "feature_scale": "l2", "patience": 3, "eval_every": 1, "val_max_users": 500,
    "triples_per_epoch": 0, "seed": 4, "device": "cpu",
}


def test_a_checkpoint_with_a_flat_legacy_config_still_loads(tmp_path):
    path = save_checkpoint(
        tmp_path / "vbpr.pt", model_name="vbpr", config=LEGACY_VBPR, state={}, data_versions={}, history=TrainHistory()
    )
    model = build_model("vbpr", load_checkpoint(path)["config"])
    cfg = model.config
    assert (cfg.dim_gamma, cfg.dim_theta, cfg.reg, cfg.triples_per_epoch) == (8, 4, 1e-4, 0)
    # the old VBPR config had no amp, weight_decay or max_batches_per_epoch: VBPR's own defaults fill them
    assert cfg.train == TrainConfig(epochs=2, batch_size=256, lr=0.01, seed=4, device="cpu")
    # the flat training keys of models whose config had every TrainConfig field
    acf = make_config("acf", {"epochs": 3, "amp": "off", "max_batches_per_epoch": 5, "weight_decay": 0.0, "dim": 8})
    assert (acf.train.epochs, acf.train.amp, acf.train.max_batches_per_epoch, acf.train.weight_decay) == (3, "off", 5, 0.0)
    assert acf.train.lr == MODEL_SPECS["acf"].config_cls().train.lr and acf.dim == 8
    # flat keys merge with a partial train section; the same key in both is refused
    assert make_config("dvbpr", {"epochs": 3, "train": {"lr": 0.5}}).train.epochs == 3
    with pytest.raises(ValueError, match="both at the top level and in 'train'"):
        make_config("dvbpr", {"epochs": 3, "train": {"epochs": 4}})


@dataclasses.dataclass
class DummyConfig:
    seed: int = 0
    device: str = "auto"


class Dummy(Recommender):
    name = "dummy_test_model"

    def fit(self, data, inputs: FitInputs) -> TrainHistory:
        return TrainHistory()

    def score(self, batch: ScoreBatch):
        raise NotImplementedError


def test_register_rules():
    spec = ModelSpec("dummy_test_model", Dummy, DummyConfig, frozenset({"images"}), "test only")
    try:
        register(spec)
        register(spec)  # the same spec again is fine (module re-import)
        with pytest.raises(ValueError, match="already registered"):
            register(dataclasses.replace(spec, description="other"))
        assert isinstance(build_model("dummy_test_model"), Dummy)
    finally:
        MODEL_SPECS.pop("dummy_test_model", None)
    with pytest.raises(ValueError, match="unknown need"):
        ModelSpec("x", Dummy, DummyConfig, frozenset({"pictures"}), "")
    with pytest.raises(ValueError, match="identifier"):
        ModelSpec("Bad-Name", Dummy, DummyConfig, frozenset(), "")
    with pytest.raises(TypeError, match="dataclass"):
        ModelSpec("x", Dummy, dict, frozenset(), "")
    with pytest.raises(TypeError, match="Recommender"):
        ModelSpec("x", dict, DummyConfig, frozenset(), "")
