"""EASE (Steck 2019): ``B = I - P diagMat(1 / diag(P))``, ``P = (X^T X + lambda I)^-1``, scores ``x_u B``.

The solve runs in float64 on the sparse training matrix ``X`` (never a dense users x items
copy); ``B`` is stored in float32 and a score is ``x_u @ B``, batched over all items. Two exact
ways to the same ``B`` over a set of ``n`` items, for ``m`` users:

- *primal* (``n <= m``): the ``[n x n]`` Gram ``X^T X`` (from sparse products), then one Cholesky
  factorisation and inverse of ``X^T X + lambda I`` per lambda.
- *dual* (``m < n``, e.g. 1k users and 20k items): by Woodbury,
  ``P = (I - X^T K X) / lambda`` with ``K = (X X^T + lambda I)^-1`` (``[m x m]``), and ``B`` is
  written a block of columns at a time (column ``j`` of ``B`` needs only column ``j`` of ``P``).
  ``K`` is a solver temporary: the checkpoint keeps ``B`` alone.

Items without a training interaction have a zero column in ``X``: their row and column of ``B``
are exactly zero, so the solve covers the items with interactions only and the others score 0
(what the full closed form gives them).

**Memory guard and the top-items variant.** :func:`solve_bytes` counts every matrix the chosen
form allocates, as if all were alive at once (primal: Gram, its shifted copy and the Cholesky
factor, ``3 x 8 n^2`` bytes, the inverse reusing freed room; dual: ``3 x 8 m^2`` for the user
Gram, its copy and factor, plus ``4 n^2`` for ``B``, plus the column blocks), plus the sparse
``X`` and the scoring temporaries of a validation batch. ``max_dense_gb`` bounds that sum, and
``max_solve_side`` bounds the side of the cubic factorisation (time: each lambda costs one
Cholesky of that side, about 7 s at 4096 on one core). When all items with interactions fit
both, EASE is exact (``variant = "exact"``). Otherwise (``variant = "auto"``) it runs the
documented *top-items* variant: exact EASE on the ``N`` most popular training items (ties by
item index), ``N`` the largest that fits both bounds; every other item is scored below all of
them, in popularity order (``row minimum of the EASE scores - 1 + count / (max count + 1)``), so
the ranking is EASE's over the head followed by MostPop's over the tail. Which variant ran, why,
``N`` and the share of interactions it covers are in the fit notes; the checkpoint holds ``B``,
the head items and the tail's popularity scores, never training data. ``variant = "exact"``
refuses (``MemoryError``) instead of restricting.

The profile comes from the ``ScoreBatch``, so any profile (also of a user unseen in
training) is scored. ``l2_grid``, when given, picks lambda by validation AUC on the
validation split carved from training rows (one factorisation per lambda; the best one is
solved again at the end rather than keeping two ``B`` in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.data import CSR, RecData
from visrec_pipeline.recsys.model_spec import ModelSpec, register
from visrec_pipeline.recsys.sparse_products import (
    DEFAULT_BLOCK_BYTES,
    block_cols,
    dense_rows_t,
    row_gram,
    select_columns,
    to_torch,
    transpose,
)

VALIDATION_BATCH_ROWS = 256  # evaluate()'s default batch, used by the validator


@dataclass
class EASEConfig:
    l2: float = 500.0  # lambda (Steck's default); used when l2_grid is empty
    l2_grid: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0)  # chosen by validation AUC when given
    form: str = "auto"  # "auto" | "primal" | "dual": how B is computed (the same B either way)
    variant: str = "auto"  # "auto": exact when it fits, else the top-items variant | "exact": refuse instead
    max_dense_gb: float = 6.0  # bound on every matrix the solve allocates (solve_bytes), leaving room under 8 GB
    max_solve_side: int = 4096  # bound on the side of the cubic factorisation (time)
    val_max_users: int = 500
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class SolvePlan:
    form: str  # "primal" | "dual"
    variant: str  # "exact" | "top_items"
    items: np.ndarray  # item indices B covers, ascending
    need_bytes: int
    reason: str


def solve_bytes(form: str, n_items: int, n_users: int, nnz: int, n_catalogue: int) -> int:
    """Bytes of every matrix the solve of ``form`` allocates over ``n_items`` items, summed as if all were
    alive at once (an upper bound): dense solver matrices, column blocks, the sparse ``X`` (torch and numpy
    copies, both orientations) and one validation batch's scoring temporaries."""
    n, m = int(n_items), int(n_users)
    sparse = 2 * nnz * (8 + 8 + 8) + 2 * (n + m + 2) * 8
    scoring = VALIDATION_BATCH_ROWS * (2 * n + 4 * n_catalogue) * 4  # x, x @ B; the full score row and ranking
    if form == "primal":
        dense = 3 * 8 * n * n + 2 * DEFAULT_BLOCK_BYTES
    else:
        dense = 3 * 8 * m * m + 4 * n * n + 5 * DEFAULT_BLOCK_BYTES
    return int(dense + sparse + scoring + 4 * n * n)  # + the float32 B being scored


def plan_solve(counts: np.ndarray, n_users: int, config: EASEConfig) -> SolvePlan:
    """The form and item set of the solve: all items with interactions when they fit ``max_dense_gb`` and
    ``max_solve_side``, else (variant auto) the largest popularity head that does."""
    if config.form not in ("auto", "primal", "dual"):
        raise ValueError(f"EASEConfig.form must be auto|primal|dual, got {config.form!r}")
    if config.variant not in ("auto", "exact"):
        raise ValueError(f"EASEConfig.variant must be auto|exact, got {config.variant!r}")
    if config.max_solve_side < 1 or config.max_dense_gb <= 0:
        raise ValueError(
            f"EASE: max_solve_side ({config.max_solve_side}) and max_dense_gb ({config.max_dense_gb}) must be > 0"
        )
    budget = config.max_dense_gb * 1e9
    # most popular first, ties by item index
    order = np.lexsort((np.arange(counts.size), -counts))
    n_active = int((counts > 0).sum())
    head_nnz = np.concatenate([[0], np.cumsum(counts[order])])

    def form_of(n: int) -> str:
        return ("dual" if n_users < n else "primal") if config.form == "auto" else config.form

    def fits(n: int) -> bool:
        form = form_of(n)
        side = n if form == "primal" else n_users
        need = solve_bytes(form, n, n_users, int(head_nnz[n]), counts.size)
        return side <= config.max_solve_side and need <= budget

    def plan(n: int, variant: str, reason: str) -> SolvePlan:
        need = solve_bytes(form_of(n), n, n_users, int(head_nnz[n]), counts.size)
        return SolvePlan(form_of(n), variant, np.sort(order[:n]), need, reason)

    if fits(n_active):
        return plan(n_active, "exact", "every item with interactions fits max_dense_gb and max_solve_side")
    full = plan(n_active, "exact", "")
    why = (
        f"exact EASE ({full.form} form) over {n_active} items x {n_users} users needs "
        f"{full.need_bytes / 1e9:.2f} GB (max_dense_gb={config.max_dense_gb}) and a factorisation of side "
        f"{n_active if full.form == 'primal' else n_users} (max_solve_side={config.max_solve_side})"
    )
    if config.variant == "exact":
        raise MemoryError(f"EASE: {why}; raise the limits or use variant='auto' for the top-items variant")
    lo, hi = 0, n_active  # fits(lo) or lo == 0; not fits(hi); the need grows with n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise MemoryError(f"EASE: {why}; not even one item fits, raise max_dense_gb or max_solve_side")
    return plan(lo, "top_items", f"{why}; solved the {lo} most popular items exactly, the rest by popularity")


class _Solver:
    """The Gram of ``X`` (over the planned items) once, then ``B`` for any lambda."""

    def __init__(self, X: CSR, form: str, device: torch.device):
        self.form, self.device = form, device
        self.XT = transpose(X)  # [items, users]
        self.X = X
        # primal: items x items; dual: users x users
        self.gram = row_gram(self.XT if form == "primal" else X, device=device)

    def _factor_inverse(self, l2: float) -> torch.Tensor:
        shifted = self.gram.clone()
        shifted.diagonal().add_(l2)
        factor = torch.linalg.cholesky(shifted)
        del shifted
        return torch.cholesky_inverse(factor)

    def solve(self, l2: float) -> torch.Tensor:
        """``B`` float32 ``[items, items]``."""
        if self.form == "primal":
            P = self._factor_inverse(l2)
            P.div_(-torch.diagonal(P).clone().unsqueeze(0))  # column j of B is -P[:, j] / P[j, j]
            P.fill_diagonal_(0.0)
            return P.float()
        K = self._factor_inverse(l2)  # [users, users]
        n = self.XT.n_rows
        XT = to_torch(self.XT, device=self.device)
        B = torch.empty((n, n), dtype=torch.float32, device=self.device)
        step = block_cols(n, DEFAULT_BLOCK_BYTES)
        for start in range(0, n, step):
            stop = min(n, start + step)
            cols = dense_rows_t(self.XT, start, stop, device=self.device)  # X[:, start:stop]
            P = -(XT @ (K @ cols))  # lambda * P[:, start:stop], less the identity
            local = torch.arange(stop - start, device=self.device)
            P[start + local, local] += 1.0
            P.div_(-P[start + local, local].clone().unsqueeze(0))  # lambda cancels in the ratio
            P[start + local, local] = 0.0
            B[:, start:stop] = P
        return B


class EASE(Recommender):
    name = "ease"

    def __init__(self, config: EASEConfig | None = None, **kw):
        super().__init__(config or EASEConfig(), **kw)
        self.state: dict[str, torch.Tensor] | None = None
        self._cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        c = self.config
        if c.l2 <= 0 or any(v <= 0 for v in c.l2_grid):
            raise ValueError(f"EASE: lambda must be > 0 (l2={c.l2}, l2_grid={c.l2_grid})")
        counts = np.bincount(data.train.indices, minlength=data.n_items)
        if not counts.any():
            raise ValueError("EASE: the training data has no interactions")
        plan = plan_solve(counts, data.n_users, c)
        self.log.info(
            "EASE variant=%s form=%s items=%d (memory estimate %.2f GB): %s",
            plan.variant, plan.form, plan.items.size, plan.need_bytes / 1e9, plan.reason,
        )
        device = resolve_device(c.device)
        solver = _Solver(select_columns(data.train, plan.items), plan.form, device)
        base = {"active_items": torch.as_tensor(plan.items), "n_items": torch.tensor(data.n_items)}
        if plan.variant == "top_items":
            tail = np.setdiff1d(np.arange(data.n_items), plan.items)
            base["tail_items"] = torch.as_tensor(tail)
            base["tail_popularity"] = torch.as_tensor(counts[tail] / (counts.max() + 1.0), dtype=torch.float32)

        history = TrainHistory(
            notes={
                "form": plan.form, "variant": plan.variant, "variant_reason": plan.reason,
                "active_items": int(plan.items.size), "items_with_interactions": int((counts > 0).sum()),
                "interaction_coverage": float(counts[plan.items].sum() / counts.sum()),
                "memory_estimate_gb": plan.need_bytes / 1e9, "max_dense_gb": c.max_dense_gb,
            }
        )

        def solve(l2: float) -> None:
            self.state = None  # drop the previous B before the next solve
            self._set_state({**base, "B": solver.solve(l2), "l2": torch.tensor(float(l2), dtype=torch.float64)})

        grid = tuple(c.l2_grid)
        if grid and inputs is not None and inputs.validation is not None and len(inputs.validation) > 0:
            from visrec_pipeline.recsys.trainer import TrainConfig, make_validator

            cfg = TrainConfig(epochs=1, batch_size=256, lr=0.0, val_max_users=c.val_max_users, seed=c.seed, device=c.device)
            validate = make_validator(self, inputs.validation, data.n_items, cfg)
            best = (-np.inf, None)
            aucs = {}
            for l2 in grid:
                solve(l2)
                auc = validate()
                aucs[str(l2)] = auc
                self.log.info("EASE lambda=%g validation AUC=%.5f", l2, auc)
                if auc > best[0]:
                    best = (auc, l2)
            chosen = float(best[1])
            history.val_auc = list(aucs.values())
            history.notes["validation_auc_by_lambda"] = aucs
            if chosen != float(grid[-1]):
                solve(chosen)
        else:
            chosen = float(c.l2)
            solve(chosen)
        history.notes["lambda"] = chosen
        return history

    # ------------------------------------------------------------------ scoring
    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        if "K" in state:
            raise ValueError(
                "EASE: this checkpoint has the old dual-form layout (K and the training matrix); retrain the model"
            )
        missing = {"B", "active_items", "n_items"} - set(state)
        if missing:
            raise ValueError(f"EASE: checkpoint state lacks {sorted(missing)}")
        state = dict(state)
        state["B"] = state["B"].float()  # stored float32: scores need no more, the checkpoint is halved
        self.state = state
        self._cache = {}

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The state's tensors on ``device`` plus the item -> row-of-B map, built once per device."""
        if self._cache.get("device") != device:
            s = self.state
            cache = {k: v.to(device) for k, v in s.items() if torch.is_tensor(v)}
            n_items = int(s["n_items"])
            remap = torch.full((n_items,), -1, dtype=torch.long, device=device)
            remap[cache["active_items"]] = torch.arange(cache["active_items"].shape[0], device=device)
            self._cache = {**cache, "remap": remap, "device": device}
        return self._cache

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("EASE: call fit() or load_state_dict() before score()")
        device = resolve_device(self.config.device)
        s = self._on(device)
        n_items = int(s["n_items"])
        items = batch.profile_items.to(device).long()
        pos = s["remap"][items.clamp(0, n_items - 1)]
        keep = batch.profile_mask.to(device) & (pos >= 0)
        b, n = items.shape[0], s["active_items"].shape[0]
        x = torch.zeros((b, n), dtype=torch.float32, device=device)
        rows = torch.arange(b, device=device).unsqueeze(1).expand_as(pos)
        x[rows[keep], pos[keep]] = 1.0
        sub = x @ s["B"]
        out = torch.zeros((b, n_items), dtype=torch.float32, device=device)
        out[:, s["active_items"]] = sub
        if "tail_items" in s:
            # the tail ranks below every head item, in popularity order
            floor = sub.amin(1, keepdim=True) - 1.0 if n else torch.zeros((b, 1), device=device)
            out[:, s["tail_items"]] = floor + s["tail_popularity"].unsqueeze(0)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.state is None:
            raise RuntimeError("EASE: nothing to save before fit()")
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._set_state(state)

    def refit_overrides(self, history: TrainHistory) -> dict:
        # the lambda the validation grid chose, solved again without the grid
        return {"l2": float(history.notes["lambda"]), "l2_grid": ()} if "lambda" in history.notes else {}


register(
    ModelSpec(
        "ease", EASE, EASEConfig, frozenset(),
        "EASE (Steck 2019): closed-form item-item linear autoencoder; lambda chosen on the validation split.",
    )
)
