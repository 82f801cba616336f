"""Profiles keep their time order from the SQL split to evaluation: protocol="tutorial" scores and
excludes each user's last 10 profile items by time, max_profile_len shows a model the most recent
ones, and the standard protocol is unchanged. A hand-made dataset where the last 10 items by time
are not the 10 highest ids."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from visrec_pipeline.ingest import build_catalog, build_interactions, build_split, ingest_batch
from visrec_pipeline.model_io import load_rec_data
from visrec_pipeline.recsys.evaluate import TUTORIAL_PROFILE_LEN, evaluate, top_k

# user 1 consumed items 100..113 from the highest id down (113 first), then 200, held out (last);
# user 2 consumed 100..113 in ascending order, then 201
ITEMS = list(range(100, 114))
OLD_FIRST_1 = ITEMS[::-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [(1, item, 10 + t) for t, item in enumerate(OLD_FIRST_1)] + [(1, 200, 99)]
    rows += [(2, item, 10 + t) for t, item in enumerate(ITEMS)] + [(2, 201, 99)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    path = tmp_path_factory.mktemp("recency") / "interactions.csv"
    frame.to_csv(path, index=False)
    with duckdb.connect() as conn:
        ingest_batch(conn, "initial", path)
        build_interactions(conn)
        build_catalog(conn, None)
        build_split(conn)
        stored = conn.execute("SELECT user_id, profile FROM split_holdout ORDER BY user_id").fetchall()
        data = load_rec_data(conn)
    assert stored == [(1, OLD_FIRST_1), (2, ITEMS)]  # the split keeps each profile in time order
    return data


def _recording_scores(data, favourite: dict[int, int], calls: list):
    """Every item scores 0 except the held-out item (1.0) and one profile item per user (2.0)."""
    table = torch.zeros((len(data.holdout), data.n_items))
    for row, user in enumerate(data.holdout.user_ids):
        table[row, data.holdout.predict.row(row)] = 1.0
        table[row, data.items.index([favourite[int(user)]])[0]] = 2.0

    def score(batch):
        calls.append(batch)
        return table[batch.user_idx]

    return score


def _ids(data, batch, row) -> set[int]:
    return set(data.items.ids[batch.profile_items[row][batch.profile_mask[row]].numpy()].tolist())


def test_tutorial_protocol_scores_and_excludes_the_last_ten_items_by_time(data):
    assert TUTORIAL_PROFILE_LEN == 10
    last_ten = {1: set(OLD_FIRST_1[-10:]), 2: set(ITEMS[-10:])}
    assert last_ten[1] == set(range(100, 110)) != set(range(104, 114))  # not the 10 highest ids
    # each user's favourite is their OLDEST profile item: excluded under "standard", a candidate
    # that outranks the held-out item under "tutorial"
    favourite = {1: 113, 2: 100}
    calls: list = []
    tutorial = evaluate(_recording_scores(data, favourite, calls), data.holdout, data.n_items, ks=(1,), protocol="tutorial")
    shown = {int(data.holdout.user_ids[r]): _ids(data, b, i) for b in calls for i, r in enumerate(b.user_idx.tolist())}
    assert shown == last_ten
    assert tutorial.per_row["rr"].tolist() == [0.5, 0.5]  # the favourite ranks first, the held-out item second
    assert tutorial.per_row["n_candidates"].tolist() == [data.n_items - 10] * 2
    assert tutorial.per_row["profile_size"].tolist() == [14, 14]  # the full profile, for reports

    calls.clear()
    standard = evaluate(_recording_scores(data, favourite, calls), data.holdout, data.n_items, ks=(1,))
    shown = {int(data.holdout.user_ids[r]): _ids(data, b, i) for b in calls for i, r in enumerate(b.user_idx.tolist())}
    assert shown == {1: set(ITEMS), 2: set(ITEMS)}
    assert standard.per_row["rr"].tolist() == [1.0, 1.0]
    assert standard.per_row["n_candidates"].tolist() == [data.n_items - 14] * 2


def test_max_profile_len_shows_the_most_recent_items_and_still_excludes_all(data):
    favourite = {1: 113, 2: 100}
    calls: list = []
    cut = evaluate(_recording_scores(data, favourite, calls), data.holdout, data.n_items, ks=(1,), max_profile_len=3)
    shown = {int(data.holdout.user_ids[r]): _ids(data, b, i) for b in calls for i, r in enumerate(b.user_idx.tolist())}
    assert shown == {1: {102, 101, 100}, 2: {111, 112, 113}}
    assert cut.per_row["rr"].tolist() == [1.0, 1.0]  # the whole profile is still excluded

    calls.clear()
    items, _ = top_k(_recording_scores(data, favourite, calls), data.holdout, data.n_items, 1, max_profile_len=3)
    assert {int(data.holdout.user_ids[r]): _ids(data, calls[0], r) for r in range(2)} == shown
    assert data.items.ids[items[:, 0]].tolist() == [200, 201]


def test_recent_profiles_follow_the_training_times_of_the_validation_split(data):
    fit, validation = data.validation_split()
    # each user's newest training item (user 1: 100, user 2: 113) becomes the validation row
    assert data.items.ids[validation.predict.indices].tolist() == [100, 113]
    recent = validation.recent_profile(2)
    assert [sorted(data.items.ids[recent.row(r)].tolist()) for r in range(2)] == [[101, 102], [111, 112]]
    everyone = top_k(lambda b: torch.zeros((len(b.user_idx), data.n_items)), fit, data.n_items, 1, max_profile_len=2)
    assert everyone[0].shape == (2, 1)


def test_a_cut_without_a_time_order_is_an_error(data):
    from visrec_pipeline.recsys.data import Holdout

    unordered = Holdout(data.holdout.user_idx, data.holdout.profile, data.holdout.predict)
    with pytest.raises(ValueError, match="no time order"):
        unordered.recent_profile(5)
    assert unordered.recent_profile(14) is unordered.profile  # nothing to cut: no order needed
    with pytest.raises(ValueError, match="no time order"):
        evaluate(lambda b: torch.zeros((len(b.user_idx), data.n_items)), unordered, data.n_items, protocol="tutorial")
    # the cut keeps ranks 0..3 in item-index order: user 1's lowest id (100) is the newest
    assert np.array_equal(data.holdout.with_recent_profile(4).profile_rank, [3, 2, 1, 0, 0, 1, 2, 3])
