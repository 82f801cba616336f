"""Is the demo's visual signal visible to image features? A small self-contained check.

Per-user last-1 holdout (evaluation.md), VisRank (max cosine to the profile)
against MostPopular, AUC and Recall@k with profile items excluded and ties
broken by item index. Independent of ``recsys/`` on purpose: it validates the
generator, not the pipeline. Also offers a cheap colour/texture feature
extractor that reads the images the generator wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


@dataclass(frozen=True)
class HoldoutData:
    item_ids: np.ndarray  # sorted catalogue ids; features rows follow this order
    train_user: np.ndarray  # user index per training row
    train_item: np.ndarray  # item index per training row
    test_user: np.ndarray  # user index per holdout row (one per user with > 1 interaction)
    test_item: np.ndarray  # held-out item index per holdout row
    n_users: int


def holdout_from_rows(user_id, item_id, ts, item_ids: np.ndarray) -> HoldoutData:
    """Dedup keep-latest, then each user's last interaction (ts, item_id, user_id order) is held out."""
    df = pd.DataFrame({"user_id": np.asarray(user_id, np.int64), "item_id": np.asarray(item_id, np.int64),
                       "timestamp": np.asarray(ts, np.int64)})
    df = df.sort_values(["timestamp", "item_id", "user_id"]).drop_duplicates(["user_id", "item_id"], keep="last")
    item_ids = np.sort(np.asarray(item_ids, np.int64))
    user_ids = np.unique(df["user_id"].to_numpy(np.int64))
    u = np.searchsorted(user_ids, df["user_id"].to_numpy(np.int64))
    i = np.searchsorted(item_ids, df["item_id"].to_numpy(np.int64))
    if not np.array_equal(item_ids[np.minimum(i, item_ids.size - 1)], df["item_id"].to_numpy(np.int64)):
        raise ValueError("interactions name items missing from the catalogue")
    # Rows are time-ordered, so the last row of each user is their latest.
    last = np.zeros(u.size, bool)
    order = np.argsort(u, kind="stable")
    ends = np.r_[np.nonzero(np.diff(u[order]))[0], u.size - 1]
    sizes = np.bincount(u, minlength=user_ids.size)
    held = order[ends][sizes[u[order[ends]]] > 1]
    last[held] = True
    return HoldoutData(item_ids, u[~last], i[~last], u[last], i[last], int(user_ids.size))


def load_holdout(dataset_dir: Path) -> HoldoutData:
    """The last-1 holdout of a dataset folder's ``interactions.csv`` over the items of ``items.csv``."""
    df = pd.read_csv(Path(dataset_dir) / "interactions.csv")
    items = pd.read_csv(Path(dataset_dir) / "items.csv")
    try:
        return holdout_from_rows(df["user_id"], df["item_id"], df["timestamp"], items["item_id"].to_numpy(np.int64))
    except ValueError as exc:
        raise ValueError(f"{dataset_dir}: {exc}") from None


def _profile_mask(data: HoldoutData, users: np.ndarray) -> np.ndarray:
    """[len(users), n_items] bool: items in each holdout user's training profile."""
    row_of_user = np.full(data.n_users, -1)
    row_of_user[users] = np.arange(users.size)
    mask = np.zeros((users.size, data.item_ids.size), bool)
    r = row_of_user[data.train_user]
    keep = r >= 0
    mask[r[keep], data.train_item[keep]] = True
    return mask


def rank_metrics(scores: np.ndarray, profile: np.ndarray, target: np.ndarray, ks=(20, 100)) -> dict[str, float]:
    """Mean AUC and R@k of one relevant item per row; profile items are not candidates."""
    n_items = scores.shape[1]
    s = np.where(profile, -np.inf, scores)
    rows = np.arange(s.shape[0])
    t = s[rows, target][:, None]
    idx = np.arange(n_items)[None, :]
    ahead = ((s > t) | ((s == t) & (idx < target[:, None]))) & ~profile
    rank = ahead.sum(axis=1)
    n_cand = n_items - profile.sum(axis=1)
    auc = np.where(n_cand > 1, (n_cand - 1 - rank) / np.maximum(n_cand - 1, 1), 1.0)
    out = {"AUC": float(auc.mean())}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).mean())
    return out


def most_popular_scores(data: HoldoutData) -> np.ndarray:
    return np.bincount(data.train_item, minlength=data.item_ids.size).astype(np.float64)


def _unit(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def visrank_scores(features: np.ndarray, data: HoldoutData, users: np.ndarray, *, centre: str = "") -> np.ndarray:
    """[len(users), n_items]: max cosine between each item and the user's profile items.

    ``centre``: "" raw features; "mean" subtract the catalogue mean first; "unit-mean"
    L2-normalise, then subtract the mean (a random-init ReLU net without biases is
    positively homogeneous, so its raw feature norm mostly tracks input contrast and
    plain centring leaves little but that norm).
    """
    f = np.asarray(features, np.float64)
    if centre == "unit-mean":
        f = _unit(f)
    if centre:
        f = f - f.mean(axis=0, keepdims=True)
    f = _unit(f)
    sim = (f @ f.T).astype(np.float32)
    profile = _profile_mask(data, users)
    out = np.empty((users.size, f.shape[0]), np.float32)
    for r in range(users.size):  # one [profile, n_items] max per user, not per item
        out[r] = sim[profile[r]].max(axis=0)
    return out


def evaluate(features: dict[str, np.ndarray], data: HoldoutData, ks=(20, 100)) -> dict[str, dict[str, float]]:
    """MostPopular, and VisRank on each named feature matrix: raw, mean-centred, L2-normalised then centred."""
    users = data.test_user
    profile = _profile_mask(data, users)
    pop = np.broadcast_to(most_popular_scores(data), profile.shape)
    report = {"MostPopular": rank_metrics(pop, profile, data.test_item, ks)}
    for name, feats in features.items():
        for centre in ("", "mean", "unit-mean"):
            label = f"VisRank[{name}{', centred ' + centre if centre else ''}]"
            report[label] = rank_metrics(visrank_scores(feats, data, users, centre=centre), profile, data.test_item, ks)
    return report


def image_paths(dataset_dir: Path, item_ids: np.ndarray) -> list[Path]:
    images = Path(dataset_dir) / "images"
    out = []
    for item_id in item_ids.tolist():
        jpg = images / f"{int(item_id)}.jpg"
        out.append(jpg if jpg.exists() else images / f"{int(item_id)}.png")
    return out


def _thumbnail(path: Path, size: int) -> np.ndarray:
    """Centre square crop resized to ``size`` (the same framing as a 224 centre crop), RGB float in [0, 1]."""
    with Image.open(path) as im:
        im.draft("RGB", (size * 2, size * 2))  # fast JPEG decode at reduced scale
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(im, np.float32) / 255.0


def colour_texture_features(paths: list[Path], *, size: int = 64, texture: bool = True) -> np.ndarray:
    """A joint HSV colour histogram (8x3x3), plus gradient-orientation/energy statistics when ``texture``."""
    feats = []
    for p in paths:
        rgb = _thumbnail(p, size)
        hsv = np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).convert("HSV"), np.float32) / 255.0
        hb = np.minimum((hsv[..., 0] * 8).astype(int), 7)
        sb = np.minimum((hsv[..., 1] * 3).astype(int), 2)
        vb = np.minimum((hsv[..., 2] * 3).astype(int), 2)
        hist = np.bincount((hb * 9 + sb * 3 + vb).ravel(), minlength=72).astype(np.float64)
        parts = [hist / hist.sum()]
        if texture:
            g = rgb.mean(axis=2)
            gx, gy = np.diff(g, axis=1)[:-1], np.diff(g, axis=0)[:, :-1]
            mag = np.hypot(gx, gy)
            ang = np.mod(np.arctan2(gy, gx), np.pi)
            ob = np.minimum((ang / np.pi * 8).astype(int), 7)
            orient = np.bincount(ob.ravel(), weights=mag.ravel(), minlength=8)
            energy = np.array([mag.mean(), (mag > 0.05).mean(), (mag > 0.2).mean()])
            parts += [orient / max(orient.sum(), 1e-9) * 0.5, energy]
        feats.append(np.concatenate(parts))
    return np.stack(feats)
