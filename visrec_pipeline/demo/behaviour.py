"""Simulated users choosing items: looks first, then popularity and creator loyalty.

Each user has a taste over the latent look attributes (``catalog.py``) that
drifts slowly from ``taste_start`` to ``taste_end`` over the user's active
period. At every step a user picks one unseen, already uploaded item with
probability ``softmax(beta * affinity + gamma * log_popularity + loyalty *
log1p(#items already taken from the same creator))`` (Gumbel-max sampling).
All users advance together one step at a time, so each step is one
vectorised [active users x items] operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visrec_pipeline.demo.catalog import BRIGHTNESS, PALETTES, SHAPES, TEXTURES, Catalog

DAY = 86_400


@dataclass(frozen=True)
class BehaviourParams:
    # Tuned so that VisRank on random-init ResNet-50 features clearly beats MostPopular,
    # which itself stays well above chance (see tests/test_demo_generator.py).
    beta: float = 8.0  # weight of visual affinity (dominant)
    gamma: float = 1.0  # weight of an item's intrinsic log popularity (moderate)
    loyalty: float = 1.0  # weight of log1p(items already taken from that creator) (moderate)
    # Affinity weights of the attribute blocks; palette and brightness lead, as they do on
    # Commons thumbnails (and as a random-init CNN sees them best).
    w_palette: float = 1.0
    w_texture: float = 0.4
    w_shape: float = 0.2
    w_brightness: float = 0.8
    activity_sigma: float = 1.1  # spread of the log-normal activity per user
    min_per_user: int = 3
    max_share_of_catalog: float = 0.4  # a heavy user sees at most this share of the items
    available_margin: int = 40  # at step k at least k + margin items are already uploaded
    duplicate_share: float = 0.01  # exact (user, item) repeats with an earlier timestamp
    new_item_boost: float = 1.0  # extra log popularity of fresh uploads in a later batch


@dataclass
class Population:
    user_id: np.ndarray  # int64, distinct
    taste_start: np.ndarray  # [n_users, 22]
    taste_end: np.ndarray  # [n_users, 22]


def _block_slices() -> list[slice]:
    sizes = [len(PALETTES), len(TEXTURES), len(SHAPES), len(BRIGHTNESS)]
    edges = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def make_population(rng: np.random.Generator, n_users: int, params: BehaviourParams) -> Population:
    pal, tex, shp, bri = _block_slices()
    n_pal, n_tex = pal.stop - pal.start, tex.stop - tex.start
    start = np.zeros((n_users, bri.stop))
    rows = np.arange(n_users)
    fav_pal = np.stack([rng.permutation(n_pal)[:3] for _ in range(n_users)])  # 2 liked, 1 for the drift
    fav_tex = np.stack([rng.permutation(n_tex)[:3] for _ in range(n_users)])
    second_pal = rng.random(n_users) < 0.7  # most users like two palettes
    second_tex = rng.random(n_users) < 0.5
    start[rows, pal.start + fav_pal[:, 0]] = params.w_palette
    start[rows, pal.start + fav_pal[:, 1]] = np.where(second_pal, 0.7 * params.w_palette, 0.0)
    start[rows, tex.start + fav_tex[:, 0]] = params.w_texture
    start[rows, tex.start + fav_tex[:, 1]] = np.where(second_tex, 0.6 * params.w_texture, 0.0)
    start[rows, shp.start + rng.integers(shp.stop - shp.start, size=n_users)] = params.w_shape
    fav_bri = rng.integers(bri.stop - bri.start, size=n_users)
    start[rows, bri.start + fav_bri] = params.w_brightness
    # The neighbouring brightness level is half-liked (dark~mid~light).
    for step in (-1, 1):
        nb = fav_bri + step
        ok = (nb >= 0) & (nb < bri.stop - bri.start)
        start[rows[ok], bri.start + nb[ok]] = 0.5 * params.w_brightness
    # Drift: the second palette (or the only one's companion) gives way to a new one;
    # half of the users also move their second texture.
    end = start.copy()
    end[rows, pal.start + fav_pal[:, 1]] = 0.0
    end[rows, pal.start + fav_pal[:, 2]] = 0.7 * params.w_palette
    move_tex = rng.random(n_users) < 0.5
    end[rows[move_tex], tex.start + fav_tex[move_tex, 1]] = 0.0
    end[rows[move_tex], tex.start + fav_tex[move_tex, 2]] = 0.6 * params.w_texture
    user_id = np.sort(rng.choice(np.arange(10_000, 1_000_000), size=n_users, replace=False)).astype(np.int64)
    user_id = rng.permutation(user_id)  # ids carry no order information
    return Population(user_id=user_id, taste_start=start, taste_end=end)


def activity_counts(rng: np.random.Generator, n_users: int, target: int, cap: int, params: BehaviourParams) -> np.ndarray:
    """Long-tailed interactions per user, each in [min_per_user, cap], summing to about ``target``."""
    lo = params.min_per_user
    if not lo * n_users <= target <= cap * n_users:
        raise ValueError(f"target_interactions={target} impossible for {n_users} users with {lo}..{cap} each")
    z = rng.standard_normal(n_users)

    def total(mu: float) -> np.ndarray:
        return np.clip(np.round(np.exp(mu + params.activity_sigma * z)), lo, cap).astype(np.int64)

    a, b = -5.0, 12.0
    for _ in range(60):  # bisection on the log-median
        mid = (a + b) / 2
        if total(mid).sum() < target:
            a = mid
        else:
            b = mid
    return total(b)


@dataclass
class _State:
    consumed: np.ndarray  # bool [n_users, n_items]
    creator_count: np.ndarray  # int32 [n_users, n_creators]


class ChoiceModel:
    """Samples each user's next item given time, drift progress and history."""

    def __init__(self, catalog: Catalog, pop: Population, n_creators: int, params: BehaviourParams):
        x = catalog.attribute_onehots()
        self.catalog = catalog
        self.params = params
        self.affinity_start = pop.taste_start @ x.T  # [n_users, n_items]
        self.affinity_end = pop.taste_end @ x.T
        self.base = params.gamma * catalog.log_popularity
        self.state = _State(
            consumed=np.zeros((len(pop.user_id), len(catalog)), bool),
            creator_count=np.zeros((len(pop.user_id), n_creators), np.int32),
        )

    def choose(
        self, rng: np.random.Generator, users: np.ndarray, ts: np.ndarray, progress: np.ndarray, boost: np.ndarray | None = None
    ) -> np.ndarray:
        """One item index per user in ``users`` (distinct users), chosen at times ``ts``."""
        p, cat, st = self.params, self.catalog, self.state
        s = progress[:, None]
        logits = p.beta * ((1.0 - s) * self.affinity_start[users] + s * self.affinity_end[users]) + self.base
        if boost is not None:
            logits = logits + boost
        logits += p.loyalty * np.log1p(st.creator_count[users][:, cat.creator])
        allowed = (cat.upload_end[None, :] <= ts[:, None]) & ~st.consumed[users]
        if not allowed.any(axis=1).all():
            raise RuntimeError("a simulated user ran out of available items; lower max_share_of_catalog")
        logits = np.where(allowed, logits + rng.gumbel(size=logits.shape), -np.inf)
        picked = np.argmax(logits, axis=1)
        st.consumed[users, picked] = True
        np.add.at(st.creator_count, (users, cat.creator[picked]), 1)
        return picked


def strictly_increasing(ts: np.ndarray) -> np.ndarray:
    """Smallest integer sequence >= ``ts`` (sorted) with no two equal values."""
    k = np.arange(ts.size, dtype=np.int64)
    return np.maximum.accumulate(ts.astype(np.int64) - k) + k


def user_timelines(
    rng: np.random.Generator,
    counts: np.ndarray,
    upload_end: np.ndarray,
    period: tuple[int, int],
    params: BehaviourParams,
) -> list[np.ndarray]:
    """Sorted, distinct interaction times per user inside ``period``.

    The k-th interaction never comes before ``k + available_margin`` items exist,
    so even an early heavy user always has unseen items to choose from.
    """
    p_start, p_end = period
    ready = np.sort(upload_end)
    out = []
    for n in counts:
        start = rng.uniform(p_start, p_end - 120 * DAY)
        length = min(p_end - start, max(60 * DAY, rng.lognormal(np.log(420 * DAY), 0.7) * (1 + n / 150)))
        ts = np.sort(rng.uniform(start, start + length, size=int(n))).astype(np.int64)
        need = ready[np.minimum(np.arange(n) + params.available_margin, ready.size - 1)]
        ts = strictly_increasing(np.maximum(ts, need))
        if ts[-1] >= p_end:
            raise RuntimeError("interaction times overflowed the period; lower max_share_of_catalog")
        out.append(ts)
    return out


def simulate(
    rng: np.random.Generator,
    model: ChoiceModel,
    users: np.ndarray,
    timelines: list[np.ndarray],
    boost: np.ndarray | None = None,
    progress_override: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run every user in ``users`` through their timeline; returns (user_idx, item_idx, ts) rows."""
    lengths = np.array([t.size for t in timelines], np.int64)
    n_steps = int(lengths.max()) if lengths.size else 0
    padded = np.zeros((len(users), max(n_steps, 1)), np.int64)
    for r, t in enumerate(timelines):
        padded[r, : t.size] = t
    out_u, out_i, out_t = [], [], []
    for k in range(n_steps):
        active = np.nonzero(lengths > k)[0]
        ts = padded[active, k]
        if progress_override is None:
            progress = k / np.maximum(lengths[active] - 1, 1)
        else:
            progress = np.full(active.size, progress_override)
        picked = model.choose(rng, users[active], ts, progress.astype(np.float64), boost)
        out_u.append(users[active])
        out_i.append(picked)
        out_t.append(ts)
    if not out_u:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_t)


def add_duplicates(
    rng: np.random.Generator, user: np.ndarray, item: np.ndarray, ts: np.ndarray, upload_end: np.ndarray, share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repeat ~``share`` of the rows with an EARLIER time, so keep-latest dedup restores the originals."""
    n = int(round(share * user.size))
    if n == 0:
        return user, item, ts
    rows = np.sort(rng.choice(user.size, size=n, replace=False))
    lo = upload_end[item[rows]]
    hi = ts[rows]
    ok = hi - lo > 1
    rows, lo, hi = rows[ok], lo[ok], hi[ok]
    dup_ts = lo + (rng.random(rows.size) * (hi - lo - 1)).astype(np.int64)
    return (
        np.concatenate([user, user[rows]]),
        np.concatenate([item, item[rows]]),
        np.concatenate([ts, dup_ts]),
    )
