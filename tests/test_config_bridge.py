"""The Dagster config generated from the model config dataclasses: nested sections, defaults, round trips.

No ``from __future__ import annotations``: Dagster reads the op's config annotation at definition time.
"""

import dataclasses

import dagster as dg
import pytest

from visrec_pipeline.defs.config_bridge import config_class_for, to_dataclass_kwargs
from visrec_pipeline.recsys.registry import MODEL_SPECS, make_config

TRIPLE_TRAINED = ["bpr_mf", "vbpr", "dvbpr", "curatornet", "curatornet_random", "acf"]


def _run_config_values(config_cls: type[dg.Config], op_config: dict) -> dict:
    """What Dagster's run-config processing makes of ``op_config`` for an op taking ``config_cls``."""

    @dg.op(name="fit_model")
    def fit_model(config: config_cls):  # type: ignore[valid-type]
        return None

    @dg.job
    def job():
        fit_model()

    return dg.validate_run_config(job, {"ops": {"fit_model": {"config": op_config}}})["ops"]["fit_model"]["config"]


@pytest.mark.parametrize("name", TRIPLE_TRAINED)
def test_triple_trained_models_get_a_nested_train_section_with_their_defaults(name):
    spec = MODEL_SPECS[name]
    defaults = spec.config_cls()
    config_cls = config_class_for(spec.config_cls, f"{name.title().replace('_', '')}Config")
    train_field = config_cls.model_fields["train"]
    assert issubclass(train_field.annotation, dg.Config)
    assert train_field.default.model_dump() == dataclasses.asdict(defaults.train)
    # a run config may name one training setting: Dagster fills in this model's other defaults
    values = _run_config_values(config_cls, {"train": {"epochs": 2}})
    assert values["train"] == {**dataclasses.asdict(defaults.train), "epochs": 2}
    # and what the model asset builds from the launchpad's defaults is the dataclass's default
    assert make_config(name, to_dataclass_kwargs(spec.config_cls, config_cls())) == defaults
    assert make_config(name, _run_config_values(config_cls, {})) == defaults


def test_flat_training_keys_are_refused_by_the_launchpad():
    config_cls = config_class_for(MODEL_SPECS["vbpr"].config_cls, "VbprConfigFlatCheck")
    with pytest.raises(dg.DagsterInvalidConfigError, match="epochs"):
        _run_config_values(config_cls, {"epochs": 2})


def test_every_model_config_round_trips_through_the_launchpad():
    for name, spec in MODEL_SPECS.items():
        default = spec.config_cls()
        config_cls = config_class_for(spec.config_cls, f"RoundTrip{name.title().replace('_', '')}")
        kwargs = to_dataclass_kwargs(spec.config_cls, config_cls())
        expected = default
        if name in TRIPLE_TRAINED:
            kwargs["train"]["epochs"] = 3
            expected = dataclasses.replace(default, train=dataclasses.replace(default.train, epochs=3))
        assert make_config(name, kwargs) == expected, name
