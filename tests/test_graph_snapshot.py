"""The whole code location, rendered to sorted JSON, matches the committed snapshot.

A refactor of the Dagster layer must keep the graph: asset keys, deps, groups, kinds, code versions,
automation conditions, op config defaults, checks, partitions, pools, jobs, sensors, schedules and
resource keys. When the graph changes on purpose, regenerate the snapshot and review its diff:

    VISREC_UPDATE_SNAPSHOTS=1 uv run --frozen --no-sync pytest -q tests/test_graph_snapshot.py
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import dagster as dg
import pytest
from dagster._config import ConfigTypeKind

from visrec_pipeline.defs.automation import MODEL_CRON_ENV
from visrec_pipeline.defs.refresh import REFRESH_CRON_ENV

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"
UPDATE_ENV = "VISREC_UPDATE_SNAPSHOTS"
REGENERATE = f"{UPDATE_ENV}=1 uv run --frozen --no-sync pytest -q tests/test_graph_snapshot.py"

_SHAPES = (ConfigTypeKind.STRICT_SHAPE, ConfigTypeKind.PERMISSIVE_SHAPE, ConfigTypeKind.SELECTOR)


def _config_type(config_type) -> object:
    kind = config_type.kind
    if kind in _SHAPES:
        return {"kind": kind.value, "fields": {name: _field(f) for name, f in sorted(config_type.fields.items())}}
    if kind in (ConfigTypeKind.NONEABLE, ConfigTypeKind.ARRAY):
        return {"kind": kind.value, "of": _config_type(config_type.inner_type)}
    if kind == ConfigTypeKind.ENUM:
        return {"kind": "ENUM", "values": [v.config_value for v in config_type.enum_values]}
    if kind == ConfigTypeKind.MAP:
        return {"kind": "MAP", "key": _config_type(config_type.key_type), "of": _config_type(config_type.inner_type)}
    return config_type.given_name or config_type.key


def _field(field) -> dict:
    out = {"type": _config_type(field.config_type), "required": field.is_required}
    if field.default_provided:
        out["default"] = field.default_value
    return out


def _op_config(assets_def: dg.AssetsDefinition) -> object:
    schema = assets_def.op.config_schema
    return _config_type(schema.config_type) if schema is not None and schema.config_type is not None else None


def _automation(condition: dg.AutomationCondition | None) -> dict | None:
    """Label and name of the root, and the tree of node classes, labels and descriptions (crons included),
    one line per node, indented by depth."""
    if condition is None:
        return None

    def tree(snapshot, depth: int = 0) -> list[str]:
        node = snapshot.node_snapshot
        line = "  " * depth + f"{node.class_name} [{node.label or node.name}] {node.description}".rstrip()
        return [line, *[ln for child in snapshot.children for ln in tree(child, depth + 1)]]

    return {"label": condition.get_label(), "name": condition.name, "tree": tree(condition.get_snapshot())}


def _partitions(partitions_def) -> str | None:
    return None if partitions_def is None else f"{type(partitions_def).__name__}: {partitions_def}"


def _keys(keys) -> list[str]:
    return sorted(k.to_user_string() for k in keys)


def render_graph(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": _keys(node.parent_keys),
            "kinds": sorted(node.kinds),
            "tags": dict(sorted(node.tags.items())),
            "code_version": node.code_version,
            "pools": sorted(node.pools or ()),
            "partitions": _partitions(node.partitions_def),
            "automation": _automation(node.automation_condition),
            "resources": sorted(node.assets_def.required_resource_keys),
            "config": _op_config(node.assets_def),
        }
    checks = {}
    for key in graph.asset_check_keys:
        node = graph.get(key)
        checks[f"{key.asset_key.to_user_string()}:{key.name}"] = {
            "asset": key.asset_key.to_user_string(),
            "blocking": node.blocking,
            "deps": _keys(node.parent_entity_keys),
            "automation": _automation(node.automation_condition),
        }
    jobs = {}
    for unresolved in defs.jobs:
        job = defs.resolve_job_def(unresolved.name)
        jobs[job.name] = {
            "selection": str(unresolved.selection),
            "assets": _keys(job.asset_layer.executable_asset_keys),
            "partitions": _partitions(job.partitions_def),
            "executor": job.executor_def.name,
        }
    sensors = {
        s.name: {
            "type": type(s).__name__,
            "minimum_interval_seconds": s.minimum_interval_seconds,
            "default_status": s.default_status.value,
            "jobs": sorted(t.job_name for t in s.targets),
            "asset_selection": None if s.asset_selection is None else str(s.asset_selection),
        }
        for s in defs.sensors
    }
    schedules = {
        s.name: {
            "cron": s.cron_schedule,
            "timezone": s.execution_timezone,
            "job": s.job_name,
            "default_status": s.default_status.value,
        }
        for s in defs.schedules
    }
    executor = defs.executor
    return {
        "assets": dict(sorted(assets.items())),
        "asset_checks": dict(sorted(checks.items())),
        "jobs": dict(sorted(jobs.items())),
        "sensors": dict(sorted(sensors.items())),
        "schedules": dict(sorted(schedules.items())),
        "resources": {k: type(v).__name__ for k, v in sorted(defs.resources.items())},
        "executor": {"name": executor.name, "config": executor.apply_config_mapping({}).value},
    }


def render_text(defs: dg.Definitions) -> str:
    return json.dumps(render_graph(defs), indent=2, sort_keys=True, default=str) + "\n"


def test_asset_graph_matches_snapshot():
    overridden = [name for name in (MODEL_CRON_ENV, REFRESH_CRON_ENV) if os.environ.get(name, "").strip()]
    if overridden:
        pytest.skip(f"{', '.join(overridden)} set: the snapshot holds the default crons")
    from visrec_pipeline.definitions import defs

    rendered = render_text(defs)
    if os.environ.get(UPDATE_ENV):
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(rendered)
    expected = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    if rendered != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                rendered.splitlines(keepends=True),
                fromfile=str(SNAPSHOT.relative_to(Path(__file__).parent.parent)),
                tofile="current code location",
            )
        )
        message = (f"The Dagster graph differs from the snapshot. If the change is intended, run\n    {REGENERATE}\n"
                   f"and commit the new snapshot.\n{diff}")
    else:
        message = ""
    assert rendered == expected, message
