"""Every recommender the pipeline knows: name, class, config dataclass and the inputs it needs.

Each model module registers itself (``register(ModelSpec(...))``, see
:mod:`visrec_pipeline.recsys.model_spec`); this module imports them all first, through
:mod:`visrec_pipeline.recsys.models`, so ``MODEL_SPECS`` is complete whatever was imported
before, in the package's order.
"""

from __future__ import annotations

import dataclasses
import typing

import visrec_pipeline.recsys.models  # noqa: F401  (importing the package registers every model, in order)
from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.recsys.base import Recommender
from visrec_pipeline.recsys.model_spec import NEED_KINDS, ModelSpec, register, registered_specs
from visrec_pipeline.recsys.trainer import TrainConfig

__all__ = [
    "FEATURE_BACKBONE",
    "MODEL_SPECS",
    "NEED_KINDS",
    "ModelSpec",
    "build_model",
    "get_spec",
    "make_config",
    "register",
]

MODEL_SPECS: dict[str, ModelSpec] = registered_specs()

_TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _coerce(value, annotation):
    """Config values from JSON/Dagster: lists back to tuples where the dataclass wants a tuple."""
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _nest_flat_train_keys(overrides: dict, names: set[str]) -> dict:
    """Move training-loop keys given at the top level into ``train``: checkpoints written before the
    configs had a ``train`` section hold them there."""
    flat = {k: overrides.pop(k) for k in list(overrides) if k in _TRAIN_KEYS and k not in names}
    if not flat:
        return overrides
    train = overrides.get("train") or {}
    if dataclasses.is_dataclass(train):
        train = dataclasses.asdict(train)
    both = sorted(set(flat) & set(train))
    if both:
        raise ValueError(f"config key(s) {both} given both at the top level and in 'train'")
    overrides["train"] = {**train, **flat}
    return overrides


def make_config(name: str, overrides: dict | None = None):
    """The model's config dataclass with ``overrides`` applied; unknown keys are an error."""
    spec = get_spec(name)
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(spec.config_cls)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    if "train" in names:
        overrides = _nest_flat_train_keys(overrides, names)
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
