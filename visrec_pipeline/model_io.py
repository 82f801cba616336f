"""Glue between the DuckDB tables / file stores and the recommender library.

Plain Python (no Dagster): the use cases of ``visrec_pipeline.pipeline`` and the
report call these, and so can a notebook or a benchmark.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pandas as pd
import torch

from visrec_pipeline import db
from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.paths import Workspace
from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.data import Holdout, IndexMap, RecData


def load_rec_data(conn: duckdb.DuckDBPyConnection) -> RecData:
    """Training rows and holdout from ``split_*`` over the catalogue from ``item_catalog``."""
    train = conn.execute("SELECT user_id, item_id, ts FROM split_train").df()
    item_ids = conn.execute("SELECT item_id FROM item_catalog ORDER BY item_id").fetchnumpy()["item_id"]
    data = RecData.from_frames(train, item_ids)
    data.holdout = load_holdout(conn, data)
    return data


def load_holdout(conn: duckdb.DuckDBPyConnection, data: RecData) -> Holdout:
    """``split_holdout`` as CSR arrays against ``data``'s user and item index: DuckDB unnests the
    lists into flat columns (no Python object per user), rows in ascending ``user_id``."""
    user_ids = conn.execute("SELECT user_id FROM split_holdout ORDER BY user_id").fetchnumpy()["user_id"]
    user_ids = np.asarray(user_ids, np.int64)
    if user_ids.size > 1 and (np.diff(user_ids) == 0).any():
        dup = user_ids[1:][np.diff(user_ids) == 0]
        raise ValueError(f"split_holdout has several rows for user_id {dup[:5].tolist()}: re-materialize split")
    # list positions are 1-based and in time order (split_holdout stores profiles oldest first)
    profile = conn.execute(
        "SELECT user_id, unnest(profile) AS item_id, generate_subscripts(profile, 1) AS pos FROM split_holdout"
    ).fetchnumpy()
    predict = conn.execute("SELECT user_id, unnest(predict) AS item_id FROM split_holdout").fetchnumpy()
    return data.holdout_from_entries(
        user_ids,
        np.searchsorted(user_ids, np.asarray(profile["user_id"], np.int64)),
        profile["item_id"],
        profile["pos"],
        np.searchsorted(user_ids, np.asarray(predict["user_id"], np.int64)),
        predict["item_id"],
    )


def holdout_by_profile_length(conn: duckdb.DuckDBPyConnection, limit: int) -> pd.DataFrame:
    """``user_id, profile, predict`` of the ``limit`` holdout rows with the longest profiles (ties: user id)."""
    return conn.execute(
        "SELECT user_id, profile, predict FROM split_holdout ORDER BY len(profile) DESC, user_id LIMIT ?", [limit]
    ).df()


def table_fingerprint(conn: duckdb.DuckDBPyConnection, table: str, columns: str) -> str:
    """A short content hash of a table (order-independent), for lineage in checkpoints."""
    if not db.table_exists(conn, table):
        return "absent"
    # table/columns are constants chosen by our code, never user input
    n, h = conn.execute(f"SELECT count(*), coalesce(sum(hash({columns})), 0) FROM {table}").fetchone()
    return hashlib.sha256(f"{table}:{n}:{h}".encode()).hexdigest()[:16]


def data_versions(conn: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return {
        "split_train": table_fingerprint(conn, "split_train", "user_id, item_id, ts"),
        "split_holdout": table_fingerprint(conn, "split_holdout", "user_id, profile, predict"),
        "item_catalog": table_fingerprint(conn, "item_catalog", "item_id, creator"),
        "item_images": table_fingerprint(conn, "item_images", "item_id, content_hash, status"),
    }


def item_creators(conn: duckdb.DuckDBPyConnection, items: IndexMap) -> np.ndarray:
    """Creator of every item as a dense integer code (-1 when unknown), aligned with ``items``."""
    df = conn.execute("SELECT item_id, creator FROM item_catalog").df()
    codes = np.full(len(items), -1, np.int64)
    known = df[df["creator"].notna() & (df["creator"].astype(str).str.len() > 0)]
    if len(known):
        cat = pd.Categorical(known["creator"].astype(str))
        idx = items.index(known["item_id"].to_numpy(), allow_missing=True)
        ok = idx >= 0
        codes[idx[ok]] = cat.codes[ok]
    return codes


def item_clusters(conn: duckdb.DuckDBPyConnection, items: IndexMap, backbone: str = FEATURE_BACKBONE) -> np.ndarray:
    clusters = np.full(len(items), -1, np.int64)
    if not db.table_exists(conn, "visual_clusters"):
        return clusters
    df = conn.execute("SELECT item_id, cluster FROM visual_clusters WHERE backbone = ?", [backbone]).df()
    idx = items.index(df["item_id"].to_numpy(), allow_missing=True)
    ok = idx >= 0
    clusters[idx[ok]] = df["cluster"].to_numpy(np.int64)[ok]
    return clusters


def ok_image_paths(conn: duckdb.DuckDBPyConnection) -> dict[int, str]:
    """``item_id -> thumbnail path`` (relative to the workspace root) of every item with a valid image."""
    return dict(conn.execute("SELECT item_id, path FROM item_images WHERE status = 'ok'").fetchall())


def item_image_paths(conn: duckdb.DuckDBPyConnection, ws: Workspace, items: IndexMap) -> list[Path | None]:
    """Thumbnail path of every item (None where no valid image), aligned with ``items``."""
    stored = ok_image_paths(conn)
    paths: list[Path | None] = [None] * len(items)
    idx = items.index(np.fromiter(stored, np.int64, len(stored)), allow_missing=True)
    for i, p in zip(idx.tolist(), stored.values()):
        if i >= 0:
            paths[i] = ws.root / p
    return paths


class NoImagesError(RuntimeError):
    """A model that trains on pixels was asked to run on a dataset without any image."""


def thumbnail_loader(paths: list[Path | None], size: int = 256) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(item_idx) -> uint8 [b, 3, size, size]``; a grey image where an item has no valid image."""
    from PIL import Image

    def load(item_idx: torch.Tensor) -> torch.Tensor:
        out = np.full((len(item_idx), size, size, 3), 127, np.uint8)
        for k, i in enumerate(item_idx.tolist()):
            p = paths[i]
            if p is not None:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if im.size != (size, size):
                        im = im.resize((size, size))
                    out[k] = np.asarray(im)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    return load


def build_inputs(
    ws: Workspace, needs: frozenset[str], data: RecData, conn: duckdb.DuckDBPyConnection | None = None
) -> FitInputs:
    """Load the side inputs a model declares (``features:<bb>``, ``spatial:<bb>``, ``images``,
    ``creators``/``clusters`` for guided triples), aligned with ``data.items``; through ``conn`` if
    given (opening a DuckDB database costs ~15 ms), else a connection of its own."""
    if conn is None:
        with db.connect(ws.db_path) as own:
            return build_inputs(ws, needs, data, own)
    inputs = FitInputs()
    item_ids = data.items.ids
    for need in needs:
        kind, _, backbone = need.partition(":")
        # memory-mapped (or read row by row on demand), never gathered here: see store.open_features
        if kind == "features":
            from visrec_pipeline.embeddings.store import open_features

            inputs.features, inputs.feature_mask = open_features(conn, ws.features_dir, backbone, item_ids, "pooled")
        elif kind == "spatial":
            from visrec_pipeline.embeddings.store import open_features

            inputs.spatial, mask = open_features(conn, ws.features_dir, backbone, item_ids, "spatial")
            if inputs.feature_mask is None:
                inputs.feature_mask = mask
    if "triples_guided" in needs:
        inputs.extra["triples_guided"] = load_guided_triples(ws, data.items)
    if "images" in needs:
        paths = item_image_paths(conn, ws, data.items)
        if data.n_items and not any(p is not None for p in paths):
            # training a CNN on grey placeholders only would run for hours and learn nothing
            raise NoImagesError(
                f"this model trains on item images, and none of the {data.n_items} items has an ok image in "
                f"item_images (dataset {ws.dataset_dir}: no images/ folder, or every image failed). Add images/ "
                "to the dataset folder, or set item_images' source to commons (titles in items.csv), and "
                "materialize item_images again; or leave this model out of the run."
            )
        inputs.images = thumbnail_loader(paths)
    inputs.creators = item_creators(conn, data.items)
    inputs.clusters = item_clusters(conn, data.items)
    return inputs


GUIDED_TRIPLES_FILE = "guided.npz"


def save_guided_triples(ws: Workspace, triples, items: IndexMap) -> Path:
    """Store guided triples with item IDS (not indices), so they stay valid if the catalogue grows."""
    from visrec_pipeline.atomic import atomic_path

    arrays = triples.to_arrays()
    for key in ("profile_indices", "pos", "neg"):
        arrays[key] = items.ids[arrays[key]]
    arrays.pop("n_items")
    path = ws.triples_dir / GUIDED_TRIPLES_FILE
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def load_guided_triples(ws: Workspace, items: IndexMap):
    """Guided triples re-indexed against ``items``; a triple naming an item that left the catalogue is dropped."""
    from visrec_pipeline.recsys.guided_sampler import GuidedTriples

    path = ws.triples_dir / GUIDED_TRIPLES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: materialize the triples_guided asset first")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    pos = items.index(arrays["pos"], allow_missing=True)
    neg = items.index(arrays["neg"], allow_missing=True)
    prof_items = items.index(arrays["profile_indices"], allow_missing=True)
    if (prof_items < 0).any():
        raise ValueError(f"{path}: profiles reference items no longer in the catalogue; re-materialize triples_guided")
    keep = (pos >= 0) & (neg >= 0)
    arrays.update(
        profile_indices=prof_items,
        n_items=np.asarray([len(items)], np.int64),
        pos=pos[keep],
        neg=neg[keep],
        profile_id=arrays["profile_id"][keep],
        guideline=arrays["guideline"][keep],
        user=arrays["user"][keep],
    )
    return GuidedTriples.from_arrays(arrays)
