"""Every recommender the pipeline knows: name, class, config dataclass and the inputs it needs.

``needs`` names side inputs (the Dagster layer maps them to upstream assets and
``model_io.build_inputs`` loads them): ``features:<backbone>`` (pooled features),
``spatial:<backbone>`` (feature maps), ``images``, ``triples_random``, ``triples_guided``.

Models in other modules add themselves with ``register(ModelSpec(...))`` at import;
the modules listed in ``_EXTENSION_MODULES`` are imported at the end of this module
when they exist, so ``MODEL_SPECS`` is complete once the registry is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import typing
from dataclasses import dataclass

from visrec_pipeline.recsys.base import Recommender
from visrec_pipeline.recsys.models.baselines import MostPopular, MostPopularConfig, RandomConfig, RandomRecommender
from visrec_pipeline.recsys.models.bpr_mf import BPRMF, BPRMFConfig
from visrec_pipeline.recsys.models.ease import EASE, EASEConfig
from visrec_pipeline.recsys.models.vbpr import VBPR, VBPRConfig
from visrec_pipeline.recsys.models.visrank import VisRank, VisRankConfig

FEATURE_BACKBONE = "resnet50"
NEED_KINDS = ("features", "spatial", "images", "triples_random", "triples_guided")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type[Recommender]
    config_cls: type
    needs: frozenset[str]
    description: str

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"model name {self.name!r} must be a lower-case identifier (it names Dagster assets)")
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"{self.name}: config_cls must be a dataclass, got {self.config_cls!r}")
        if not (isinstance(self.cls, type) and issubclass(self.cls, Recommender)):
            raise TypeError(f"{self.name}: cls must be a Recommender subclass, got {self.cls!r}")
        for need in self.needs:
            kind = need.partition(":")[0]
            if kind not in NEED_KINDS:
                raise ValueError(f"{self.name}: unknown need {need!r} (kinds: {NEED_KINDS})")


MODEL_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; registering the same name twice with a different spec is an error."""
    existing = MODEL_SPECS.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"model {spec.name!r} is already registered (by {existing.cls.__module__})")
    MODEL_SPECS[spec.name] = spec
    return spec


def _coerce(value, annotation):
    """Config values from JSON/Dagster: lists back to tuples where the dataclass wants a tuple."""
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def make_config(name: str, overrides: dict | None = None):
    """The model's config dataclass with ``overrides`` applied; unknown keys are an error."""
    spec = get_spec(name)
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(spec.config_cls)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{name}: unknown config key(s) {unknown}; known: {sorted(names)}")
    return spec.config_cls(**{k: _coerce(v, hints.get(k)) for k, v in overrides.items()})


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODEL_SPECS)}") from None


def build_model(name: str, config_overrides: dict | None = None) -> Recommender:
    """A fresh, unfitted model ``name`` with its default config updated by ``config_overrides``."""
    spec = get_spec(name)
    return spec.cls(make_config(name, config_overrides))


_FEATURES = f"features:{FEATURE_BACKBONE}"

for _spec in (
    ModelSpec(
        "random", RandomRecommender, RandomConfig, frozenset(),
        "Random baseline: uniform scores from a fixed seed (deterministic per user).",
    ),
    ModelSpec(
        "most_popular", MostPopular, MostPopularConfig, frozenset(),
        "MostPopular baseline: items ranked by their number of training interactions.",
    ),
    ModelSpec(
        "bpr_mf", BPRMF, BPRMFConfig, frozenset({"triples_random"}),
        "BPR-MF: matrix factorisation with item bias trained on uniform BPR triples; VBPR's non-visual control.",
    ),
    ModelSpec(
        "ease", EASE, EASEConfig, frozenset(),
        "EASE (Steck 2019): closed-form item-item linear autoencoder; lambda chosen on the validation split.",
    ),
    ModelSpec(
        "visrank", VisRank, VisRankConfig, frozenset({_FEATURES}),
        "VisRank: content-based, each item scored by its cosine similarity to the user's profile items.",
    ),
    ModelSpec(
        "vbpr", VBPR, VBPRConfig, frozenset({_FEATURES, "triples_random"}),
        "VBPR (He & McAuley 2016): BPR matrix factorisation plus a learned projection of frozen visual features.",
    ),
):
    register(_spec)

# models written in their own modules register themselves when imported
_EXTENSION_MODULES = (
    "visrec_pipeline.recsys.models.dvbpr",
    "visrec_pipeline.recsys.models.curatornet",
    "visrec_pipeline.recsys.models.acf",
)
for _module in _EXTENSION_MODULES:
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module)
