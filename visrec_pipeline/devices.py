"""The torch device a config string names; shared by feature extraction and the recommenders."""

from __future__ import annotations

from collections.abc import Collection

import torch


def resolve_device(device: str, *, allowed: Collection[str] | None = None) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a CUDA device is an error.

    ``allowed``: the device names a caller accepts (anything else is a ``ValueError``); None takes any
    torch device string (e.g. ``cuda:1``).
    """
    if allowed is not None and device not in allowed:
        raise ValueError(f"device must be {'|'.join(allowed)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but no CUDA device is available")
    return torch.device(device)
