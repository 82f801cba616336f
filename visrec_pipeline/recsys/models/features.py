"""Pooled visual features as model inputs: validation, masking and normalisation."""

from __future__ import annotations

import numpy as np
import torch

from visrec_pipeline.recsys.base import FitInputs


def pooled_features(inputs: FitInputs, n_items: int, *, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [n_items, d] float32, mask [n_items] bool)`` from ``inputs``, with a clear error when absent
    or misaligned. Rows without an image are zeroed so they add nothing to any score."""
    if inputs.features is None:
        raise ValueError(f"{model} needs pooled visual features (FitInputs.features) but none were given")
    feats = np.asarray(inputs.features)
    if feats.ndim != 2 or feats.shape[0] != n_items:
        raise ValueError(
            f"{model}: FitInputs.features has shape {feats.shape}; expected [n_items={n_items}, d] aligned with the item index"
        )
    f = torch.as_tensor(np.ascontiguousarray(feats, dtype=np.float32))
    if inputs.feature_mask is not None:
        mask = torch.as_tensor(np.asarray(inputs.feature_mask, dtype=bool))
        if mask.shape != (n_items,):
            raise ValueError(f"{model}: FitInputs.feature_mask has shape {tuple(mask.shape)}; expected ({n_items},)")
    else:
        mask = torch.ones(n_items, dtype=torch.bool)
    bad = ~torch.isfinite(f).all(1) & mask
    if bool(bad.any()):
        rows = torch.nonzero(bad).squeeze(1)[:5].tolist()
        raise ValueError(f"{model}: non-finite feature values for item indices {rows} (first 5)")
    f = torch.where(mask.unsqueeze(1), f, torch.zeros((), dtype=f.dtype))
    return f, mask


def normalise(
    features: torch.Tensor, mask: torch.Tensor, *, center: bool, l2: bool, unit_variance: bool = False
) -> torch.Tensor:
    """Optionally subtract the mean over items with features and divide each dimension by its standard
    deviation over them, then L2-normalise rows; masked rows stay zero."""
    f = features
    if (center or unit_variance) and bool(mask.any()):
        rows = f[mask]
        if center:
            f = f - rows.mean(0, keepdim=True)
        if unit_variance:
            f = f / rows.std(0, unbiased=False, keepdim=True).clamp(min=1e-6)
    if l2:
        f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.where(mask.unsqueeze(1), f, torch.zeros((), dtype=f.dtype))
