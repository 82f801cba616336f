"""The scale generator (visrec_pipeline/demo/scale_data.py) and bench/scale.py's step runner."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from visrec_pipeline import db
from visrec_pipeline.backbone import FEATURE_BACKBONE
from visrec_pipeline.demo import scale_data
from visrec_pipeline.ingest import build_catalog, build_interactions, build_split, ingest_batch
from visrec_pipeline.model_io import load_rec_data

ROOT = Path(__file__).resolve().parents[1]
XS = scale_data.SIZES["XS"]


@pytest.fixture(scope="module")
def xs_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scale") / "XS"
    scale_data.write_dataset(folder, "XS", seed=3)
    return folder


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interactions_are_distinct_power_law_pairs_covering_every_item_and_user():
    size = scale_data.ScaleSize("T", 20_000, 2_000, 400)  # S's shape at a fifth of its size
    inter = scale_data.make_interactions(size, seed=1)
    assert inter.user_idx.size == 20_000
    keys = inter.user_idx * 2_000 + inter.item_idx
    assert np.unique(keys).size == keys.size  # distinct (user, item) pairs
    per_item = np.bincount(inter.item_idx, minlength=2_000)
    per_user = np.bincount(inter.user_idx, minlength=400)
    assert per_item.min() >= 1 and per_user.min() >= 2  # every item in the catalogue, every user has a holdout
    # heavy tails: the top 1% of items take far more than 1% of the rows, and so do the top 1% of users
    assert np.sort(per_item)[-20:].sum() > 0.05 * keys.size
    assert np.sort(per_user)[-4:].sum() > 0.04 * keys.size
    again = scale_data.make_interactions(size, seed=1)
    assert np.array_equal(again.item_idx, inter.item_idx) and np.array_equal(again.ts, inter.ts)


def test_the_folder_holds_features_in_the_bring_your_own_format(xs_folder):
    paths = scale_data.feature_paths(xs_folder)
    assert paths["pooled"].name == f"{FEATURE_BACKBONE}.npy"
    ids = np.load(paths["ids"], allow_pickle=False)
    pooled = np.load(paths["pooled"], mmap_mode="r", allow_pickle=False)
    spatial = np.load(paths["spatial"], mmap_mode="r", allow_pickle=False)
    assert ids.dtype == np.int64 and np.array_equal(ids, scale_data.item_ids(XS.items))
    assert pooled.dtype == np.float16 and pooled.shape == (XS.items, XS.dim)
    assert spatial.dtype == np.float16 and spatial.shape == (XS.items, XS.regions, XS.dim)
    assert np.isfinite(pooled).all() and (np.asarray(pooled) >= 0).all()
    # the maps pool to about the pooled vector; items of one cluster are closer than items of two
    mean_map = np.asarray(spatial, np.float32).mean(1)
    rel = np.linalg.norm(mean_map - pooled, axis=1) / np.linalg.norm(np.asarray(pooled, np.float32), axis=1)
    assert np.median(rel) < 0.2
    clusters = np.load(xs_folder / "clusters.npy")
    f = np.asarray(pooled, np.float32) - np.asarray(pooled, np.float32).mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    same = clusters[:, None] == clusters[None, :]
    assert sim[same].mean() > sim[~same].mean() + 0.2
    info = json.loads((xs_folder / "scale.json").read_text())
    assert info["counts"]["interactions"] == XS.interactions and info["seed"] == 3


def test_a_complete_folder_is_not_generated_again(xs_folder):
    before = (xs_folder / "features" / f"{FEATURE_BACKBONE}_spatial.npy").stat().st_mtime_ns
    scale_data.write_dataset(xs_folder, "XS", seed=3)
    assert (xs_folder / "features" / f"{FEATURE_BACKBONE}_spatial.npy").stat().st_mtime_ns == before
    assert not scale_data.is_complete(xs_folder, XS, seed=4)  # another seed is another dataset


def test_the_folder_read_directly_gives_the_split_the_pipeline_builds(xs_folder, tmp_path):
    """The bench's reading equals ingest + interactions + catalogue + split_build.sql + model_io."""
    direct = scale_data.load_rec_data(xs_folder)
    with db.connect(tmp_path / "visrec.duckdb") as conn:
        ingest_batch(conn, "initial", xs_folder / "interactions.parquet")
        build_interactions(conn)
        build_catalog(conn, None)
        build_split(conn)
        piped = load_rec_data(conn)
    assert np.array_equal(direct.items.ids, piped.items.ids) and np.array_equal(direct.users.ids, piped.users.ids)
    assert np.array_equal(direct.train.indptr, piped.train.indptr)
    assert np.array_equal(direct.train.indices, piped.train.indices)
    assert np.array_equal(direct.train_ts, piped.train_ts)
    a, b = direct.holdout, piped.holdout
    assert np.array_equal(a.user_idx, b.user_idx)
    for x, y in ((a.profile, b.profile), (a.predict, b.predict)):
        assert np.array_equal(x.indptr, y.indptr) and np.array_equal(x.indices, y.indices)
    assert np.array_equal(a.profile_rank, b.profile_rank)


def test_fit_inputs_memory_map_the_features_and_code_the_creators(xs_folder):
    data = scale_data.load_rec_data(xs_folder)
    inputs = scale_data.fit_inputs(xs_folder, data, frozenset({f"features:{FEATURE_BACKBONE}", "images"}))
    assert isinstance(inputs.features, np.memmap) and inputs.spatial is None
    assert inputs.creators.shape == (XS.items,) and 0.4 < (inputs.creators >= 0).mean() < 0.8
    import torch

    images = inputs.images(torch.arange(5))
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 64, 64)


def test_a_step_past_its_timeout_or_memory_cap_or_raising_is_reported_so(xs_folder, tmp_path):
    bench = _bench_module()
    ckpt = str(tmp_path / "m.pt")
    common = dict(max_rss_gb=0, threads=1)
    slow = bench.run_step(["fit", "bpr_mf", str(xs_folder), ckpt], tmp_path / "a.log", tmp_path / "a.json",
                          timeout=0.3, **common)
    assert slow["status"] == "timeout" and "--timeout" in slow["reason"] and slow["wall_seconds"] < 30
    big = bench.run_step(["fit", "bpr_mf", str(xs_folder), ckpt], tmp_path / "b.log", tmp_path / "b.json",
                         timeout=300, max_rss_gb=0.02, threads=1)
    assert big["status"] == "oom-killed" and "--max-rss-gb" in big["reason"]
    broken = bench.run_step(["fit", "most_popular", str(tmp_path / "absent"), ckpt], tmp_path / "c.log",
                            tmp_path / "c.json", timeout=300, **common)
    assert broken["status"] == "failed" and "FileNotFoundError" in broken["reason"]
    assert broken["peak_rss_gb"] > 0.01 and broken["process_cpu_seconds"] > 0


def test_the_bench_runs_a_model_at_xs_and_ends_with_one_json_line(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "XS", "--models", "most_popular,random",
         "--jobs", "2", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--timeout", "300"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    rec = summary["sizes"]["XS"]["models"]["most_popular"]
    assert rec["status"] == "completed" and summary["all_completed"] is True
    assert rec["eval"]["rows"] == XS.users and 0.5 < rec["eval"]["means"]["auc"] <= 1.0
    assert 0 < summary["max_peak_rss_gb"] < 8
    assert rec["fit"]["peak_rss_gb"] > 0 and rec["eval"]["process_cpu_seconds"] > 0
    assert summary["exponents"] == {}  # one size: no growth to measure
    assert list(summary["sizes"]["XS"]["models"]) == ["most_popular", "random"]  # --jobs 2 keeps the order
    assert summary["sizes"]["XS"]["models"]["random"]["status"] == "completed"


def test_exponents_come_from_cpu_seconds_with_wall_beside():
    bench = _bench_module()
    def size(n, cpu, wall):
        step = {"cpu_seconds": cpu, "seconds": wall, "peak_rss_gb": 1.0}
        return {"interactions": n, "items": n // 10, "users": n // 50,
                "models": {"m": {"status": "completed", "fit": step, "eval": step}}}

    # 10x interactions (100x items x users); CPU 10x for fit and 100x for eval; wall inflated by a busy machine
    summary = bench.summarise({"S": size(1000, 1.0, 1.0), "L": size(10_000, 10.0, 40.0)}, ["m"])
    e = summary["exponents"]["models"]["m"]
    assert e["fit"] == 1.0 and e["fit_wall"] == round(math.log(40) / math.log(10), 3)
    assert e["eval"] == 0.5 and summary["max_exponent"] == {"fit": 1.0, "eval": 0.5}
