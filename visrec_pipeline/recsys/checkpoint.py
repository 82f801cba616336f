"""Model checkpoints without pickle of arbitrary objects.

A checkpoint is one ``torch.save`` of a plain structure (dict / list / str / int /
float / bool / None / Tensor), written atomically (temp file + rename), and read back
with ``torch.load(weights_only=True)``, which refuses anything else. It carries the
model name, its config, the tensors, the data versions it was trained on and the
training history.

Next to ``<name>.pt`` lies ``<name>.pt.sha256`` (``sha256sum`` format), written after it: the
SHA-256 of the checkpoint's bytes, checked on every load, so a damaged file is refused instead of
scoring silently wrong. The checkpoint is serialized in memory first, so the free space is
checked before anything is written and a full disk is an ``OSError(ENOSPC)`` naming the file.
A checkpoint without a sidecar (written before the hashes existed) loads unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from visrec_pipeline.diskspace import require_free_space, write_bytes_atomically
from visrec_pipeline.recsys.base import TrainHistory

FORMAT = "visrec-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "model_name", "config", "state", "data_versions", "history")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read safely."""


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain data; tuples become lists, tensors are detached to compact CPU copies."""
    if value is None:
        return None
    # exact builtin types: subclasses (e.g. torch's TorchVersion, IntEnum) would be pickled as classes
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, torch.Tensor):
        # clone: a view would otherwise save its whole underlying storage
        return value.detach().to("cpu").clone()
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}; only str keys are allowed")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return _plain(value.item(), where)
    raise CheckpointError(
        f"{where}: a {type(value).__module__}.{type(value).__name__} cannot go into a checkpoint "
        "(allowed: dict, list, str, int, float, bool, None, torch.Tensor)"
    )


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_name: str,
    config: dict,
    state: dict[str, torch.Tensor],
    data_versions: dict[str, str],
    history: TrainHistory | dict,
    extra: dict | None = None,
) -> Path:
    """Write the checkpoint atomically; returns its path."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(history, TrainHistory):
        history = dataclasses.asdict(history)
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"state[{k!r}] is a {type(v).__name__}; model state must hold tensors only")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": str(model_name),
        "config": _plain(config, "config"),
        "state": _plain(state, "state"),
        "data_versions": {str(k): str(v) for k, v in data_versions.items()},
        "history": _plain(history, "history"),
        "extra": _plain(extra or {}, "extra"),
        "saved_at": time.time(),
        "torch_version": str(torch.__version__),
    }
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    require_free_space(path, len(data))  # before the old hash is removed: a full disk changes nothing
    # the old hash goes first: a run that dies before the new one is written leaves a complete
    # (atomically renamed) checkpoint without a hash, never a good checkpoint with a wrong hash
    digest_path(path).unlink(missing_ok=True)
    write_bytes_atomically(path, data)
    write_bytes_atomically(digest_path(path), f"{digest}  {path.name}\n".encode())
    return path


def digest_path(path: str | os.PathLike) -> Path:
    """The sidecar holding a checkpoint's SHA-256: ``<name>.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 recorded next to the checkpoint ``path`` when it was written; None when it has no
    hash file (written before hashes were recorded, or by a run that died between the two files)."""
    path = Path(path)
    sidecar = digest_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(errors="replace").split()
    if not fields or len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0]):
        raise CheckpointError(f"refusing checkpoint {path}: its hash file {sidecar} is unreadable")
    return fields[0]


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; anything but plain data is refused, and so is a
    file whose SHA-256 differs from the one recorded when it was written."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = path.read_bytes()  # read once: hashed, then parsed from memory
    expected = recorded_sha256(path)
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(
                f"refusing checkpoint {path}: it is damaged (SHA-256 {actual[:16]}..., but {expected[:16]}... "
                f"was recorded in {digest_path(path).name} when it was written); train the model again"
            )
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        raise CheckpointError(f"refusing checkpoint {path}: not plain data or not a torch file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a visrec checkpoint (missing format marker)")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this code ({FORMAT_VERSION})"
        )
    return payload
