"""The model registry: specs, config overrides, registration rules."""

from __future__ import annotations

import dataclasses

import pytest

from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.models.ease import EASE
from visrec_pipeline.recsys.registry import MODEL_SPECS, ModelSpec, build_model, make_config, register

MINE = ["random", "most_popular", "bpr_mf", "ease", "visrank", "vbpr"]


def test_specs_and_needs():
    assert list(MODEL_SPECS)[:6] == MINE
    assert MODEL_SPECS["vbpr"].needs == frozenset({"features:resnet50", "triples_random"})
    assert MODEL_SPECS["visrank"].needs == frozenset({"features:resnet50"})
    assert MODEL_SPECS["bpr_mf"].needs == frozenset({"triples_random"})
    for spec in MODEL_SPECS.values():
        assert dataclasses.is_dataclass(spec.config_cls) and spec.description
        cfg = spec.config_cls()
        assert hasattr(cfg, "seed") and cfg.device in ("auto", "cpu", "cuda")
        assert spec.cls(cfg).name == spec.name


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
