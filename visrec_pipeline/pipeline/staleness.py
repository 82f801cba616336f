"""Is a checkpoint still about the workspace's data? Its recorded data versions against the current ones (no dagster).

A checkpoint records the fingerprints of the tables it was trained on and the feature weights and
item counts it read (:mod:`visrec_pipeline.pipeline.provenance`). Scoring it against another split
or catalogue gives numbers that look right and are not (a holdout item the model trained on, an
item index that moved), so loading refuses it until the model is trained again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from visrec_pipeline.model_io import data_versions
from visrec_pipeline.pipeline.provenance import feature_provenance

# inputs every model's scores depend on; item_images only matters to models that read images or features
_ALWAYS = ("split_train", "split_holdout", "item_catalog")
_VISUAL_NEEDS = ("features", "spatial", "images")


@dataclass(frozen=True)
class VersionChange:
    key: str  # a table (split_train, item_catalog, ...) or <backbone>_weights / <backbone>_items
    trained_on: str
    now: str

    def describe(self) -> str:
        backbone, _, what = self.key.rpartition("_")
        if backbone and what in ("weights", "items"):
            label = f"{backbone} features ({'weights tag' if what == 'weights' else 'items indexed'})"
        else:
            label = f"table {self.key} (content fingerprint)"
        return f"{label}: trained on {self.trained_on}, now {self.now}"


class StaleCheckpointError(RuntimeError):
    """A checkpoint trained on other data than the workspace holds now."""

    def __init__(self, name: str, path: Path, changes: list[VersionChange]):
        self.name = name
        self.path = Path(path)
        self.changes = changes
        super().__init__(
            f"refusing the checkpoint of {name} ({self.path}): it was trained on other data than the workspace "
            f"holds now; {'; '.join(c.describe() for c in changes)}. Scored against this data its metrics and "
            f"recommendations would be wrong: re-materialize model_{name} (train it again) before evaluating it or "
            "recommending with it"
        )


def compared_keys(needs) -> tuple[str, ...]:
    """The recorded versions that matter to a model with inputs ``needs`` (``ModelSpec.needs``)."""
    visual = any(n.partition(":")[0] in _VISUAL_NEEDS for n in needs)
    return _ALWAYS + (("item_images",) if visual else ())


def current_versions(conn: duckdb.DuckDBPyConnection, needs) -> dict[str, str]:
    """The workspace's versions now, as :func:`~visrec_pipeline.pipeline.training.train_model` records them."""
    return {**data_versions(conn), **{k: str(v) for k, v in feature_provenance(conn, needs).items()}}


def changed_versions(trained_on: dict[str, str], now: dict[str, str], needs) -> list[VersionChange]:
    """The versions a model with inputs ``needs`` was trained on that differ now. Only keys the
    checkpoint recorded are compared (an older checkpoint recorded fewer)."""
    feature_keys = sorted(k for k in trained_on if k.endswith(("_weights", "_items")) and k not in _ALWAYS)
    keys = [k for k in (*compared_keys(needs), *feature_keys) if k in trained_on]
    return [VersionChange(k, str(trained_on[k]), now.get(k, "absent")) for k in keys if str(trained_on[k]) != now.get(k, "absent")]
