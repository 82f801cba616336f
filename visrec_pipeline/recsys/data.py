"""Index maps, a CSR matrix of interactions, the holdout and the training data.

Items are indexed ``0..n_items-1`` in ascending ``item_id`` over the whole
catalogue (so items never seen in training still get a score); users
``0..n_users-1`` in ascending ``user_id`` over the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch


class UnknownIdError(KeyError):
    """An id that the index map does not contain."""


@dataclass(frozen=True)
class IndexMap:
    ids: np.ndarray  # sorted, unique int64

    @classmethod
    def from_ids(cls, ids) -> "IndexMap":
        return cls(np.unique(np.asarray(ids, dtype=np.int64)))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def index(self, ids, *, allow_missing: bool = False) -> np.ndarray:
        """Indices of ``ids``; unknown ids raise, or map to -1 with ``allow_missing``."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos_clipped = np.minimum(pos, max(len(self) - 1, 0))
        found = (len(self) > 0) & (self.ids[pos_clipped] == ids) if len(self) else np.zeros(ids.shape, bool)
        if not np.all(found):
            if not allow_missing:
                missing = ids[~found]
                raise UnknownIdError(f"{missing.size} unknown id(s), e.g. {missing[:5].tolist()}")
            return np.where(found, pos_clipped, -1).astype(np.int64)
        return pos_clipped.astype(np.int64)


@dataclass(frozen=True)
class CSR:
    """Compressed sparse rows of a binary matrix; column indices sorted within a row."""

    indptr: np.ndarray  # int64 [n_rows + 1]
    indices: np.ndarray  # int64 [nnz]
    n_cols: int

    @classmethod
    def from_pairs(cls, rows, cols, n_rows: int, n_cols: int) -> "CSR":
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        if rows.size:
            keep = np.ones(rows.size, bool)
            keep[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
            rows, cols = rows[keep], cols[keep]
        counts = np.bincount(rows, minlength=n_rows)
        indptr = np.zeros(n_rows + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, cols, int(n_cols))

    @classmethod
    def from_lists(cls, lists, n_cols: int) -> "CSR":
        lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
        rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
        cols = np.concatenate([np.asarray(x, np.int64) for x in lists]) if len(lists) else np.zeros(0, np.int64)
        return cls.from_pairs(rows, cols, len(lists), n_cols)

    @property
    def n_rows(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def row_ids(self) -> np.ndarray:
        """Row index of every stored entry (aligned with ``indices``)."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.lengths())

    def take_rows(self, rows) -> "CSR":
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths()[rows]
        indptr = np.zeros(rows.size + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        starts = self.indptr[rows]
        # gather positions without a Python loop over rows
        offsets = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], lengths)
        idx = np.repeat(starts, lengths) + offsets
        return CSR(indptr, self.indices[idx], self.n_cols)

    def to_dense(self, rows=None, *, device=None, dtype=torch.float32) -> torch.Tensor:
        sub = self if rows is None else self.take_rows(rows)
        out = torch.zeros((sub.n_rows, self.n_cols), dtype=dtype, device=device)
        r = torch.as_tensor(sub.row_ids(), device=device)
        c = torch.as_tensor(sub.indices, device=device)
        out[r, c] = 1
        return out

    def padded(self, rows=None, *, max_len: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(items [b, L] padded with 0, mask [b, L]); with ``max_len`` keep the last ``max_len`` stored
        entries of each row (the highest item indices: for the most recent items see
        :meth:`Holdout.recent_profile`)."""
        sub = self if rows is None else self.take_rows(rows)
        lengths = sub.lengths()
        L = int(lengths.max()) if lengths.size else 0
        if max_len is not None:
            L = min(L, max_len)
        L = max(L, 1)
        b = sub.n_rows
        items = np.zeros((b, L), np.int64)
        mask = np.zeros((b, L), bool)
        take = np.minimum(lengths, L)
        row_ids = np.repeat(np.arange(b), take)
        slot = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
        # the last `take` entries of each row
        src = np.repeat(sub.indptr[1:] - take, take) + slot
        items[row_ids, slot] = sub.indices[src]
        mask[row_ids, slot] = True
        return torch.as_tensor(items, device=device), torch.as_tensor(mask, device=device)


def ranks_in_rows(csr: CSR, key: np.ndarray) -> np.ndarray:
    """For each stored entry of ``csr``, its 0-based position within its row when the row is ordered
    by ``key`` (aligned with ``csr.indices``, e.g. timestamps), ties by item index."""
    key = np.asarray(key)
    if key.shape != csr.indices.shape:
        raise ValueError(f"key has shape {key.shape}; expected one value per stored entry {csr.indices.shape}")
    order = np.lexsort((csr.indices, key, csr.row_ids()))
    ranks = np.empty(csr.nnz, np.int64)
    ranks[order] = np.arange(csr.nnz, dtype=np.int64) - np.repeat(csr.indptr[:-1], csr.lengths())
    return ranks


@dataclass(frozen=True)
class Holdout:
    """Evaluation rows: a profile (training items) and the items to predict.

    ``profile_rank`` (aligned with ``profile.indices``) is each profile item's position in its
    user's time order, 0 the oldest; None when the time order is unknown. The CSR itself is always
    in item-index order, so the rank is the only record of recency.
    """

    user_idx: np.ndarray  # int64 [m]; -1 for a user without training rows
    profile: CSR  # [m x n_items]
    predict: CSR  # [m x n_items]
    user_ids: np.ndarray | None = None  # original ids, for reporting
    profile_rank: np.ndarray | None = None  # int64 [profile.nnz]: 0 = the row's oldest item

    def __len__(self) -> int:
        return int(self.user_idx.shape[0])

    @classmethod
    def from_lists(cls, user_idx, profiles, predicts, n_items: int, user_ids=None) -> "Holdout":
        """A holdout from item-index lists; each profile lists its items oldest first (small inputs:
        tests; :meth:`from_entries` builds one from flat arrays without a Python loop)."""

        def flat(lists) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
            rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
            cols = np.concatenate([np.asarray(x, np.int64) for x in lists]) if len(lists) else np.zeros(0, np.int64)
            return rows, cols, np.arange(rows.size, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)

        p_rows, p_cols, p_pos = flat(profiles)
        q_rows, q_cols, _ = flat(predicts)
        return cls.from_entries(user_idx, p_rows, p_cols, p_pos, q_rows, q_cols, n_items, user_ids)

    @classmethod
    def from_entries(
        cls,
        user_idx,
        profile_rows,
        profile_items,
        profile_position,
        predict_rows,
        predict_items,
        n_items: int,
        user_ids=None,
    ) -> "Holdout":
        """A holdout from flat arrays, one entry per (row, item): ``profile_position`` is the item's
        place in its row's time order (any increasing key: only the order counts). Duplicate pairs
        are kept once (a profile item listed twice keeps its later position). Vectorised: memory and
        time grow with the number of entries, never with a Python object per row."""
        user_idx = np.asarray(user_idx, np.int64)
        m = user_idx.size
        rows = np.asarray(profile_rows, np.int64)
        cols = np.asarray(profile_items, np.int64)
        position = np.asarray(profile_position, np.int64)
        if not (rows.shape == cols.shape == position.shape):
            raise ValueError(
                f"profile rows, items and positions differ in length: {rows.shape}, {cols.shape}, {position.shape}"
            )
        for name, r in (("profile", rows), ("predict", np.asarray(predict_rows, np.int64))):
            if r.size and (r.min() < 0 or r.max() >= m):
                raise ValueError(f"{name} entries name rows outside 0..{m - 1}")
        # CSR order (row, item); an item listed twice keeps its later position
        order = np.lexsort((-position, cols, rows))
        rows, cols, position = rows[order], cols[order], position[order]
        keep = np.ones(order.size, bool)
        keep[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        profile = CSR.from_pairs(rows[keep], cols[keep], m, n_items)
        return cls(
            user_idx,
            profile,
            CSR.from_pairs(predict_rows, predict_items, m, n_items),
            None if user_ids is None else np.asarray(user_ids, np.int64),
            ranks_in_rows(profile, position[keep]),
        )

    def recent_profile(self, max_len: int) -> CSR:
        """Each row's ``max_len`` most recent profile items (all of a shorter row). Without a time
        order (``profile_rank`` None) only rows that need no cut are allowed: a ValueError otherwise."""
        return self._recent(max_len)[0]

    def with_recent_profile(self, max_len: int) -> "Holdout":
        """This holdout with each profile cut to its ``max_len`` most recent items."""
        profile, rank = self._recent(max_len)
        return Holdout(self.user_idx, profile, self.predict, self.user_ids, rank)

    def _recent(self, max_len: int) -> tuple[CSR, np.ndarray | None]:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        lengths = self.profile.lengths()
        if not (lengths > max_len).any():
            return self.profile, self.profile_rank
        if self.profile_rank is None:
            rows = np.flatnonzero(lengths > max_len)
            raise ValueError(
                f"{rows.size} profile(s) are longer than {max_len} items (e.g. rows {rows[:5].tolist()}) but the "
                "holdout has no time order (profile_rank) to keep the most recent ones"
            )
        cut = np.repeat(np.maximum(lengths - max_len, 0), lengths)  # entries older than the last max_len
        keep = self.profile_rank >= cut
        indptr = np.zeros_like(self.profile.indptr)
        np.cumsum(np.minimum(lengths, max_len), out=indptr[1:])
        profile = CSR(indptr, self.profile.indices[keep], self.profile.n_cols)
        return profile, (self.profile_rank - cut)[keep]


@dataclass
class RecData:
    """Training interactions over the full catalogue plus the holdout."""

    users: IndexMap
    items: IndexMap
    train: CSR  # [n_users x n_items]
    train_ts: np.ndarray  # int64, aligned with train.indices
    holdout: Holdout | None = None
    extras: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.train.indices, minlength=self.n_items).astype(np.float32)

    @classmethod
    def from_frames(
        cls,
        train: pd.DataFrame,
        item_ids,
        holdout: pd.DataFrame | None = None,
    ) -> "RecData":
        """``train``: user_id, item_id, ts. ``holdout``: user_id, profile (list), predict (list)."""
        items = IndexMap.from_ids(item_ids)
        users = IndexMap.from_ids(train["user_id"].to_numpy())
        u = users.index(train["user_id"].to_numpy())
        i = items.index(train["item_id"].to_numpy())
        ts = train["ts"].to_numpy(np.int64) if "ts" in train else np.zeros(len(train), np.int64)
        # sort by (user, item) to align timestamps with CSR order
        order = np.lexsort((i, u))
        u, i, ts = u[order], i[order], ts[order]
        keep = np.ones(u.size, bool)
        keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
        csr = CSR.from_pairs(u[keep], i[keep], len(users), len(items))
        data = cls(users, items, csr, ts[keep])
        if holdout is not None:
            data.holdout = data.make_holdout(holdout)
        return data

    def make_holdout(self, holdout: pd.DataFrame) -> Holdout:
        """``holdout``: user_id, profile (item ids, oldest first: ``split_holdout`` stores them so),
        predict (item ids). For large holdouts see :meth:`holdout_from_entries` (no per-row lists)."""
        user_ids = holdout["user_id"].to_numpy(np.int64)
        user_idx = self.users.index(user_ids, allow_missing=True)
        profiles = [self.items.index(p) for p in holdout["profile"]]
        predicts = [self.items.index(p) for p in holdout["predict"]]
        return Holdout.from_lists(user_idx, profiles, predicts, self.n_items, user_ids)

    def holdout_from_entries(
        self, user_ids, profile_rows, profile_item_ids, profile_position, predict_rows, predict_item_ids
    ) -> Holdout:
        """A holdout of rows ``user_ids`` from flat (row, item id) entries (see :meth:`Holdout.from_entries`);
        an item id outside the catalogue raises :class:`UnknownIdError`, naming it as a holdout item."""
        user_ids = np.asarray(user_ids, np.int64)
        try:
            profile_items = self.items.index(profile_item_ids)
            predict_items = self.items.index(predict_item_ids)
        except UnknownIdError as exc:
            raise UnknownIdError(f"holdout items not in the catalogue: {exc.args[0]}") from None
        return Holdout.from_entries(
            self.users.index(user_ids, allow_missing=True),
            profile_rows,
            profile_items,
            profile_position,
            predict_rows,
            predict_items,
            self.n_items,
            user_ids,
        )

    def train_ranks(self) -> np.ndarray:
        """Each training row's position in its user's time order (aligned with ``train.indices``)."""
        return ranks_in_rows(self.train, self.train_ts)

    def validation_split(self, n: int = 1) -> tuple["RecData", Holdout]:
        """Carve each user's last ``n`` training rows (by time, ties by item index) into a
        validation holdout, for users with more than ``n`` rows. The test holdout is untouched."""
        rows = self.train.row_ids()
        cols = self.train.indices
        order = np.lexsort((cols, self.train_ts, rows))
        rows_o, cols_o, ts_o = rows[order], cols[order], self.train_ts[order]
        lengths = self.train.lengths()
        # position from the end within each user
        pos_from_end = np.repeat(self.train.indptr[1:], lengths) - 1 - np.arange(rows_o.size)
        is_val = (pos_from_end < n) & (lengths[rows_o] > n)
        fit_rows, fit_cols, fit_ts = rows_o[~is_val], cols_o[~is_val], ts_o[~is_val]
        o2 = np.lexsort((fit_cols, fit_rows))
        fit = RecData(
            self.users,
            self.items,
            CSR.from_pairs(fit_rows, fit_cols, self.n_users, self.n_items),
            fit_ts[o2],
            None,
            dict(self.extras),
        )
        val_users = np.unique(rows_o[is_val])
        profile = fit.train.take_rows(val_users)
        rank = fit.train_ranks()
        kept = np.repeat(np.isin(np.arange(self.n_users), val_users), fit.train.lengths())
        v_rows = np.searchsorted(val_users, rows_o[is_val])
        predict = CSR.from_pairs(v_rows, cols_o[is_val], val_users.size, self.n_items)
        return fit, Holdout(val_users, profile, predict, self.users.ids[val_users], rank[kept])
