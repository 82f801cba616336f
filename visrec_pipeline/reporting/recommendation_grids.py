"""Image grids of what one model recommends to a few holdout users, next to what they consumed and
what they went on to consume (no dagster)."""

from __future__ import annotations

import duckdb
import pandas as pd
from PIL import Image

from visrec_pipeline.model_io import holdout_by_profile_length, ok_image_paths
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import results_store
from visrec_pipeline.reporting.grids import image_grid_png, png_markdown

CANDIDATE_USERS = 50  # the longest profiles, among which users with a hit are shown first
SHOWN_CONSUMED = 8
SHOWN_RECOMMENDED = 10


def recommendation_grids_markdown(
    conn: duckdb.DuckDBPyConnection, ws: Workspace, summary: pd.DataFrame, *, model: str, n_users: int
) -> str:
    """Per sample user: last consumed items, the top-10 of ``model`` from ``recommendations`` (hits
    outlined), the ground truth. ``model`` empty: the one with the best nDCG@20 in ``summary``.
    Empty when nothing is recommended or evaluated yet."""
    if not results_store.has_recommendations(conn) or summary.empty:
        return ""
    if not model:
        nd = summary[summary["metric"] == "ndcg@20"]
        if nd.empty:
            return ""
        model = str(nd.sort_values("value", ascending=False)["model"].iloc[0])
    users = holdout_by_profile_length(conn, CANDIDATE_USERS)
    recs = results_store.top_recommendations(conn, model, SHOWN_RECOMMENDED)
    paths = ok_image_paths(conn)
    # prefer users with a hit, so the grid shows what a success looks like
    hit_users = set(recs.merge(users.explode("predict"), left_on=["user_id", "item_id"], right_on=["user_id", "predict"])["user_id"])
    order = sorted(users.index, key=lambda r: (users.at[r, "user_id"] not in hit_users, r))
    out = [f"### Recommendations of `{model}` (hits outlined in green)"]
    blank = Image.new("RGB", (256, 256), (200, 200, 200))

    def img(item_id):
        p = paths.get(int(item_id))
        return Image.open(ws.root / p).convert("RGB") if p else blank

    for r in order[:n_users]:
        user_id = int(users.at[r, "user_id"])
        profile = list(users.at[r, "profile"])[-SHOWN_CONSUMED:]
        predict = set(int(x) for x in users.at[r, "predict"])
        rec_items = recs.loc[recs["user_id"] == user_id, "item_id"].astype(int).tolist()
        images = [img(i) for i in profile] + [img(i) for i in rec_items] + [img(i) for i in predict]
        captions = [f"consumed {i}" for i in profile] + [f"#{k + 1} {i}" for k, i in enumerate(rec_items)] + [
            f"truth {i}" for i in predict
        ]
        outline = [None] * len(profile) + [("green" if i in predict else None) for i in rec_items] + ["blue"] * len(predict)
        png = image_grid_png(images, captions=captions, cols=8, outline=outline)
        out.append(
            f"**user {user_id}**: {len(users.at[r, 'profile'])} consumed (last {SHOWN_CONSUMED} shown), "
            f"top {SHOWN_RECOMMENDED}, ground truth"
        )
        out.append(png_markdown(png, f"user {user_id}"))
    return "\n\n".join(out)
