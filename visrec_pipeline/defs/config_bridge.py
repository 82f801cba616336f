"""Dagster ``Config`` classes generated from the recommender library's config dataclasses.

The dataclass stays the single source of truth (defaults, validation); the UI
launchpad gets a typed, documented config with the same fields. Nested
dataclasses become nested ``Config`` classes; tuples become lists.
"""

from __future__ import annotations

import dataclasses
import typing

import dagster as dg
import pydantic


def _config_type(annotation):
    if dataclasses.is_dataclass(annotation):
        return config_class_for(annotation)
    if typing.get_origin(annotation) is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return list[args[0]] if args else list
    return annotation


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return ...
    if dataclasses.is_dataclass(value):
        return config_class_for(type(value))(**_plain(dataclasses.asdict(value)))
    if isinstance(value, tuple):
        return list(value)
    return value


def _plain(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


_CACHE: dict[type, type[dg.Config]] = {}


def config_class_for(dc: type, name: str | None = None) -> type[dg.Config]:
    """A ``dg.Config`` subclass with the dataclass's fields and defaults."""
    if dc in _CACHE and name is None:
        return _CACHE[dc]
    hints = typing.get_type_hints(dc)
    fields = {f.name: (_config_type(hints[f.name]), _default(f)) for f in dataclasses.fields(dc)}
    cls = pydantic.create_model(name or f"{dc.__name__}Dagster", __base__=dg.Config, __doc__=dc.__doc__, **fields)  # type: ignore[call-overload]
    if name is None:
        _CACHE[dc] = cls
    return cls


def to_dataclass_kwargs(dc: type, config: dg.Config) -> dict:
    """Config values as plain data for ``dc``; lists become tuples where the dataclass wants tuples.

    Nested configs stay dicts: the library's dataclasses accept dicts for nested configs.
    """
    values = config.model_dump()
    hints = typing.get_type_hints(dc)
    for key, value in values.items():
        if typing.get_origin(hints.get(key)) is tuple and isinstance(value, list):
            values[key] = tuple(value)
    return values
