"""Pooled visual features as model inputs: validation, masking and normalisation."""

from __future__ import annotations

import numpy as np
import torch

from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.row_blocks import iter_row_blocks


def pooled_features(inputs: FitInputs, n_items: int, *, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [n_items, d] float32, mask [n_items] bool)`` from ``inputs``, with a clear error when absent
    or misaligned. Rows without an image are zeroed so they add nothing to any score."""
    if inputs.features is None:
        raise ValueError(f"{model} needs pooled visual features (FitInputs.features) but none were given")
    feats = inputs.features
    shape = tuple(getattr(feats, "shape", np.shape(feats)))
    if len(shape) != 2 or shape[0] != n_items:
        raise ValueError(
            f"{model}: FitInputs.features has shape {shape}; expected [n_items={n_items}, d] aligned with the item index"
        )
    if inputs.feature_mask is not None:
        mask = torch.as_tensor(np.asarray(inputs.feature_mask, dtype=bool))
        if mask.shape != (n_items,):
            raise ValueError(f"{model}: FitInputs.feature_mask has shape {tuple(mask.shape)}; expected ({n_items},)")
    else:
        mask = torch.ones(n_items, dtype=torch.bool)
    # the one in-RAM copy, filled block by block (a memory-mapped input is never resident all at once)
    f = torch.empty(shape, dtype=torch.float32)
    bad = torch.zeros(n_items, dtype=torch.bool)
    for start, rows in iter_row_blocks(feats):
        block = f[start : start + len(rows)]
        block.copy_(torch.from_numpy(np.asarray(rows, dtype=np.float32)))
        bad[start : start + len(rows)] = ~torch.isfinite(block).all(1)
    bad &= mask
    if bool(bad.any()):
        rows = torch.nonzero(bad).squeeze(1)[:5].tolist()
        raise ValueError(f"{model}: non-finite feature values for item indices {rows} (first 5)")
    f[~mask] = 0.0
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
