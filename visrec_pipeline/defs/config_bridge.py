"""Dagster ``Config`` classes generated from the recommender library's config dataclasses.

The dataclass stays the single source of truth (defaults, validation); the UI
launchpad gets a typed, documented config with the same fields. Nested
dataclasses become nested ``Config`` classes whose defaults are the owner's
(e.g. each model's ``train`` section has that model's training defaults, so a
run config may set ``train.epochs`` alone); tuples become lists.
"""

from __future__ import annotations

import dataclasses
import typing

import dagster as dg
import pydantic


def _dataclass_default(field: dataclasses.Field):
    """The field's default value, or ``...`` (required) when it has none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return ...


def _config_field(annotation, value, nested_name: str):
    """``(type, default)`` of one Config field for a dataclass field of type ``annotation``."""
    if dataclasses.is_dataclass(annotation):
        if value is ...:
            return config_class_for(annotation), ...
        nested = config_class_for(annotation, nested_name, defaults=value)
        return nested, nested()
    if typing.get_origin(annotation) is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        annotation = list[args[0]] if args else list
    return annotation, list(value) if isinstance(value, tuple) else value


_CACHE: dict[type, type[dg.Config]] = {}


def config_class_for(dc: type, name: str | None = None, *, defaults: object | None = None) -> type[dg.Config]:
    """A ``dg.Config`` subclass with the dataclass's fields; their defaults are the dataclass's, or the
    values of ``defaults`` (an instance of ``dc``) when given."""
    plain = name is None and defaults is None
    if plain and dc in _CACHE:
        return _CACHE[dc]
    name = name or f"{dc.__name__}Dagster"
    hints = typing.get_type_hints(dc)
    fields = {
        f.name: _config_field(
            hints[f.name],
            getattr(defaults, f.name) if defaults is not None else _dataclass_default(f),
            name + f.name.title().replace("_", ""),
        )
        for f in dataclasses.fields(dc)
    }
    cls = pydantic.create_model(name, __base__=dg.Config, __doc__=dc.__doc__, **fields)  # type: ignore[call-overload]
    if plain:
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
