"""Training one model under several seeds, and finding the checkpoints of those seeds (no dagster).

Seed 0 is the model's own checkpoint (``models/<name>/<name>.pt``), the one recommendations and
the report's panels use. Seed ``k >= 1`` (the config's seed plus ``k``) is stored beside it as
``models/<name>/seed_<k>.pt``, and ``models/<name>/seeds.json`` lists the extra seeds with their
hashes and the hash of the seed-0 checkpoint they were trained with: evaluation scores the extra
seeds only while that manifest matches the current seed-0 checkpoint, so a model retrained later
with fewer seeds (or by another path) never mixes in seeds of an older training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline.trained import checkpoint_path
from visrec_pipeline.pipeline.training import Fitter, TrainedModel, fit_here, train_model
from visrec_pipeline.recsys.checkpoint import CheckpointError, digest_path, recorded_sha256
from visrec_pipeline.recsys.registry import make_config

MANIFEST_FILE = "seeds.json"


def seed_checkpoint_path(ws: Workspace, name: str, seed_index: int) -> Path:
    """Where seed ``seed_index`` of model ``name`` lives (0: the model's own checkpoint)."""
    if seed_index < 0:
        raise ValueError(f"seed index must be >= 0, got {seed_index}")
    return checkpoint_path(ws, name) if seed_index == 0 else ws.models_dir / name / f"seed_{seed_index}.pt"


def manifest_path(ws: Workspace, name: str) -> Path:
    return ws.models_dir / name / MANIFEST_FILE


def with_seed(name: str, config: dict | None, offset: int) -> dict:
    """``config`` with the model's seed (``train.seed`` for triple-trained models, else ``seed``)
    moved ``offset`` from the seed it names (or its default)."""
    config = copy.deepcopy(dict(config or {}))
    resolved = make_config(name, config)
    train = getattr(resolved, "train", None)
    if train is not None and not any(f.name == "seed" for f in dataclasses.fields(resolved)):
        base = train.seed
        if "seed" in config:  # a flat training key: make_config moves it under train
            config["seed"] = base + offset
        else:
            section = config.get("train") or {}
            section = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
            config["train"] = {**section, "seed": base + offset}
        return config
    config["seed"] = int(getattr(resolved, "seed", 0)) + offset
    return config


def train_seeds(
    ws: Workspace,
    name: str,
    config: dict | None,
    seeds: int,
    *,
    use_tuned: bool = False,
    refit: bool = False,
    log: logging.Logger | None = None,
    fitter: Fitter = fit_here,
) -> list[TrainedModel]:
    """Train model ``name`` under ``seeds`` seeds, one after the other (one model in memory at a time):
    seed 0 with ``config`` as given, seed ``k`` with its seed moved by ``k``; ``use_tuned`` and
    ``refit`` (and ``fitter``) as in :func:`train_model`, for every seed. Writes the manifest and removes the files of
    seeds beyond ``seeds`` left by an earlier training."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    manifest_path(ws, name).unlink(missing_ok=True)  # until the new seeds are all written
    trained = []
    for k in range(seeds):
        if log is not None and seeds > 1:
            log.info(f"{name}: training seed {k + 1} of {seeds}")
        cfg = dict(config or {}) if k == 0 else with_seed(name, config, k)
        trained.append(
            train_model(
                ws, name, cfg, use_tuned=use_tuned, refit=refit, log=log, path=seed_checkpoint_path(ws, name, k),
                fitter=fitter,
            )
        )
    _remove_seeds_from(ws, name, seeds)
    if seeds > 1:
        record = {
            "seed_0_sha256": trained[0].checkpoint_sha256,
            "seeds": {str(k): t.checkpoint_sha256 for k, t in enumerate(trained) if k > 0},
        }
        with atomic_path(manifest_path(ws, name), suffix=".json") as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    return trained


def _remove_seeds_from(ws: Workspace, name: str, first: int) -> None:
    for path in (ws.models_dir / name).glob("seed_*.pt"):
        index = path.stem.removeprefix("seed_")
        if index.isdigit() and int(index) >= first:
            digest_path(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)


def trained_seeds(ws: Workspace, name: str) -> list[tuple[int, Path]]:
    """``(seed index, checkpoint)`` of every seed of model ``name`` trained together with its current
    seed-0 checkpoint (just seed 0 when there is no valid manifest; it may itself be missing)."""
    main = checkpoint_path(ws, name)
    out = [(0, main)]
    try:
        record = json.loads(manifest_path(ws, name).read_text())
    except (OSError, ValueError):
        return out
    if not isinstance(record, dict) or not record.get("seed_0_sha256") or record["seed_0_sha256"] != _sha(main):
        return out  # written with an older seed-0 checkpoint
    for key, sha in sorted((record.get("seeds") or {}).items(), key=lambda kv: int(kv[0])):
        path = seed_checkpoint_path(ws, name, int(key))
        # a seed file replaced since is not this training's (load_checkpoint then checks the bytes)
        if sha and _sha(path) == sha:
            out.append((int(key), path))
    return out


def _sha(path: Path) -> str | None:
    try:
        return recorded_sha256(path)
    except CheckpointError:
        return None  # an unreadable hash file: loading that checkpoint says so
