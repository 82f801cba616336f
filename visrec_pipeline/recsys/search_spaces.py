"""The hyper-parameter space ``tuning_<model>`` searches for each tunable model (no dagster, no optuna).

A space names config keys by their dotted path in the model's config (``train.lr`` is
``config.train.lr``) with a range or a list of choices. Its *default point* is the model's own
default config (the paper's or the tutorial's values, documented next to each model), read from
the config dataclass, so a change of a model's defaults moves the default point with it; the
default point must lie inside the space (``default_point`` checks). ``fixed`` holds overrides every
trial gets (EASE: the search replaces its built-in lambda grid).

Models without hyper-parameters (``random``, ``most_popular``) have no space and no tuning asset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from visrec_pipeline.recsys.registry import get_spec, make_config


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (``log`` for a log scale) or ``choices``."""

    key: str  # dotted path in the model config
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def __post_init__(self):
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError(f"search parameter {self.key}: a categorical parameter needs choices")
        elif self.kind in ("float", "int"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"search parameter {self.key}: needs low < high, got {self.low}, {self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"search parameter {self.key}: a log range needs low > 0, got {self.low}")
        else:
            raise ValueError(f"search parameter {self.key}: kind must be float|int|categorical, got {self.kind!r}")

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices)}"
        return f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log scale)" if self.log else "")


@dataclass(frozen=True)
class SearchSpace:
    model: str
    params: tuple[Param, ...]
    fixed: dict = field(default_factory=dict)  # nested overrides every trial (and the tuned config) gets
    note: str = ""

    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def _get_path(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def nested_overrides(flat: dict[str, Any]) -> dict:
    """``{"train.lr": 1e-3, "reg": 1e-4}`` -> ``{"train": {"lr": 1e-3}, "reg": 1e-4}``."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def merge_overrides(base: dict, top: dict) -> dict:
    """``base`` with ``top`` applied, nested dicts merged key by key (``top`` wins)."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if dataclasses.is_dataclass(below) and not isinstance(below, type):
            below = dataclasses.asdict(below)
        out[key] = merge_overrides(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return out


def default_point(space: SearchSpace) -> dict[str, Any]:
    """The model's default value of every searched key (its default config with ``fixed`` applied);
    a ValueError when one lies outside its range: the space must contain the default config."""
    config = make_config(space.model, space.fixed)
    point = {p.key: _get_path(config, p.key) for p in space.params}
    outside = [f"{p.key}={point[p.key]!r} ({p.describe()})" for p in space.params if not p.contains(point[p.key])]
    if outside:
        raise ValueError(f"{space.model}: default config outside the search space: {', '.join(outside)}")
    return point


def _log_float(key: str, low: float, high: float) -> Param:
    return Param(key, "float", low, high, log=True)


# The ranges span about a decade or more on each side of the defaults; structural sizes (layer
# widths, embedding sizes) stay at the paper's/tutorial's values except BPR-MF's factors, which set
# its cost and are its only capacity knob.
_TRIPLE_LR_REG = (_log_float("train.lr", 3e-4, 3e-2), _log_float("reg", 1e-6, 1e-2))

SEARCH_SPACES: dict[str, SearchSpace] = {
    space.model: space
    for space in (
        SearchSpace("bpr_mf", (*_TRIPLE_LR_REG, Param("factors", "categorical", choices=(50, 100, 200)))),
        SearchSpace(
            "ease",
            (_log_float("l2", 1.0, 5000.0),),
            fixed={"l2_grid": ()},
            note="the search replaces EASE's built-in validation grid over lambda (l2_grid)",
        ),
        SearchSpace(
            "visrank",
            (
                Param("agg", "categorical", choices=("max", "mean", "topk_mean")),
                Param("top_t", "int", 2, 10),
                Param("center", "categorical", choices=(False, True)),
            ),
            note="top_t matters only for agg=topk_mean",
        ),
        SearchSpace(
            "vbpr",
            (
                *_TRIPLE_LR_REG,
                _log_float("reg_visual", 1e-6, 1e-2),
                Param("feature_scale", "categorical", choices=("l2", "standard", "none")),
            ),
        ),
        SearchSpace(
            "dvbpr",
            (_log_float("train.lr", 1e-5, 1e-3), _log_float("reg", 1e-4, 1e-2), _log_float("train.weight_decay", 1e-5, 1e-3)),
            note="a CNN trained end to end: expensive, left out of the default tuning job",
        ),
        *(
            SearchSpace(
                name,
                (
                    _log_float("train.lr", 1e-4, 1e-2),
                    _log_float("train.weight_decay", 1e-6, 1e-3),
                    Param("feature_scale", "categorical", choices=("standard", "l2")),
                ),
            )
            for name in ("curatornet", "curatornet_random")
        ),
        SearchSpace(
            "acf",
            (_log_float("train.lr", 1e-3, 3e-2), _log_float("reg", 1e-6, 1e-2), _log_float("train.weight_decay", 1e-7, 1e-4)),
        ),
    )
}

# the tuning assets of these are defined but not part of the default tuning job (cost)
EXPENSIVE_TO_TUNE = frozenset({"dvbpr"})


def get_search_space(name: str) -> SearchSpace:
    get_spec(name)  # an unknown model is named as such
    try:
        return SEARCH_SPACES[name]
    except KeyError:
        raise KeyError(f"model {name!r} has no search space (tunable: {sorted(SEARCH_SPACES)})") from None


def config_has_train(name: str) -> bool:
    """Whether the model's config nests a training loop (``train``: epochs, seed, device)."""
    return "train" in {f.name for f in dataclasses.fields(get_spec(name).config_cls)}
