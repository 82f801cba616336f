"""What a registered recommender is (``ModelSpec``) and how a model module registers itself.

Each model module ends with ``register(ModelSpec(...))``. Read the registry through
:mod:`visrec_pipeline.recsys.registry`, which imports every model module first; this module
only stores what has registered so far (and imports no model, so model modules can import it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from visrec_pipeline.recsys.base import Recommender

NEED_KINDS = ("features", "spatial", "images", "triples_random", "triples_guided")


@dataclass(frozen=True)
class ModelSpec:
    """``needs`` names side inputs (the Dagster layer maps them to upstream assets and
    ``model_io.build_inputs`` loads them): ``features:<backbone>`` (pooled features),
    ``spatial:<backbone>`` (feature maps), ``images``, ``triples_random``, ``triples_guided``."""

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


# in registration order, which orders the Dagster assets and the reports
_REGISTERED: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; registering the same name twice with a different spec is an error."""
    existing = _REGISTERED.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"model {spec.name!r} is already registered (by {existing.cls.__module__})")
    _REGISTERED[spec.name] = spec
    return spec


def registered_specs() -> dict[str, ModelSpec]:
    """The live registry dict (complete only once :mod:`visrec_pipeline.recsys.models` is imported)."""
    return _REGISTERED
