"""Vectorised full-ranking metrics (``shared/spec/evaluation.md``) for one batch of score rows.

The ranking of a row is every catalogue item except the *excluded* (profile) items, ordered by
score descending with ties broken by item index ascending. The 0-based rank of a relevant item
``i`` is therefore

    rank(i) = #{candidates j : s_j > s_i} + #{candidates j : s_j == s_i and j < i}

and it is computed by comparing ``s_i`` with the whole score row in item chunks, never by sorting
the row. Memory per step is ``b x slots x chunk`` booleans, whatever the catalogue size. On a CPU
that main pass runs in numpy (several times faster than torch on column slices), elsewhere in
torch; the results are identical.

How the tie rule is evaluated in one comparison per element: for a chunk that lies wholly
*before* item ``i`` (all ``j < i``) "above" means ``s_j >= s_i``, which for floats is
``s_j > nextafter(s_i, -inf)``; for the chunk holding ``i`` and every later chunk it means
``s_j > s_i``. The items of ``i``'s own chunk that precede ``i`` and tie with it are then added
from a gathered window of at most one chunk. Profile items are not masked in the row: the same
counts are taken over the (few) gathered profile scores and subtracted, which removes them from
the ranking exactly, even where a candidate itself scores ``-inf``.

``reference_row_metrics`` is the straightforward per-row oracle (a stable argsort of the row) used
by the tests and the benchmark; never call it in the pipeline.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch

Protocol = Literal["standard", "tutorial"]
PROTOCOLS: tuple[str, ...] = ("standard", "tutorial")

# b x slots x chunk elements per comparison step: ~1 MiB of booleans stays in cache on a CPU;
# a GPU wants bigger steps to amortise kernel launches.
_CPU_STEP_ELEMENTS = 1 << 19
_GPU_STEP_ELEMENTS = 1 << 24
_MIN_CHUNK = 256
_SWAR_MAX = 8 * 255  # longest run that _count adds 8 flags at a time
_PREFERRED_CHUNK = _SWAR_MAX


def metric_names(ks: Sequence[int]) -> list[str]:
    """Column names in report order: auc, rr, then recall@k, precision@k, ndcg@k for each k."""
    names = ["auc", "rr"]
    for k in ks:
        names += [f"recall@{k}", f"precision@{k}", f"ndcg@{k}"]
    return names


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise ValueError(f"cut-offs ks must be positive integers, got {list(ks)!r}")
        if int(k) not in out:
            out.append(int(k))
    return tuple(out)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def ideal_dcg(n: int) -> np.ndarray:
    """``out[m] = sum_{r=0}^{m-1} 1/log2(r+2)`` for ``m = 0..n`` (float64)."""
    out = np.zeros(n + 1, np.float64)
    if n:
        out[1:] = np.cumsum(1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0))
    return out


def _rankable(scores: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype that ``nextafter`` supports, order-preserving and exact."""
    if scores.dtype in (torch.float32, torch.float64):
        return scores
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.float()
    return scores.double()


def _step_elements(device: torch.device) -> int:
    return _GPU_STEP_ELEMENTS if device.type != "cpu" else _CPU_STEP_ELEMENTS


def _denormals_compare_exactly(device: torch.device | None = None) -> bool:
    """False when comparisons flush denormal inputs to zero (DAZ, set process-wide on a CPU by
    some fast-math builds): then ``x > nextafter(0, -inf)`` is ``x > 0`` and the ">= 0" threshold
    needs the smallest normal instead (denormal scores then read as 0 everywhere anyway).
    ``device=None`` checks numpy, else torch on that device."""
    if device is None:
        zero = np.zeros(16, np.float32)
        return bool(np.greater(zero, np.nextafter(zero, np.float32(-1))).all())
    zero = torch.zeros(16, dtype=torch.float32, device=device)
    return bool((zero > torch.nextafter(zero, torch.full_like(zero, -1.0))).all())


def _ge_threshold(s, xp):
    """``t`` with ``x > t  <=>  x >= s`` for every score ``x`` (``s`` finite or +inf; numpy or torch)."""
    if xp is np:
        t = np.nextafter(s, s.dtype.type(-np.inf))
        tiny, exact = np.finfo(s.dtype).tiny, _denormals_compare_exactly()
    else:
        t = torch.nextafter(s, torch.tensor(-math.inf, dtype=s.dtype, device=s.device))
        tiny, exact = torch.finfo(s.dtype).tiny, _denormals_compare_exactly(s.device)
    if not exact:
        t = xp.where((t < 0) & (t > -tiny), xp.full_like(t, -tiny), t)
    return t


def _count(flags: torch.Tensor) -> torch.Tensor:
    """Number of Trues along the last dim (torch), as int32."""
    return flags.view(torch.uint8).sum(-1, dtype=torch.int32)


def _count_np(flags: np.ndarray) -> np.ndarray:
    """Number of Trues along the last dim (numpy), as int64.

    A run of at most 2040 flags is counted 8 at a time: the bools are read as int64 words (one
    flag per byte) and summed; each byte lane then holds at most 255, so no carry crosses lanes
    (wrap-around of the signed word is harmless), and the 8 lanes are added at the end. That makes
    the count several times cheaper than the comparison that produced the flags.
    """
    n = flags.shape[-1]
    if n % 8 == 0 and 0 < n <= _SWAR_MAX and flags.strides[-1] == 1 and flags.flags.c_contiguous:
        lanes = flags.view(np.int64).sum(-1, dtype=np.int64)
        return lanes[..., None].view(np.uint8).sum(-1, dtype=np.int64)
    return flags.sum(-1, dtype=np.int64)


def _above_numpy(S: np.ndarray, items: np.ndarray, s: np.ndarray, chunk: int) -> np.ndarray:
    """CPU main pass: ``#{j : s_j > s_i} + #{j < i : s_j == s_i}`` for ``[rows, g]`` relevant
    items over the rows ``S`` ``[rows, n_items]``. numpy, not torch: torch's comparison of a
    column slice of a row-major matrix runs several times slower than numpy's here."""
    rows, n_items = S.shape
    g = items.shape[1]
    s_prev = _ge_threshold(s, np)  # s_j >= s  <=>  s_j > s_prev  (finite s or +inf)
    s_is_neg_inf = s == -np.inf  # s_j >= -inf holds for every j
    count = np.zeros((rows, g), np.int64)
    flags = np.empty((rows, g, chunk), bool)
    for c0 in range(0, n_items, chunk):
        c1 = min(c0 + chunk, n_items)
        before = items >= c1  # the whole chunk precedes the relevant item
        threshold = np.where(before, s_prev, s)
        out = flags if c1 - c0 == chunk else np.empty((rows, g, c1 - c0), bool)
        np.greater(S[:, None, c0:c1], threshold[:, :, None], out=out)
        count += np.where(before & s_is_neg_inf, c1 - c0, _count_np(out))
    # ties preceding the item inside its own chunk (counted with ">" above): a window of one chunk
    start = items // chunk * chunk
    w0 = np.minimum(start, n_items - chunk)  # the last chunk may be short: window ends at n_items
    windows = np.lib.stride_tricks.sliding_window_view(S, chunk, axis=1)
    window = windows[np.arange(rows)[:, None], w0]  # [rows, g, chunk], contiguous copies
    tied = window == s[..., None]
    if (_count_np(tied) > 1).any():  # some item ties with another one in its window
        offset = np.arange(chunk, dtype=np.int16)  # chunk <= 2040 here, or small
        tied &= offset < (items - w0).astype(np.int16)[..., None]
        if (start != w0).any():
            tied &= offset >= (start - w0).astype(np.int16)[..., None]
        count += _count_np(tied)
    return count


def _above_torch(S: torch.Tensor, items: torch.Tensor, s: torch.Tensor, chunk: int) -> torch.Tensor:
    """The same main pass in torch (GPU, or any device): see :func:`_above_numpy`."""
    rows, n_items = S.shape
    s_prev = _ge_threshold(s, torch)
    s_is_neg_inf = s == -math.inf
    count = torch.zeros(items.shape, dtype=torch.long, device=S.device)
    for c0 in range(0, n_items, chunk):
        c1 = min(c0 + chunk, n_items)
        before = items >= c1
        threshold = torch.where(before, s_prev, s)
        above = _count(S[:, None, c0:c1] > threshold.unsqueeze(2))
        count += torch.where(before & s_is_neg_inf, c1 - c0, above)
    start = items // chunk * chunk
    w0 = start.clamp(max=n_items - chunk)
    window = S.unfold(1, chunk, 1)[torch.arange(rows, device=S.device).unsqueeze(1), w0]  # [rows, g, chunk]
    offset = torch.arange(chunk, device=S.device)
    in_window = (offset >= (start - w0).unsqueeze(2)) & (offset < (items - w0).unsqueeze(2))
    count += _count((window == s.unsqueeze(2)) & in_window)
    return count


def relevant_ranks(
    scores: torch.Tensor,
    relevant: torch.Tensor,
    relevant_mask: torch.Tensor,
    excluded: torch.Tensor,
    excluded_mask: torch.Tensor,
    *,
    item_chunk: int = 32768,
    backend: Literal["auto", "numpy", "torch"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based candidate ranks of the relevant items and the candidate count of every row.

    ``scores`` ``[b, n_items]`` (no NaN); ``relevant`` ``[b, r]`` item indices with ``relevant_mask``
    (padding slots are ignored; entries of a row must be distinct); ``excluded`` ``[b, L]`` with
    ``excluded_mask``: the profile. An excluded item that is also relevant stays a candidate
    (items to predict are never removed). Returns ``(ranks [b, r] int64, n_candidates [b] int64)``;
    ranks of padding slots are meaningless. ``backend``: the main pass runs in numpy for CPU
    scores (``auto``), in torch otherwise; both give identical ranks.
    """
    scores = _rankable(scores.detach())
    b, n_items = scores.shape
    device = scores.device
    relevant = relevant.to(device=device, dtype=torch.long)
    relevant_mask = relevant_mask.to(device=device, dtype=torch.bool)
    excluded = excluded.to(device=device, dtype=torch.long)
    excluded_mask = excluded_mask.to(device=device, dtype=torch.bool)
    r = relevant.shape[1]
    if relevant.shape[0] != b or excluded.shape[0] != b:
        raise ValueError(f"batch sizes differ: scores {b}, relevant {relevant.shape[0]}, excluded {excluded.shape[0]}")
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    use_numpy = device.type == "cpu" and backend != "torch"
    if backend == "numpy" and device.type != "cpu":
        raise ValueError("backend='numpy' needs scores on the CPU")

    # an excluded item that is also relevant is kept as a candidate
    if excluded.shape[1] and r:
        row = torch.arange(b, device=device).unsqueeze(1) * n_items
        rel_keys = torch.sort((relevant + row)[relevant_mask]).values
        if rel_keys.numel():
            ex_keys = excluded + row
            at = torch.searchsorted(rel_keys, ex_keys).clamp_(max=rel_keys.numel() - 1)
            excluded_mask = excluded_mask & (rel_keys[at] != ex_keys)
    n_candidates = n_items - excluded_mask.sum(1)
    ranks = torch.zeros((b, r), dtype=torch.long, device=device)
    if b == 0 or r == 0 or n_items == 0:
        return ranks, n_candidates

    budget = _step_elements(device)
    # slots per step: one on a CPU with a full batch (long contiguous chunks), more when rows are few
    slot_group = max(1, min(r, budget // max(1, b * _PREFERRED_CHUNK)))
    scores_np = scores.contiguous().numpy() if use_numpy else None
    # padding slots point at item 0: harmless, their counts are ignored
    rel_items = torch.where(relevant_mask, relevant, torch.zeros_like(relevant))
    rel_scores = scores.gather(1, rel_items)
    ex_scores = scores.gather(1, excluded)
    # per slot group, only the contiguous row range holding real slots is compared: with rows
    # ordered by their number of relevant items (as ``evaluate`` does) that is a suffix
    has_slot = relevant_mask.any(0).tolist()
    slot_rows = relevant_mask.long().cumsum(0)  # [b, r]: number of real entries up to each row
    first_row = (slot_rows == 0).sum(0).tolist()  # first row holding each slot
    last_row = (slot_rows == slot_rows[-1:]).long().argmax(0).tolist()  # last row holding it

    for g0 in range(0, r, slot_group):
        g1 = min(g0 + slot_group, r)
        live = [t for t in range(g0, g1) if has_slot[t]]
        if not live:
            continue
        lo, hi = min(first_row[t] for t in live), max(last_row[t] for t in live) + 1
        rows = hi - lo
        chunk = max(1, min(item_chunk, n_items, max(_MIN_CHUNK, budget // (rows * (g1 - g0)))))
        items = rel_items[lo:hi, g0:g1]  # [rows, g]
        s = rel_scores[lo:hi, g0:g1]
        if use_numpy:
            if chunk >= 8:
                chunk = min(chunk, _SWAR_MAX) // 8 * 8  # a multiple of 8 for _count_np's fast path
            count = torch.from_numpy(_above_numpy(scores_np[lo:hi], items.numpy(), s.numpy(), chunk))
        else:
            count = _above_torch(scores[lo:hi], items, s, chunk)
        # remove excluded (profile) items ranked above, by the same rule
        if excluded.shape[1]:
            step = max(1, budget // (rows * (g1 - g0)))
            for l0 in range(0, excluded.shape[1], step):
                ex_s = ex_scores[lo:hi, None, l0 : l0 + step]
                ex_i = excluded[lo:hi, None, l0 : l0 + step]
                above_ex = (ex_s > s.unsqueeze(2)) | ((ex_s == s.unsqueeze(2)) & (ex_i < items.unsqueeze(2)))
                count -= _count(above_ex & excluded_mask[lo:hi, None, l0 : l0 + step])
        ranks[lo:hi, g0:g1] = count
    return ranks, n_candidates


def metrics_from_ranks(
    ranks: torch.Tensor,
    relevant_mask: torch.Tensor,
    n_candidates: torch.Tensor,
    n_items: int,
    *,
    ks: Sequence[int] = (20, 100),
    protocol: Protocol = "standard",
) -> dict[str, torch.Tensor]:
    """Per-row metrics (float64 ``[b]``) from 0-based candidate ranks; NaN for a row with no relevant item.

    ``standard`` (the spec's table):
      AUC = (sum_i #{non-relevant candidates ranked below i}) / (n (C - n)), 1 when C == n;
      nDCG@k = DCG@k / IDCG(min(n, k)).
    ``tutorial`` (the ICDM/IUI 2021 tutorial's ``utils/metrics.py`` arithmetic, reproduced exactly):
      ``auc_exact(pos, n_items)`` with ``pos`` the candidate positions sorted ascending:
      AUC = sum_{t=1..n} ((n_items - (pos_t + 1)) - (n - t)) / (n_items - n) / n, 1 when n_items == n.
      Its numerator counts from the catalogue size, not from C, so it equals the standard
      numerator plus ``n * |profile|`` (every profile item counts as ranked below every relevant
      item) and its denominator is ``n (n_items - n)``;
      nDCG@k = DCG@k / IDCG(#relevant items in the top k), 0 when none is.
    RR, R@k and P@k are the same in both (P@k divides by k even when fewer than k candidates exist).
    The profile is whatever the caller excludes: ``evaluate`` passes the tutorial's inputs under
    ``tutorial`` (each user's last 10 profile items by time).
    """
    ks = check_ks(ks)
    check_protocol(protocol)
    mask = relevant_mask.to(torch.bool)
    device = ranks.device
    rank_f = ranks.to(torch.float64)
    n = mask.sum(1).to(torch.float64)
    has_rel = n > 0
    nan = torch.tensor(math.nan, dtype=torch.float64, device=device)

    sum_rank = torch.where(mask, rank_f, torch.zeros_like(rank_f)).sum(1)
    # #{non-relevant candidates below each relevant item}, summed: the n ranks are distinct, so
    # sum_i (C - 1 - rank_i) counts every pair of relevant items once too: minus n (n - 1) / 2
    total = n_candidates.to(torch.float64) if protocol == "standard" else torch.full_like(n, float(n_items))
    numerator = n * (total - 1) - sum_rank - n * (n - 1) / 2
    denominator = n * (total - n)
    auc = torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.ones_like(n))
    out = {"auc": torch.where(has_rel, auc, nan)}

    big = torch.iinfo(torch.long).max
    min_rank = torch.where(mask, ranks, torch.full_like(ranks, big)).min(1).values if ranks.shape[1] else None
    if min_rank is None:
        out["rr"] = torch.full_like(n, math.nan)
    else:
        out["rr"] = torch.where(has_rel, 1.0 / (min_rank.clamp(max=n_items).to(torch.float64) + 1.0), nan)

    if ks:
        idcg = torch.as_tensor(ideal_dcg(max(ks)), device=device)
        gain = torch.where(mask, 1.0 / torch.log2(rank_f + 2.0), torch.zeros_like(rank_f))
        for k in ks:
            hit = mask & (ranks < k)
            hits = hit.sum(1)
            dcg = torch.where(hit, gain, torch.zeros_like(gain)).sum(1)
            out[f"recall@{k}"] = torch.where(has_rel, hits / n.clamp(min=1), nan)
            out[f"precision@{k}"] = torch.where(has_rel, hits.to(torch.float64) / k, nan)
            if protocol == "standard":
                ideal = idcg[torch.clamp(n.long(), max=k)]
                ndcg = dcg / ideal.clamp(min=1e-300)
            else:
                ideal = idcg[hits]
                ndcg = torch.where(hits > 0, dcg / ideal.clamp(min=1e-300), torch.zeros_like(dcg))
            out[f"ndcg@{k}"] = torch.where(has_rel, ndcg, nan)
    return out


def rank_metrics(
    scores: torch.Tensor,
    relevant: torch.Tensor,
    relevant_mask: torch.Tensor,
    excluded: torch.Tensor,
    excluded_mask: torch.Tensor,
    *,
    ks: Sequence[int] = (20, 100),
    protocol: Protocol = "standard",
    item_chunk: int = 32768,
    backend: Literal["auto", "numpy", "torch"] = "auto",
) -> dict[str, torch.Tensor]:
    """Per-row metrics of one batch: ``relevant_ranks`` then ``metrics_from_ranks``.

    Also returns ``n_candidates`` (int64 ``[b]``). Arguments as in :func:`relevant_ranks`.
    """
    ranks, n_candidates = relevant_ranks(
        scores, relevant, relevant_mask, excluded, excluded_mask, item_chunk=item_chunk, backend=backend
    )
    out = metrics_from_ranks(
        ranks, relevant_mask.to(ranks.device), n_candidates, scores.shape[1], ks=ks, protocol=protocol
    )
    out["n_candidates"] = n_candidates
    return out


def reference_row_metrics(
    scores: np.ndarray,
    profile: np.ndarray,
    predict: np.ndarray,
    *,
    ks: Sequence[int] = (20, 100),
    protocol: Protocol = "standard",
) -> dict[str, float]:
    """The oracle: one row, by a stable argsort of the whole row and position look-ups.

    Slow on purpose (the obvious per-user loop); the tests and ``bench/evaluation.py`` compare
    the vectorised path with it.
    """
    n_items = scores.shape[0]
    predict = np.unique(np.asarray(predict, np.int64))
    excluded = np.setdiff1d(np.asarray(profile, np.int64), predict)
    order = np.argsort(-scores.astype(np.float64), kind="stable")  # ties: lower index first
    keep = np.ones(n_items, bool)
    keep[excluded] = False
    ranking = order[keep[order]]
    position = np.empty(n_items, np.int64)
    position[ranking] = np.arange(ranking.size)
    rank = np.sort(position[predict])
    n, c = predict.size, ranking.size
    total = c if protocol == "standard" else n_items
    t = np.arange(1, n + 1)
    auc = 1.0 if total == n else float((((total - (rank + 1)) - (n - t)).sum()) / (total - n) / n)
    out = {"auc": auc, "rr": 1.0 / (rank.min() + 1.0)}
    for k in ks:
        hits = rank[rank < k]
        dcg = float((1.0 / np.log2(hits + 2.0)).sum())
        m = min(n, k) if protocol == "standard" else hits.size
        ideal = float((1.0 / np.log2(np.arange(m) + 2.0)).sum())
        out[f"recall@{k}"] = hits.size / n
        out[f"precision@{k}"] = hits.size / k
        out[f"ndcg@{k}"] = dcg / ideal if ideal > 0 else 0.0
    return out
