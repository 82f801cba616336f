"""Cosine nearest neighbours of a few query vectors over a catalogue streamed in chunks."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from visrec_pipeline.embeddings.kmeans import l2_normalize


def cosine_neighbours(
    query_ids: np.ndarray,
    query_features: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(ids [q, k], cosine [q, k])`` per query over ``chunks`` of ``(item_ids, features)``,
    excluding each query itself; a running top-k keeps memory at one chunk. Short rows pad with id -1."""
    q = l2_normalize(torch.from_numpy(np.array(query_features, dtype=np.float32)))
    qids = torch.from_numpy(np.array(query_ids, dtype=np.int64))
    best_s = torch.empty(len(q), 0)
    best_i = torch.empty(len(q), 0, dtype=torch.long)
    for ids, feats in chunks:
        ids_t = torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: ids may be a read-only view
        f = np.asarray(feats, dtype=np.float32)
        f = torch.from_numpy(f if f.flags.writeable else f.copy())
        # divide the [q, n] scores by the row norms rather than normalising the [n, d] chunk: one pass less
        s = (q @ f.T) / torch.linalg.vector_norm(f, dim=1).clamp_min(1e-12)[None, :]
        s = s.masked_fill(ids_t[None, :] == qids[:, None], float("-inf"))
        cat_s = torch.cat([best_s, s], 1)
        cat_i = torch.cat([best_i, ids_t.expand(len(q), -1)], 1)
        top = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_s, best_i = top.values, cat_i.gather(1, top.indices)
    best_i = best_i.masked_fill(torch.isinf(best_s), -1)
    return best_i.numpy(), best_s.numpy()
