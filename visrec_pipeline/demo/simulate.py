"""Decide everything a demo dataset contains (catalogue, users, interactions, later batches) in memory.

Independent random streams (``SeedSequence.spawn``) for the catalogue, the
behaviour, the later batches and the text, so e.g. tuning the behaviour never
changes the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visrec_pipeline.demo import behaviour as bh
from visrec_pipeline.demo.catalog import LAST_UPLOAD_YEAR, Catalog, make_creators, make_items, month_start, upload_months

# Initial interactions fall in [2016-02, 2022-07); later batch b covers the two
# months from 2022-07 + 2(b-1), with its new items uploaded the month before.
_PERIOD = (month_start(2016, 2), month_start(LAST_UPLOAD_YEAR + 1, 7))
_BATCH_MONTHS = 2
_BATCH_SHARE = 0.02  # later-batch rows per initial row
_NEW_ITEM_SHARE = 0.01
_NEW_USER_SHARE = 0.01


def batch_month(b: int) -> tuple[int, int]:
    """(year, month) of the first month of later batch ``b`` (1-based)."""
    m = 7 + _BATCH_MONTHS * (b - 1) - 1
    return LAST_UPLOAD_YEAR + 1 + m // 12, m % 12 + 1


@dataclass
class BuiltCatalog:
    catalog: Catalog  # initial + every batch's new items
    n_initial_items: int
    batch_item_slices: list[slice]
    creator_names: tuple[str, ...]


def build_catalog(rng: np.random.Generator, n_items: int, later_batches: int) -> BuiltCatalog:
    creators = make_creators(rng, max(8, n_items // 8))
    catalog = make_items(rng, creators, n_items, upload_months())
    slices = []
    n_new = max(3, round(_NEW_ITEM_SHARE * n_items))
    for b in range(1, later_batches + 1):
        y, m = batch_month(b)
        prev = (y, m - 1) if m > 1 else (y - 1, 12)
        fresh = make_items(rng, creators, n_new, [prev])
        slices.append(slice(len(catalog), len(catalog) + n_new))
        catalog = catalog.concat(fresh)
    return BuiltCatalog(catalog, n_items, slices, creators.names)


@dataclass
class BatchRows:
    name: str
    user: np.ndarray  # user index
    item: np.ndarray  # item index into the full catalogue
    ts: np.ndarray
    fresh: slice  # this batch's new items
    n_users: int
    n_new_users: int


@dataclass
class Simulation:
    """Everything a generation decides, before anything is written."""

    built: BuiltCatalog
    user_id: np.ndarray  # per user index (initial users first, then each batch's newcomers)
    user: np.ndarray  # initial rows, duplicates included
    item: np.ndarray
    ts: np.ndarray
    n_unique: int
    batches: list[BatchRows]
    text_rng: np.random.Generator


def simulate_demo(
    *, seed: int, n_items: int, n_users: int, target_interactions: int, later_batches: int,
    params: bh.BehaviourParams | None = None,
) -> Simulation:
    params = params or bh.BehaviourParams()
    streams = np.random.SeedSequence([int(seed), 0x56495352]).spawn(4)
    catalog_rng, behaviour_rng, batch_rng, text_rng = (np.random.default_rng(s) for s in streams)

    built = build_catalog(catalog_rng, n_items, later_batches)
    cat = built.catalog
    n_new_users = max(1, round(_NEW_USER_SHARE * n_users))
    pop = bh.make_population(behaviour_rng, n_users + n_new_users * later_batches, params)
    model = bh.ChoiceModel(cat, pop, len(built.creator_names), params)

    # Initial interactions.
    cap = int(params.max_share_of_catalog * n_items)
    counts = bh.activity_counts(behaviour_rng, n_users, target_interactions, cap, params)
    timelines = bh.user_timelines(behaviour_rng, counts, cat.upload_end[:n_items], _PERIOD, params)
    u, i, t = bh.simulate(behaviour_rng, model, np.arange(n_users), timelines)
    n_unique = u.size
    u, i, t = bh.add_duplicates(behaviour_rng, u, i, t, cat.upload_end, params.duplicate_share)

    # Later batches: mostly returning users, a few new ones, a few fresh uploads.
    batches = []
    for b in range(1, later_batches + 1):
        y, m = batch_month(b)
        window = (month_start(y, m), month_start(y, m + _BATCH_MONTHS))
        n_returning = max(1, min(n_users, round(_BATCH_SHARE * n_unique / 2.5)))
        returning = np.sort(batch_rng.choice(n_users, size=n_returning, replace=False, p=counts / counts.sum()))
        newcomers = np.arange(n_users + (b - 1) * n_new_users, n_users + b * n_new_users)
        users = np.concatenate([returning, newcomers])
        per_user = np.concatenate(
            [batch_rng.integers(1, 5, size=returning.size), batch_rng.integers(3, 7, size=newcomers.size)]
        )
        lines = [
            bh.strictly_increasing(np.sort(batch_rng.uniform(window[0], window[1] - 3600, size=int(n))).astype(np.int64))
            for n in per_user
        ]
        fresh = built.batch_item_slices[b - 1]
        boost = np.zeros(len(cat))
        boost[fresh] = params.new_item_boost
        bu, bi, btt = bh.simulate(batch_rng, model, users, lines, boost=boost, progress_override=1.0)
        batches.append(BatchRows(f"batch_{b:03d}", bu, bi, btt, fresh, int(users.size), int(newcomers.size)))
    return Simulation(built, pop.user_id, u, i, t, int(n_unique), batches, text_rng)
