"""Synthetic power-law datasets at scale (no images), written as a dataset folder with its own features.

What ``bench/scale.py`` measures the models on, and what ``VISREC_DATASET=<folder> make demo`` can read:

```
<folder>/
  interactions.parquet               user_id, item_id, timestamp (unix seconds)
  items.csv                          item_id,title,creator,url (no titles: nothing is fetched from Commons)
  features/<backbone>.npy            float16 [n_items, d]          pooled features ("bring your own features")
  features/<backbone>_ids.npy        int64 [n_items]               their item ids, ascending
  features/<backbone>_spatial.npy    float16 [n_items, regions, d] feature maps, same ids
  scale.json                         the size, seed and counts it was generated with
```

Item popularity is Zipf (a random rank per item), user activity heavy-tailed (log-normal, at least
two interactions each, so every user has a holdout row), and each user draws most of their items
from one favourite visual cluster, so the features carry signal. Every item has at least one
interaction, so the catalogue the pipeline builds (items with interactions) is the feature rows, in
order. Features are written in blocks of rows straight to the files (never a whole array in
memory: the spatial maps of size L are 20 GB); the folder is built next to its target and renamed
into place, under a lock.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.demo.folder import folder_lock, make_temp_sibling, remove_leftovers, swap_into_place

if TYPE_CHECKING:
    from visrec_pipeline.recsys.base import FitInputs
    from visrec_pipeline.recsys.data import RecData

FORMAT_VERSION = 2  # 2: feature maps computed in float16
USER_ID_BASE = 1
ITEM_ID_BASE = 10_000_000
TS_START = 1_600_000_000  # 2020-09-13
TS_SPAN = 2 * 365 * 86_400


@dataclass(frozen=True)
class ScaleSize:
    name: str
    interactions: int
    items: int
    users: int
    dim: int = 2048  # ResNet-50's pooled width
    regions: int = 49  # ResNet-50's 7 x 7 feature map

    @property
    def spatial_bytes(self) -> int:
        return self.items * self.regions * self.dim * 2


SIZES: dict[str, ScaleSize] = {
    # XS: seconds, for tests; S/M/L: the sizes of issue 13
    "XS": ScaleSize("XS", 3_000, 400, 120, dim=64, regions=49),
    "S": ScaleSize("S", 100_000, 10_000, 2_000),
    "M": ScaleSize("M", 500_000, 50_000, 10_000),
    "L": ScaleSize("L", 1_000_000, 100_000, 20_000),
}


def size_named(name: str) -> ScaleSize:
    try:
        return SIZES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown size {name!r}; known: {', '.join(SIZES)}") from None


def item_ids(n_items: int) -> np.ndarray:
    return ITEM_ID_BASE + np.arange(n_items, dtype=np.int64)


def user_ids(n_users: int) -> np.ndarray:
    return USER_ID_BASE + np.arange(n_users, dtype=np.int64)


def n_clusters_for(n_items: int) -> int:
    return int(np.clip(round(np.sqrt(n_items) / 2), 4, 200))


# ------------------------------------------------------------------------------------ interactions


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: ``u`` uniform in [0, 1) -> indices with probabilities ``diff(cdf)``."""
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), cdf.size - 1)


def user_activity(size: ScaleSize, rng: np.random.Generator) -> np.ndarray:
    """Interactions per user: log-normal (heavy tail), at least 2, at most a fifth of the catalogue,
    summing to ``size.interactions``."""
    n_u, total = size.users, size.interactions
    if total < 2 * n_u:
        raise ValueError(f"size {size.name}: {total} interactions cannot give {n_u} users two each")
    cap = max(2, size.items // 5)
    weights = rng.lognormal(0.0, 1.2, n_u)
    counts = 2 + np.floor(weights / weights.sum() * (total - 2 * n_u)).astype(np.int64)
    counts = np.minimum(counts, cap)
    short = total - int(counts.sum())
    while short > 0:  # hand the rounding remainder (and what the cap cut) to users below the cap, by weight
        room = np.flatnonzero(counts < cap)
        if room.size == 0:
            raise ValueError(f"size {size.name}: {total} interactions do not fit {n_u} users x {cap} items")
        extra = rng.choice(room, size=min(short, room.size), replace=False, p=weights[room] / weights[room].sum())
        counts[extra] += 1
        short = total - int(counts.sum())
    return counts


@dataclass
class Interactions:
    user_idx: np.ndarray  # int64 [n]
    item_idx: np.ndarray  # int64 [n]
    ts: np.ndarray  # int64 [n]
    clusters: np.ndarray  # int64 [n_items]: the visual cluster of every item
    creators: np.ndarray  # int64 [n_items]: creator code, -1 unknown


def make_interactions(size: ScaleSize, seed: int = 0) -> Interactions:
    """Distinct (user, item) pairs: ``size.interactions`` rows, every item at least once."""
    rng = np.random.default_rng([seed, 13])
    n_i, n_u = size.items, size.users
    k = n_clusters_for(n_i)
    clusters = rng.integers(0, k, n_i)
    popularity = 1.0 / (1.0 + rng.permutation(n_i)) ** 0.9  # Zipf over a random rank
    by_cluster = np.argsort(clusters, kind="stable")
    seg_start = np.searchsorted(clusters[by_cluster], np.arange(k + 1))
    cluster_cdf = np.cumsum(popularity[by_cluster])  # cluster c is the segment [seg_start[c], seg_start[c+1])
    global_cdf = np.cumsum(popularity)
    favourite = clusters[rng.integers(0, n_i, n_u)]  # a cluster that has items

    counts = user_activity(size, rng)
    # every item once, given to a user drawn by activity; the rest of each user's rows are drawn below
    seeded_users = _sample(np.cumsum(counts.astype(np.float64)), rng.random(n_i))
    seeded = np.bincount(seeded_users, minlength=n_u)
    quota = np.maximum(counts - seeded, 0)
    excess = int(seeded.sum() + quota.sum()) - size.interactions
    while excess > 0:  # users given more seeded items than their count: take it from the most active
        top = np.argsort(-quota, kind="stable")[: min(excess, n_u)]
        top = top[quota[top] > 0]
        quota[top] -= 1
        excess -= top.size
    taken = np.sort(seeded_users * n_i + np.arange(n_i))  # pair keys already used
    drawn = np.zeros(0, np.int64)
    for attempt in range(40):
        need = quota - np.bincount(drawn // n_i, minlength=n_u)
        if not need.any():
            break
        users = np.repeat(np.arange(n_u), need * 2 + 2)
        if attempt < 30:
            fav = favourite[users]
            s, e = seg_start[fav], seg_start[fav + 1]
            base = np.where(s > 0, cluster_cdf[np.maximum(s - 1, 0)], 0.0)
            x = base + rng.random(users.size) * (cluster_cdf[e - 1] - base)
            in_cluster = by_cluster[np.clip(np.searchsorted(cluster_cdf, x, side="right"), s, e - 1)]
            anywhere = _sample(global_cdf, rng.random(users.size))
            items = np.where(rng.random(users.size) < 0.7, in_cluster, anywhere)
        else:  # a very active user exhausted what popularity reaches: uniform draws always progress
            items = rng.integers(0, n_i, users.size)
        keys = users * n_i + items
        keys = keys[~np.isin(keys, taken, assume_unique=False)]
        keys = np.unique(np.concatenate([drawn, keys]))
        # keep a random subset of at most quota[u] keys per user
        order = np.lexsort((rng.random(keys.size), keys // n_i))
        keys = keys[order]
        owner = keys // n_i
        per = np.bincount(owner, minlength=n_u)
        rank = np.arange(keys.size) - np.repeat(np.cumsum(per) - per, per)
        drawn = np.sort(keys[rank < quota[owner]])
    else:
        raise RuntimeError(f"size {size.name}: could not draw distinct items for every user")
    keys = np.concatenate([taken, drawn])
    user_all, item_all = keys // n_i, keys % n_i
    start = rng.integers(TS_START, TS_START + TS_SPAN // 2, n_u)
    ts = start[user_all] + rng.integers(0, TS_SPAN // 2, user_all.size)
    creator_sizes = np.cumsum(1.0 / np.arange(1, max(n_i // 20, 1) + 1))  # Zipf creator sizes
    creators = np.where(rng.random(n_i) < 0.6, _sample(creator_sizes, rng.random(n_i)), -1)
    return Interactions(user_all.astype(np.int64), item_all.astype(np.int64), ts.astype(np.int64), clusters, creators)


# ------------------------------------------------------------------------------------ features


def _write_npy_header(fh, dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(fh, header)


class FeatureBlocks:
    """Pooled features and feature maps of items ``[start, stop)``: a shared non-negative component, the
    item's cluster direction and noise (like pooled CNN activations); each region is the pooled vector
    scaled by a region gain plus noise, so the mean over regions is near the pooled vector."""

    def __init__(self, size: ScaleSize, clusters: np.ndarray, seed: int):
        rng = np.random.default_rng([seed, 17])
        k = int(clusters.max()) + 1
        self.size = size
        self.clusters = clusters
        self.common = np.abs(rng.normal(1.0, 0.3, size.dim)).astype(np.float32)
        self.centers = rng.normal(0.0, 0.8, (k, size.dim)).astype(np.float32)
        self.gain = rng.uniform(0.5, 1.5, size.regions).astype(np.float32)
        self.gain /= self.gain.mean()
        self.noise_bank = rng.normal(0.0, 0.3, (4096, size.dim)).astype(np.float32)
        self.seed = seed
        import torch

        self.noise_bank16 = torch.from_numpy(self.noise_bank).half()
        self.gain16 = torch.from_numpy(self.gain).half()

    def pooled(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 19, start])
        noise = rng.normal(0.0, 0.5, (stop - start, self.size.dim)).astype(np.float32)
        return np.maximum(self.common + self.centers[self.clusters[start:stop]] + noise, 0.0)

    def spatial(self, pooled: np.ndarray, start: int) -> np.ndarray:
        import torch

        rng = np.random.default_rng([self.seed, 23, start])
        # noise rows drawn from a fixed bank (10^10 fresh normals would cost minutes); computed in
        # torch float16, 3-4x faster than numpy's float32 pass and float16 cast at this size
        pick = torch.from_numpy(rng.integers(0, self.noise_bank.shape[0], (pooled.shape[0], self.size.regions)))
        out = self.noise_bank16[pick]
        pooled16 = torch.from_numpy(pooled).half()
        out.addcmul_(pooled16[:, None, :].expand_as(out), self.gain16[None, :, None])
        return out.clamp_(min=0).numpy()


def write_features(folder: Path, size: ScaleSize, clusters: np.ndarray, seed: int, *, block: int = 512) -> None:
    """``features/<backbone>{,_ids,_spatial}.npy``, written block by block (bounded memory)."""
    features = folder / "features"
    features.mkdir(parents=True, exist_ok=True)
    np.save(features / f"{FEATURE_BACKBONE}_ids.npy", item_ids(size.items), allow_pickle=False)
    gen = FeatureBlocks(size, clusters, seed)
    n = size.items
    with open(features / f"{FEATURE_BACKBONE}.npy", "wb") as pooled_fh, open(
        features / f"{FEATURE_BACKBONE}_spatial.npy", "wb"
    ) as spatial_fh:
        _write_npy_header(pooled_fh, np.float16, (n, size.dim))
        _write_npy_header(spatial_fh, np.float16, (n, size.regions, size.dim))
        for start in range(0, n, block):
            stop = min(start + block, n)
            pooled = gen.pooled(start, stop)
            pooled_fh.write(pooled.astype(np.float16).tobytes())
            spatial_fh.write(memoryview(gen.spatial(pooled, start)).cast("B"))
            if start // block % 16 == 15:
                # written pages are the kernel's to keep, but let them go to disk rather than pile up dirty
                spatial_fh.flush()
                os.fdatasync(spatial_fh.fileno())
        for fh in (pooled_fh, spatial_fh):
            fh.flush()
            os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------ folder


def write_tables(folder: Path, inter: Interactions) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_i = inter.clusters.size
    table = pa.table(
        {
            "user_id": USER_ID_BASE + inter.user_idx,
            "item_id": ITEM_ID_BASE + inter.item_idx,
            "timestamp": inter.ts,
        }
    )
    pq.write_table(table, folder / "interactions.parquet")
    creator = np.where(inter.creators >= 0, np.char.add("creator_", inter.creators.astype(str)), "")
    items = pa.table(
        {
            "item_id": item_ids(n_i),
            "title": pa.array([""] * n_i),  # no titles: the pipeline would fetch titled images from Commons
            "creator": pa.array(creator.tolist()),
            "url": pa.array([""] * n_i),
        }
    )
    import pyarrow.csv as pacsv

    pacsv.write_csv(items, folder / "items.csv")
    np.save(folder / "clusters.npy", inter.clusters.astype(np.int64), allow_pickle=False)


def manifest(size: ScaleSize, seed: int) -> dict:
    return {"format": FORMAT_VERSION, "size": asdict(size), "seed": int(seed), "backbone": FEATURE_BACKBONE}


def is_complete(folder: Path, size: ScaleSize, seed: int) -> bool:
    path = folder / "scale.json"
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return {k: stored.get(k) for k in ("format", "size", "seed", "backbone")} == manifest(size, seed)


def write_dataset(folder: str | os.PathLike, size: ScaleSize | str, seed: int = 0, *, force: bool = False) -> dict:
    """Generate the dataset folder ``folder`` (skipped when it already holds this size and seed, unless
    ``force``); returns its ``scale.json`` (counts, generation seconds)."""
    size = size_named(size) if isinstance(size, str) else size
    folder = Path(folder).expanduser().resolve()
    with folder_lock(folder):
        if not force and is_complete(folder, size, seed):
            return json.loads((folder / "scale.json").read_text())
        remove_leftovers(folder)
        from visrec_pipeline.diskspace import require_free_space

        require_free_space(folder.parent, size.spatial_bytes + size.items * size.dim * 2 + size.interactions * 40)
        tmp = make_temp_sibling(folder)
        tmp.chmod(0o755)
        started = time.perf_counter()
        inter = make_interactions(size, seed)
        write_tables(tmp, inter)
        tables_s = time.perf_counter() - started
        write_features(tmp, size, inter.clusters, seed)
        info = {
            **manifest(size, seed),
            "counts": {
                "interactions": int(inter.user_idx.size),
                "users": int(np.unique(inter.user_idx).size),
                "items": int(inter.clusters.size),
                "clusters": int(inter.clusters.max()) + 1,
                "items_with_creator": int((inter.creators >= 0).sum()),
            },
            "seconds": {"tables": round(tables_s, 2), "total": round(time.perf_counter() - started, 2)},
        }
        (tmp / "scale.json").write_text(json.dumps(info, indent=1))
        swap_into_place(tmp, folder)
        return info


# ------------------------------------------------------------------------------------ reading it back


def load_rec_data(folder: str | os.PathLike) -> "RecData":
    """The folder's interactions as the pipeline's split would give them: per user, the last row by
    (timestamp, item_id) is the holdout when the user has more than one (``split_build.sql``); the
    catalogue is every item with an interaction (here: every feature row, in order). Vectorised."""
    import pyarrow.parquet as pq

    from visrec_pipeline.recsys.data import CSR, Holdout, IndexMap, RecData, ranks_in_rows

    table = pq.read_table(Path(folder) / "interactions.parquet", columns=["user_id", "item_id", "timestamp"])
    uid = table.column("user_id").to_numpy().astype(np.int64)
    iid = table.column("item_id").to_numpy().astype(np.int64)
    ts = table.column("timestamp").to_numpy().astype(np.int64)
    users, items = IndexMap.from_ids(uid), IndexMap.from_ids(iid)
    u, i = users.index(uid), items.index(iid)
    order = np.lexsort((i, ts, u))  # per user in time order (ties: item)
    u, i, ts = u[order], i[order], ts[order]
    per_user = np.bincount(u, minlength=len(users))
    last = np.zeros(u.size, bool)
    last[np.cumsum(per_user)[per_user > 0] - 1] = True
    is_eval = last & (per_user[u] > 1)
    tu, ti, tts = u[~is_eval], i[~is_eval], ts[~is_eval]
    by_pair = np.lexsort((ti, tu))
    train = CSR.from_pairs(tu, ti, len(users), len(items))
    data = RecData(users, items, train, tts[by_pair])
    eval_users = u[is_eval]  # ascending, one row each
    predict = CSR.from_pairs(np.arange(eval_users.size), i[is_eval], eval_users.size, len(items))
    rank = ranks_in_rows(train, data.train_ts)
    kept = np.repeat(np.isin(np.arange(len(users)), eval_users), train.lengths())
    data.holdout = Holdout(eval_users, train.take_rows(eval_users), predict, users.ids[eval_users], rank[kept])
    return data


def feature_paths(folder: str | os.PathLike, backbone: str = FEATURE_BACKBONE) -> dict[str, Path]:
    features = Path(folder) / "features"
    return {
        "pooled": features / f"{backbone}.npy",
        "ids": features / f"{backbone}_ids.npy",
        "spatial": features / f"{backbone}_spatial.npy",
    }


def synthetic_images(clusters: np.ndarray, size: int = 64):
    """``FitInputs.images`` for a folder without images: a cluster's colour with an item's own stripes."""
    import torch

    palette = np.random.default_rng(29).integers(40, 216, (int(clusters.max()) + 1, 3)).astype(np.int16)
    ramp = np.arange(size, dtype=np.int16)

    def load(item_idx: "torch.Tensor") -> "torch.Tensor":
        idx = item_idx.numpy()
        base = palette[clusters[idx]][:, :, None, None]
        stripes = ((ramp[None, :] * (1 + idx[:, None] % 7)) % 32)[:, None, :, None]
        return torch.from_numpy(np.clip(base + stripes, 0, 255).astype(np.uint8).repeat(size, axis=3))

    return load


def fit_inputs(folder: str | os.PathLike, data: "RecData", needs: frozenset[str]) -> "FitInputs":
    """What ``model_io.build_inputs`` gives a model, from the folder: features memory-mapped (float16,
    as shipped), creators from ``items.csv``, the planted clusters in place of ``visual_clusters``,
    synthetic images for DVBPR. Guided triples are left to CuratorNet, which then samples them in ``fit``."""
    import pyarrow.csv as pacsv

    from visrec_pipeline.recsys.base import FitInputs

    folder = Path(folder)
    inputs = FitInputs()
    paths = feature_paths(folder)
    ids = np.load(paths["ids"], allow_pickle=False)
    if not np.array_equal(ids, data.items.ids):
        raise ValueError(f"{paths['ids']}: the feature rows are not the catalogue's items in order")
    for need in needs:
        kind = need.partition(":")[0]
        if kind == "features":
            inputs.features = np.load(paths["pooled"], mmap_mode="r", allow_pickle=False)
        elif kind == "spatial":
            inputs.spatial = np.load(paths["spatial"], mmap_mode="r", allow_pickle=False)
    inputs.feature_mask = np.ones(data.n_items, bool)
    clusters = np.load(folder / "clusters.npy", allow_pickle=False)
    inputs.clusters = clusters
    items = pacsv.read_csv(
        folder / "items.csv",
        convert_options=pacsv.ConvertOptions(column_types={"creator": "string"}, strings_can_be_null=True),
    )
    creator = items.column("creator").to_pandas()
    codes = np.full(data.n_items, -1, np.int64)
    known = creator.notna().to_numpy()
    pos = data.items.index(items.column("item_id").to_numpy().astype(np.int64)[known])
    codes[pos] = creator[known].astype("category").cat.codes.to_numpy()
    inputs.creators = codes
    if "images" in needs:
        inputs.images = synthetic_images(clusters)
    return inputs
