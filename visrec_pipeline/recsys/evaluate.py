"""Full-ranking evaluation of a score function over a holdout, and top-k extraction.

The protocol is ``shared/spec/evaluation.md``: every catalogue item except the row's profile is
ranked (score descending, ties by item index ascending); the items to predict are never removed,
even if a malformed holdout also lists them in the profile (the split makes the two disjoint).
Metrics come from :mod:`visrec_pipeline.recsys.metrics`, computed batch by batch on the device the
scores live on; nothing loops over users or items in Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from visrec_pipeline.recsys.base import ScoreBatch
from visrec_pipeline.recsys.data import CSR, Holdout, RecData
from visrec_pipeline.recsys.metrics import (
    Protocol,
    check_ks,
    check_protocol,
    metric_names,
    rank_metrics,
)

ScoreFn = Callable[[ScoreBatch], torch.Tensor]

# protocol="tutorial": the tutorial kept each user's last 10 profile items by time (MAX_PROFILE_SIZE),
# both as the model's input and as the items left out of the ranking
TUTORIAL_PROFILE_LEN = 10

COLD_PREFIX = "cold:"
WARM_PREFIX = "warm:"


def holdout_batches(
    holdout: Holdout,
    batch_size: int,
    *,
    device=None,
    max_profile_len: int | None = None,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, ScoreBatch]]:
    """``(row indices into holdout, ScoreBatch)`` for consecutive groups of ``rows`` (default: all, in order).

    The batch's profile is the row's profile (its ``max_profile_len`` most recent items when given).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = np.arange(len(holdout), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    profile = holdout.profile if max_profile_len is None else holdout.recent_profile(max_profile_len)
    for start in range(0, rows.size, batch_size):
        idx = rows[start : start + batch_size]
        items, mask = profile.padded(idx, device=device)
        user_idx = torch.as_tensor(holdout.user_idx[idx], dtype=torch.long, device=device)
        yield idx, ScoreBatch(user_idx=user_idx, profile_items=items, profile_mask=mask)


@dataclass
class EvalResult:
    """Per-row metrics and their means under one protocol.

    ``per_row`` columns: row, user_id, profile_size, n_relevant, n_candidates, then auc, rr and
    recall@k, precision@k, ndcg@k for each k, and ``has_cold`` when cold items were given.
    ``means``: metric -> mean over rows; with cold items it also holds the same means over rows
    whose predict contains a cold item (keys ``cold:<metric>``) and over the others
    (``warm:<metric>``); a group without rows has NaN means. ``means_cold``/``means_warm``
    give those two groups with plain metric names.
    """

    per_row: pd.DataFrame
    means: dict[str, float]
    protocol: str
    ks: tuple[int, ...]
    n_rows: int = 0
    n_cold_rows: int | None = None
    seconds: float = 0.0
    metrics: tuple[str, ...] = field(default_factory=tuple)

    @property
    def means_cold(self) -> dict[str, float] | None:
        return self._group(COLD_PREFIX)

    @property
    def means_warm(self) -> dict[str, float] | None:
        return self._group(WARM_PREFIX)

    def _group(self, prefix: str) -> dict[str, float] | None:
        if self.n_cold_rows is None:
            return None
        return {m: self.means[prefix + m] for m in self.metrics}

    def table_markdown(self) -> str:
        """The means as a markdown table (one line per group), naming the protocol."""
        header = ["rows", "protocol", *(_display(m) for m in self.metrics)]
        lines = [
            "| group | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(header),
        ]

        def line(group: str, n: int, means: dict[str, float]) -> str:
            vals = [f"{means[m]:.5f}" for m in self.metrics]
            return f"| {group} | {n} | {self.protocol} | " + " | ".join(vals) + " |"

        lines.append(line("all", self.n_rows, self.means))
        if self.n_cold_rows is not None:
            lines.append(line("with cold items", self.n_cold_rows, self.means_cold))
            lines.append(line("warm only", self.n_rows - self.n_cold_rows, self.means_warm))
        return "\n".join(lines)


def _display(metric: str) -> str:
    if metric in ("auc", "rr"):
        return metric.upper()
    name, k = metric.split("@")
    return {"recall": "R", "precision": "P", "ndcg": "nDCG"}[name] + "@" + k


def _check_holdout(holdout: Holdout, n_items: int) -> None:
    for name, csr in (("profile", holdout.profile), ("predict", holdout.predict)):
        if csr.n_rows != len(holdout):
            raise ValueError(f"holdout.{name} has {csr.n_rows} rows but holdout has {len(holdout)}")
        if csr.n_cols != n_items:
            raise ValueError(f"holdout.{name} has {csr.n_cols} item columns but the catalogue has {n_items} items")
        if csr.nnz and (csr.indices.min() < 0 or csr.indices.max() >= n_items):
            raise ValueError(f"holdout.{name} holds item indices outside 0..{n_items - 1}")


def _row_ids(holdout: Holdout, rows: np.ndarray) -> np.ndarray:
    ids = holdout.user_ids if holdout.user_ids is not None else holdout.user_idx
    return np.asarray(ids, np.int64)[rows]


def _scores_for(score_fn: ScoreFn, batch: ScoreBatch, n_items: int, device, rows, holdout) -> torch.Tensor:
    scores = score_fn(batch)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"score function returned {type(scores).__name__}, expected a torch.Tensor")
    if scores.shape != (len(rows), n_items):
        raise ValueError(f"score function returned shape {tuple(scores.shape)}, expected ({len(rows)}, {n_items})")
    if device is not None:
        scores = scores.to(device)
    # one cheap reduction: a NaN (or +inf with -inf) makes the sum NaN; then find the culprits
    if scores.is_floating_point() and torch.isnan(scores.sum()):
        bad = torch.isnan(scores).any(1).cpu().numpy()
        if bad.any():
            raise ValueError(
                f"score function returned NaN for {int(bad.sum())} user(s), "
                f"e.g. user_id {_row_ids(holdout, rows[bad])[:5].tolist()}"
            )
    return scores


def evaluate(
    score_fn: ScoreFn,
    holdout: Holdout,
    n_items: int,
    *,
    ks: Sequence[int] = (20, 100),
    protocol: Protocol = "standard",
    batch_size: int = 256,
    item_chunk: int = 32768,
    device=None,
    max_users: int | None = None,
    seed: int = 0,
    cold_items: np.ndarray | None = None,
    max_profile_len: int | None = None,
    rows: np.ndarray | None = None,
) -> EvalResult:
    """Rank every non-profile item for each holdout row and compute the spec's metrics.

    ``score_fn`` gets :class:`ScoreBatch` es (tensors on ``device``, default CPU) and returns
    ``[b, n_items]`` scores; the metrics are computed on ``device`` when given, else where the
    scores are. ``ks=()`` computes AUC and RR only (cheap validation). ``max_users`` evaluates a
    seeded random sample of rows. ``cold_items``: item indices unseen in training (see
    :class:`EvalResult` for the breakdown). Rows are scored grouped by their number of relevant
    items (less padding); ``per_row`` is in holdout order. A row without items to predict is an error.

    ``protocol="tutorial"`` also takes the tutorial's inputs: each profile is cut to its
    ``TUTORIAL_PROFILE_LEN`` most recent items (``holdout.profile_rank``), which are both scored
    and excluded; older profile items stay candidates. ``per_row.profile_size`` is the full profile.
    ``max_profile_len`` cuts what the model is shown to the most recent items, never what is excluded.
    ``rows``: evaluate only these holdout rows (a shard of the users; ``per_row.row`` stays the row's
    index in the whole holdout). A shard made of consecutive batches of :func:`batch_order` is scored
    in the very batches a whole evaluation scores them in, so :func:`merge_results` of the shards
    equals the whole evaluation exactly.
    """
    started = time.perf_counter()
    ks = check_ks(ks)
    check_protocol(protocol)
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    _check_holdout(holdout, n_items)
    m = len(holdout)
    if m == 0:
        raise ValueError("the holdout has no rows to evaluate")
    if rows is not None:
        if max_users is not None:
            raise ValueError("evaluate: give rows or max_users, not both")
        rows = np.unique(np.asarray(rows, np.int64))
        if rows.size == 0 or rows[0] < 0 or rows[-1] >= m:
            raise ValueError(f"evaluate: rows must be a non-empty subset of the holdout rows 0..{m - 1}")
    else:
        rows = np.arange(m, dtype=np.int64)
    if max_users is not None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        if max_users < m:
            rows = np.sort(np.random.default_rng(seed).choice(m, size=max_users, replace=False))
    n_relevant = holdout.predict.lengths()[rows]
    if (n_relevant == 0).any():
        empty = rows[n_relevant == 0]
        raise ValueError(
            f"{empty.size} holdout row(s) have nothing to predict, e.g. rows {empty[:5].tolist()} "
            f"(user_id {_row_ids(holdout, empty[:5]).tolist()})"
        )
    cold_mask = None
    if cold_items is not None:
        cold_items = np.asarray(cold_items, np.int64).reshape(-1)
        if cold_items.size and (cold_items.min() < 0 or cold_items.max() >= n_items):
            raise ValueError(f"cold_items holds item indices outside 0..{n_items - 1}")
        cold_mask = np.zeros(n_items, bool)
        cold_mask[cold_items] = True

    scored = holdout.with_recent_profile(TUTORIAL_PROFILE_LEN) if protocol == "tutorial" else holdout
    order = rows[_relevance_order(n_relevant)]
    names = metric_names(ks)
    values = {name: np.empty(m, np.float64) for name in names}
    n_candidates = np.empty(m, np.int64)
    with torch.no_grad():
        for idx, batch in holdout_batches(
            scored, batch_size, device=device, max_profile_len=max_profile_len, rows=order
        ):
            scores = _scores_for(score_fn, batch, n_items, device, idx, holdout)
            dev = scores.device
            # the protocol's whole profile is excluded, whatever the model was shown (and even if
            # it modified the batch tensors)
            prof_items, prof_mask = scored.profile.padded(idx, device=dev)
            rel_items, rel_mask = holdout.predict.padded(idx, device=dev)
            out = rank_metrics(
                scores, rel_items, rel_mask, prof_items, prof_mask, ks=ks, protocol=protocol, item_chunk=item_chunk
            )
            for name in names:
                values[name][idx] = out[name].cpu().numpy()
            n_candidates[idx] = out["n_candidates"].cpu().numpy()

    per_row = pd.DataFrame(
        {
            "row": rows,
            "user_id": _row_ids(holdout, rows),
            "profile_size": holdout.profile.lengths()[rows],
            "n_relevant": n_relevant,
            "n_candidates": n_candidates[rows],
            **{name: values[name][rows] for name in names},
        }
    )
    if cold_mask is not None:
        sub = holdout.predict.take_rows(rows)
        per_row["has_cold"] = np.bincount(sub.row_ids(), weights=cold_mask[sub.indices], minlength=rows.size) > 0
    return _result(per_row, protocol, ks, tuple(names), time.perf_counter() - started)


def _relevance_order(n_relevant: np.ndarray) -> np.ndarray:
    # rows with the same number of relevant items share a batch: the slot padding stays small
    return np.argsort(n_relevant, kind="stable")


def _result(per_row: pd.DataFrame, protocol: str, ks: tuple[int, ...], names: tuple[str, ...], seconds: float) -> EvalResult:
    """The EvalResult of ``per_row``: its means over all rows and, with ``has_cold``, over each group."""
    means = {name: float(per_row[name].mean()) for name in names}
    n_cold_rows = None
    if "has_cold" in per_row:
        has_cold = per_row["has_cold"].to_numpy(bool)
        n_cold_rows = int(has_cold.sum())
        for prefix, group in ((COLD_PREFIX, has_cold), (WARM_PREFIX, ~has_cold)):
            for name in names:
                means[prefix + name] = float(per_row.loc[group, name].mean()) if group.any() else float("nan")
    return EvalResult(
        per_row=per_row, means=means, protocol=protocol, ks=ks, n_rows=len(per_row), n_cold_rows=n_cold_rows,
        seconds=seconds, metrics=names,
    )


def batch_order(holdout: Holdout) -> np.ndarray:
    """Every holdout row in the order :func:`evaluate` scores them: its batches are consecutive slices
    of ``batch_size`` rows of this order (cut shards at multiples of ``batch_size``)."""
    return _relevance_order(holdout.predict.lengths()).astype(np.int64)


def merge_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One EvalResult from the results of disjoint shards of rows of one holdout (same protocol and ks):
    the rows in holdout order and the means computed from them as :func:`evaluate` computes them."""
    if not parts:
        raise ValueError("merge_results: no shard results to merge")
    first = parts[0]
    for part in parts[1:]:
        if (part.protocol, part.ks, part.metrics) != (first.protocol, first.ks, first.metrics):
            raise ValueError("merge_results: the shards were evaluated under different protocols or ks")
    per_row = pd.concat([p.per_row for p in parts], ignore_index=True)
    if per_row["row"].duplicated().any():
        raise ValueError("merge_results: the shards overlap (a holdout row evaluated twice)")
    per_row = per_row.sort_values("row", kind="stable").reset_index(drop=True)
    return _result(per_row, first.protocol, first.ks, first.metrics, sum(p.seconds for p in parts))


def _profiles_of(users: Holdout | RecData) -> Holdout:
    if isinstance(users, Holdout):
        return users
    if isinstance(users, RecData):
        empty = CSR(np.zeros(users.n_users + 1, np.int64), np.zeros(0, np.int64), users.n_items)
        return Holdout(
            np.arange(users.n_users, dtype=np.int64), users.train, empty, users.users.ids, users.train_ranks()
        )
    raise TypeError(f"top_k needs a Holdout or RecData, got {type(users).__name__}")


def top_k(
    score_fn: ScoreFn,
    users: Holdout | RecData,
    n_items: int,
    k: int,
    *,
    exclude_profile: bool = True,
    batch_size: int = 256,
    device=None,
    max_profile_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items of every row of ``users`` (a Holdout, or RecData = every training user
    with their training profile): ``(item_idx int64 [m, k], scores [m, k])``, best first, ties by
    item index ascending; scores as float64. Profile items are left out unless
    ``exclude_profile=False``. A row with fewer than ``k`` candidates is padded with item ``-1`` and
    score NaN: filter ``item_idx >= 0`` before mapping indices to ids.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    holdout = _profiles_of(users)
    if holdout.profile.n_cols != n_items:
        raise ValueError(f"profiles have {holdout.profile.n_cols} item columns but the catalogue has {n_items} items")
    m = len(holdout)
    out_items = np.full((m, k), -1, np.int64)
    out_scores = np.full((m, k), np.nan, np.float64)
    with torch.no_grad():
        for idx, batch in holdout_batches(holdout, batch_size, device=device, max_profile_len=max_profile_len):
            scores = _scores_for(score_fn, batch, n_items, device, idx, holdout)
            items, vals = _top_k_batch(scores, holdout.profile, idx, k, exclude_profile)
            width = items.shape[1]
            out_items[idx, :width] = items
            out_scores[idx, :width] = np.where(items >= 0, vals, np.nan)
    return out_items, out_scores


def _top_k_batch(
    scores: torch.Tensor, profile: CSR, idx: np.ndarray, k: int, exclude_profile: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with the index tie-break. Fast path: ``topk`` of k + 1 on the scores with the profile
    set to -inf, then only the ``[b, k]`` result is re-ordered; that is exact for every row whose k-th
    value is finite and above the (k+1)-th (no tie across the cut). The other rows (ties across the cut, fewer than
    k candidates, infinite scores) take :func:`_top_k_exact`."""
    b, n_items = scores.shape
    kk = min(k, n_items)
    if not scores.is_floating_point() or b == 0:
        return _top_k_exact(scores, profile, idx, k, exclude_profile)
    dev = scores.device
    masked = scores.clone()
    if exclude_profile:
        sub = profile.take_rows(idx)
        masked[torch.as_tensor(sub.row_ids(), device=dev), torch.as_tensor(sub.indices, device=dev)] = -torch.inf
    # one more than asked: the row is settled when the k-th value is finite and above the (k+1)-th
    vals, items = torch.topk(masked, min(kk + 1, n_items), dim=1, sorted=True)
    del masked
    kth = vals[:, kk - 1]
    after = vals[:, kk] if vals.shape[1] > kk else torch.full_like(kth, -torch.inf)
    exact = torch.isfinite(kth) & (after < kth)
    vals, items = vals[:, :kk], items[:, :kk]
    # within the result: score descending, item index ascending (stable sort on index-sorted items)
    by_item = torch.sort(items, dim=1).indices
    items, vals = items.gather(1, by_item), vals.gather(1, by_item)
    order = torch.sort(vals.to(torch.float64), dim=1, descending=True, stable=True).indices
    out_items = items.gather(1, order).cpu().numpy()
    out_vals = vals.gather(1, order).to(torch.float64).cpu().numpy()
    slow = np.flatnonzero(~exact.cpu().numpy())
    if slow.size:
        items_s, vals_s = _top_k_exact(scores[torch.as_tensor(slow, device=dev)], profile, idx[slow], k, exclude_profile)
        out_items[slow], out_vals[slow] = items_s, vals_s
    return out_items, out_vals


def _top_k_exact(
    scores: torch.Tensor, profile: CSR, idx: np.ndarray, k: int, exclude_profile: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with the index tie-break, without sorting the row: the k-th best value is
    found with ``topk`` (its values are well defined, its order among ties is not), then the
    items above it plus the lowest-index items tied with it are taken and ordered."""
    b, n_items = scores.shape
    dev = scores.device
    kk = min(k, n_items)
    candidate = torch.ones((b, n_items), dtype=torch.bool, device=dev)
    if exclude_profile:
        sub = profile.take_rows(idx)
        candidate[torch.as_tensor(sub.row_ids(), device=dev), torch.as_tensor(sub.indices, device=dev)] = False
    low = torch.tensor(-torch.inf, dtype=scores.dtype, device=dev) if scores.is_floating_point() else scores.min()
    masked = torch.where(candidate, scores, low)
    kth = torch.topk(masked, kk, dim=1, sorted=True).values[:, -1:]
    above = candidate & (masked > kth)
    tied = candidate & (masked == kth)
    need = kk - above.sum(1)
    # the `need` lowest-index tied items of each row (memory grows with the ties, not the catalogue)
    t_rows, t_cols = tied.nonzero(as_tuple=True)
    t_counts = tied.sum(1)
    t_rank = torch.arange(t_rows.numel(), device=dev) - torch.repeat_interleave(t_counts.cumsum(0) - t_counts, t_counts)
    take = t_rank < need[t_rows]
    chosen = above
    chosen[t_rows[take], t_cols[take]] = True  # now min(k, candidates) items per row
    rows, cols = chosen.nonzero(as_tuple=True)  # row-major: index ascending within a row
    counts = chosen.sum(1)
    slot = torch.arange(rows.numel(), device=dev) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    items = torch.full((b, kk), -1, dtype=torch.long, device=dev)
    items[rows, slot] = cols
    # sort key: float64 holds float32 (and ints up to 2**53) exactly; padding gets -inf and, being
    # after the real items, stays after them (and after real -inf items) in a stable sort
    key = torch.full((b, kk), -torch.inf, dtype=torch.float64, device=dev)
    key[rows, slot] = scores[rows, cols].to(torch.float64)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    items = items.gather(1, order)
    vals = key.gather(1, order)
    return items.cpu().numpy(), vals.cpu().numpy()
