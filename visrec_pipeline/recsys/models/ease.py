"""EASE (Steck 2019): ``B = I - P diagMat(1 / diag(P))``, ``P = (X^T X + lambda I)^-1``, scores ``x_u B``.

Computed in float64 with ``torch.linalg``. Two exact forms of the same closed form:

- *primal* (items <= users): ``P`` is the inverse of the ``[items x items]`` Gram
  matrix; ``B`` is stored (float32) and a score is ``x_u @ B``.
- *dual* (users < items, e.g. 1k users and 33k items): by Woodbury,
  ``P = (I - X^T (X X^T + lambda I)^-1 X) / lambda``, so only the ``[users x users]``
  matrix ``K = (X X^T + lambda I)^-1`` and ``diag(P)`` are stored, and
  ``x_u B = x_u - (x_u - ((x_u X^T) K) X) / (lambda diag(P))`` without ever forming the
  ``items x items`` matrix.

Items without a training interaction have a zero column in ``X``: their row and column
of ``B`` are exactly zero, so both forms work on the items with interactions only and
give the others score 0 (what the full closed form gives them).

The profile comes from the ``ScoreBatch``, so any profile (also of a user unseen in
training) is scored. ``l2_grid``, when given, picks lambda by validation AUC on the
validation split carved from training rows (each lambda is a cheap re-solve from one
eigendecomposition).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from visrec_pipeline.devices import resolve_device
from visrec_pipeline.recsys.base import FitInputs, Recommender, ScoreBatch, TrainHistory
from visrec_pipeline.recsys.data import CSR, RecData
from visrec_pipeline.recsys.model_spec import ModelSpec, register


@dataclass
class EASEConfig:
    l2: float = 500.0  # lambda (Steck's default); used when l2_grid is empty
    l2_grid: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0)  # chosen by validation AUC when given
    form: str = "auto"  # "auto" | "primal" | "dual"
    max_dense_gb: float = 8.0  # refuse a primal solve whose matrices would exceed this
    val_max_users: int = 500
    seed: int = 0
    device: str = "auto"


class _Solver:
    """One eigendecomposition, then the closed form for any lambda."""

    def __init__(self, X: torch.Tensor, form: str):
        self.form = form
        gram = X.T @ X if form == "primal" else X @ X.T  # float64
        self.evals, self.evecs = torch.linalg.eigh(gram)
        self.evals = self.evals.clamp(min=0.0)  # a Gram matrix is PSD; clip round-off
        self.X = X

    def solve(self, l2: float) -> dict[str, torch.Tensor]:
        Q, w = self.evecs, self.evals
        inv = (Q / (w + l2)) @ Q.T  # (Gram + l2 I)^-1
        if self.form == "primal":
            diag = torch.diagonal(inv)
            B = -inv / diag.unsqueeze(0)
            B.fill_diagonal_(0.0)
            return {"B": B}
        KX = inv @ self.X  # [users, items]
        diag_p = (1.0 - (KX * self.X).sum(0)) / l2
        return {"K": inv, "diag_p": diag_p}


class EASE(Recommender):
    name = "ease"

    def __init__(self, config: EASEConfig | None = None, **kw):
        super().__init__(config or EASEConfig(), **kw)
        self.state: dict[str, torch.Tensor] | None = None
        self._X_sparse: tuple[torch.Tensor, torch.Tensor] | None = None  # (X, X^T) for the dual form

    # ------------------------------------------------------------------ fitting
    def fit(self, data: RecData, inputs: FitInputs) -> TrainHistory:
        c = self.config
        if c.l2 <= 0 or any(v <= 0 for v in c.l2_grid):
            raise ValueError(f"EASE: lambda must be > 0 (l2={c.l2}, l2_grid={c.l2_grid})")
        active = np.flatnonzero(np.bincount(data.train.indices, minlength=data.n_items) > 0)
        if active.size == 0:
            raise ValueError("EASE: the training data has no interactions")
        form = c.form
        if form == "auto":
            form = "dual" if data.n_users < active.size else "primal"
        if form not in ("primal", "dual"):
            raise ValueError(f"EASEConfig.form must be auto|primal|dual, got {c.form!r}")
        side = active.size if form == "primal" else data.n_users
        need_gb = 4 * side * side * 8 / 1e9  # Gram, eigenvectors, inverse, B (float64)
        if need_gb > c.max_dense_gb:
            raise MemoryError(
                f"EASE ({form} form) needs about {need_gb:.1f} GB for {side} x {side} matrices "
                f"(limit max_dense_gb={c.max_dense_gb}); raise the limit or reduce the catalogue"
            )
        remap = np.full(data.n_items, -1, np.int64)
        remap[active] = np.arange(active.size)
        X = _dense(data.train, remap, active.size)
        solver = _Solver(X, form)
        base = {"active_items": torch.as_tensor(active), "n_items": torch.tensor(data.n_items)}
        if form == "dual":
            sub = CSR(data.train.indptr, remap[data.train.indices], int(active.size))
            base["x_indptr"] = torch.as_tensor(sub.indptr)
            base["x_indices"] = torch.as_tensor(sub.indices)

        history = TrainHistory(notes={"form": form, "active_items": int(active.size)})
        grid = tuple(c.l2_grid)
        if grid and inputs is not None and inputs.validation is not None and len(inputs.validation) > 0:
            from visrec_pipeline.recsys.trainer import TrainConfig, make_validator

            cfg = TrainConfig(epochs=1, batch_size=256, lr=0.0, val_max_users=c.val_max_users, seed=c.seed, device=c.device)
            validate = make_validator(self, inputs.validation, data.n_items, cfg)
            best = (-np.inf, None)
            aucs = {}
            for l2 in grid:
                self._set_state({**base, **solver.solve(l2), "l2": torch.tensor(float(l2), dtype=torch.float64)})
                auc = validate()
                aucs[str(l2)] = auc
                self.log.info("EASE lambda=%g validation AUC=%.5f", l2, auc)
                if auc > best[0]:
                    best = (auc, l2)
            chosen = float(best[1])
            history.val_auc = list(aucs.values())
            history.notes["validation_auc_by_lambda"] = aucs
        else:
            chosen = float(c.l2)
        self._set_state({**base, **solver.solve(chosen), "l2": torch.tensor(chosen, dtype=torch.float64)})
        history.notes["lambda"] = chosen
        return history

    # ------------------------------------------------------------------ scoring
    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if "B" in state:
            state["B"] = state["B"].float()  # stored float32: scores need no more, the checkpoint is halved
        self.state = state
        self._X_sparse = None

    def _sparse_X(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, X^T)`` as sparse COO float64 on ``device``, built once from the stored CSR indices."""
        if self._X_sparse is None or self._X_sparse[0].device != device:
            s = self.state
            indptr, indices = s["x_indptr"], s["x_indices"]
            n_users, n_active = indptr.shape[0] - 1, s["active_items"].shape[0]
            rows = torch.repeat_interleave(torch.arange(n_users), indptr[1:] - indptr[:-1])
            values = torch.ones(indices.shape[0], dtype=torch.float64)
            X = torch.sparse_coo_tensor(torch.stack([rows, indices]), values, (n_users, n_active), check_invariants=True).coalesce()
            XT = torch.sparse_coo_tensor(torch.stack([indices, rows]), values, (n_active, n_users), check_invariants=True).coalesce()
            self._X_sparse = (X.to(device), XT.to(device))
        return self._X_sparse

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("EASE: call fit() or load_state_dict() before score()")
        s = self.state
        device = resolve_device(self.config.device)
        n_items = int(s["n_items"])
        active = s["active_items"].to(device)
        remap = torch.full((n_items,), -1, dtype=torch.long, device=device)
        remap[active] = torch.arange(active.shape[0], device=device)
        items = batch.profile_items.to(device).long()
        pos = remap[items.clamp(0, n_items - 1)]
        keep = batch.profile_mask.to(device) & (pos >= 0)
        b, n_active = items.shape[0], active.shape[0]
        dual = "K" in s
        x = torch.zeros((b, n_active), dtype=torch.float64 if dual else torch.float32, device=device)
        rows = torch.arange(b, device=device).unsqueeze(1).expand_as(pos)
        x[rows[keep], pos[keep]] = 1.0
        if dual:
            X, XT = self._sparse_X(device)
            xXt = (X @ x.T).T  # [b, users]
            back = (XT @ (s["K"].to(device) @ xXt.T)).T  # [b, active]
            denom = s["l2"].to(device) * s["diag_p"].to(device)
            sub = (x - (x - back) / denom).float()
        else:
            sub = x @ s["B"].to(device)
        out = torch.zeros((b, n_items), dtype=torch.float32, device=device)
        out[:, active] = sub
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


def _dense(train: CSR, remap: np.ndarray, n_cols: int) -> torch.Tensor:
    X = torch.zeros((train.n_rows, n_cols), dtype=torch.float64)
    X[torch.as_tensor(train.row_ids()), torch.as_tensor(remap[train.indices])] = 1.0
    return X


register(
    ModelSpec(
        "ease", EASE, EASEConfig, frozenset(),
        "EASE (Steck 2019): closed-form item-item linear autoencoder; lambda chosen on the validation split.",
    )
)
