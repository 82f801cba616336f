"""The bundled demo dataset generator: format, determinism, atomicity and a real visual signal."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visrec_pipeline.demo import (
    GENERATOR_VERSION,
    MARKER,
    ensure_demo_dataset,
    generate_demo_dataset,
    load_demo_summary,
)
from visrec_pipeline.demo import __main__ as demo_cli
from visrec_pipeline.demo import generate as gen
from visrec_pipeline.demo import signal_check as sc

SMALL = dict(n_items=200, n_users=40, target_interactions=1600, later_batches=2)
ID_RE = re.compile(r"^(20\d\d)(0[1-9]|1[0-2])(\d{3})$")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def month_end(item_id: int) -> int:
    """First second after the upload month encoded in a YYYYMMNNN id."""
    year, month = item_id // 100000, item_id // 1000 % 100
    return int(datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc).timestamp())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, gen.DemoSummary]:
    out = tmp_path_factory.mktemp("small") / "demo"
    return out, generate_demo_dataset(out, seed=11, **SMALL)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, gen.DemoSummary]:
    """The dataset the pipeline ships with: default sizes and seed."""
    out = tmp_path_factory.mktemp("full") / "demo"
    return out, generate_demo_dataset(out)


# --- format and content ---------------------------------------------------------------


def test_interactions_format_counts_and_ids(small):
    out, summary = small
    assert (out / "interactions.csv").read_text().splitlines()[0] == "user_id,item_id,timestamp"
    df = pd.read_csv(out / "interactions.csv")
    items = pd.read_csv(out / "items.csv", keep_default_na=False)
    assert list(items.columns) == ["item_id", "title", "creator", "url"]
    assert df.dtypes.map(lambda d: d.kind).tolist() == ["i", "i", "i"]

    assert len(items) == summary.n_items == 200 and items["item_id"].is_unique
    assert len(df) == summary.n_interactions
    pairs = df.drop_duplicates(["user_id", "item_id"])
    assert len(pairs) == summary.n_unique_pairs == 1600
    assert 0 < summary.n_duplicate_rows <= 0.02 * len(pairs)
    per_user = pairs.groupby("user_id").size()
    assert len(per_user) == summary.n_users == 40 and per_user.min() >= 3

    for item_id in items["item_id"]:
        m = ID_RE.match(str(item_id))
        assert m and 2016 <= int(m[1]) <= 2021 and int(m[3]) >= 1, item_id
    assert set(df["item_id"]) <= set(items["item_id"])
    # Every interaction comes after its item's upload month.
    ends = df["item_id"].map(month_end)
    assert (df["timestamp"] >= ends).all()
    years = pd.to_datetime(df["timestamp"], unit="s", utc=True).dt.year
    assert years.nunique() >= 4


def test_duplicates_are_earlier_repeats(small):
    out, _ = small
    df = pd.read_csv(out / "interactions.csv")
    dup = df[df.duplicated(["user_id", "item_id"], keep=False)]
    assert len(dup) > 0
    # Exact repeats of a pair, each with a different timestamp (keep-latest dedup is well defined).
    assert not dup.duplicated(["user_id", "item_id", "timestamp"]).any()


def test_items_titles_creators_urls(small):
    out, summary = small
    items = pd.read_csv(out / "items.csv", keep_default_na=False)
    assert items["title"].str.match(r"^File:[A-Za-z_]+_\d{9}\.(jpg|png)$").all() and items["title"].is_unique
    assert items["url"].str.match(r"^https://upload\.wikimedia\.org/wikipedia/commons/[0-9a-f]/[0-9a-f]{2}/").all()
    assert (items["url"].str.rsplit("/", n=1).str[-1] == items["title"].str.removeprefix("File:")).all()
    empty = (items["creator"] == "").mean()
    assert 0.03 <= empty <= 0.2 and summary.n_items_without_creator == (items["creator"] == "").sum()
    assert items.loc[items["creator"] != "", "creator"].str.match(r"^[A-Za-z0-9_]+$").all()
    # Creators have several uploads each, so loyalty to a creator is learnable.
    assert items.loc[items["creator"] != "", "creator"].value_counts().max() >= 5
    readme = (out / "README.md").read_text()
    assert "seed 11" in readme and "200 items" in readme
    assert not (out / "incoming").exists()
    assert (out.stat().st_mode & 0o777) == 0o755


def test_later_batches_come_after_and_bring_new_items(small):
    out, summary = small
    initial = pd.read_csv(out / "interactions.csv")
    items = pd.read_csv(out / "items.csv", keep_default_na=False)
    known_items, known_users = set(items["item_id"]), set(initial["user_id"])
    previous_max = initial["timestamp"].max()
    assert len(summary.batches) == 2
    for b in summary.batches:
        batch = pd.read_csv(out / "later_batches" / f"{b.name}.csv")
        fresh = pd.read_csv(out / "later_batches" / f"{b.name}_items.csv", keep_default_na=False)
        assert list(batch.columns) == ["user_id", "item_id", "timestamp"]
        assert list(fresh.columns) == ["item_id", "title", "creator", "url"]
        assert batch["timestamp"].min() > previous_max
        assert 0.01 * len(initial) <= len(batch) == b.n_rows <= 0.05 * len(initial)
        assert not set(fresh["item_id"]) & known_items
        assert set(batch["item_id"]) <= known_items | set(fresh["item_id"])
        assert b.n_new_items_used >= 1 and set(batch["item_id"]) & set(fresh["item_id"])
        assert (batch["timestamp"] >= batch["item_id"].map(month_end)).all()
        returning = batch["user_id"].isin(known_users).mean()
        assert 0.7 <= returning < 1.0  # mostly returning users, a few new ones
        assert not batch.duplicated(["user_id", "item_id"]).any()
        known_items |= set(fresh["item_id"])
        known_users |= set(batch["user_id"])
        previous_max = batch["timestamp"].max()


def test_images_decode_with_varied_sizes(small):
    out, summary = small
    ids = list(pd.read_csv(out / "items.csv")["item_id"])
    for b in summary.batches:
        ids += list(pd.read_csv(out / "later_batches" / f"{b.name}_items.csv")["item_id"])
    files = sorted((out / "images").iterdir())
    assert len(files) == len(ids) == summary.n_images
    assert {f.name.split(".")[0] for f in files} == {str(i) for i in ids}
    sizes, formats = [], []
    for f in files:
        with Image.open(f) as im:
            im.load()
            sizes.append(im.size)
            formats.append(im.format)
            assert im.format == {"jpg": "JPEG", "png": "PNG"}[f.suffix[1:]]
    w, h = np.array(sizes).T
    assert w.min() >= 160 and h.min() >= 160 and w.max() <= 640 and h.max() <= 640
    ratio = w / h
    assert (ratio < 0.9).any() and (ratio > 1.1).any() and (ratio == 1.0).any()
    assert (ratio >= 2.0).any() and ratio.max() <= 3.0 + 1e-9
    assert 0 < formats.count("PNG") == summary.n_png < 0.15 * len(files)
    assert sum(f.stat().st_size for f in files) == summary.image_bytes


def test_full_demo_sizes_time_and_bytes(full):
    out, summary = full
    assert (summary.n_items, summary.n_users, summary.n_unique_pairs) == (1500, 300, 30000)
    per_user = pd.read_csv(out / "interactions.csv").drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    assert per_user.min() >= 3 and per_user.max() >= 300  # a few heavy users...
    assert 40 <= ((per_user >= 10) & (per_user <= 40)).sum()  # ...and many light ones
    assert summary.image_bytes < 40e6
    sizes = []
    for f in (out / "images").iterdir():
        with Image.open(f) as im:  # header only
            sizes.append(im.size)
    w, h = np.array(sizes).T
    assert len(sizes) == summary.n_images and min(w.min(), h.min()) >= 160 and max(w.max(), h.max()) <= 640
    assert (w / h).max() <= 3.0 and (h / w).max() <= 1.6 and ((w / h) >= 2.0).sum() >= 50
    assert summary.seconds < 60  # ~10 s on an idle 2-core machine


# --- determinism ------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs(small, tmp_path):
    out, _ = small
    again = generate_demo_dataset(tmp_path / "again", seed=11, **SMALL)
    assert tree_digest(tmp_path / "again") == tree_digest(out)
    assert again.n_unique_pairs == 1600

    generate_demo_dataset(tmp_path / "other", seed=12, **SMALL)
    a, b = tree_digest(out), tree_digest(tmp_path / "other")
    assert a["interactions.csv"] != b["interactions.csv"]
    assert a["items.csv"] != b["items.csv"]
    assert [k for k in a if k.startswith("images/")] != [k for k in b if k.startswith("images/")]


# --- atomicity, ensure and the CLI ----------------------------------------------------------


def test_ensure_generates_once_and_leaves_a_complete_dataset_untouched(tmp_path):
    out = tmp_path / "demo"
    assert ensure_demo_dataset(out, seed=3, **SMALL) == out.absolute()
    marker = json.loads((out / MARKER).read_text())
    assert marker["params"]["seed"] == 3 and marker["params"]["generator_version"] == GENERATOR_VERSION
    (out / "user_note.txt").write_text("mine")
    before = (out / "interactions.csv").stat().st_mtime_ns, (out / MARKER).stat().st_ino
    ensure_demo_dataset(out, seed=3, **SMALL)
    assert ((out / "interactions.csv").stat().st_mtime_ns, (out / MARKER).stat().st_ino) == before
    assert (out / "user_note.txt").read_text() == "mine"
    summary = load_demo_summary(out)
    assert summary is not None and summary.seed == 3 and summary.n_unique_pairs == 1600


def test_ensure_regenerates_an_incomplete_or_different_folder_keeping_incoming(tmp_path):
    out = tmp_path / "demo"
    (out / "images").mkdir(parents=True)
    (out / "interactions.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")  # a half dataset, no marker
    (out / "incoming").mkdir()
    (out / "incoming" / "new.csv").write_text("user_id,item_id,timestamp\n")
    ensure_demo_dataset(out, seed=3, **SMALL)
    assert (out / MARKER).exists() and len(pd.read_csv(out / "interactions.csv")) > 1000
    assert (out / "incoming" / "new.csv").exists()  # a user's new batches are never lost
    first = tree_digest(out)

    ensure_demo_dataset(out, seed=4, **SMALL)  # another seed: not the requested dataset
    assert json.loads((out / MARKER).read_text())["params"]["seed"] == 4
    assert tree_digest(out)["interactions.csv"] != first["interactions.csv"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo.") and p.is_dir()]


def test_failed_generation_leaves_no_half_dataset(tmp_path, monkeypatch):
    out = tmp_path / "demo"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen, "_write_images", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_demo_dataset(out, seed=3, **SMALL)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".demo.lock"]


def test_killed_generation_leaves_no_half_dataset(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "visrec_pipeline.demo", "--out", str(out), "--items", "1500", "--users", "50",
         "--interactions", "2000", "--batches", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it once images are being written
            tmp = [p for p in tmp_path.glob(".demo.tmp-*/images") if any(p.iterdir())]
            if tmp or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"generation ended before it could be killed: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # no half dataset where the pipeline looks
    assert list(tmp_path.glob(".demo.tmp-*"))  # the debris is only in the temp sibling
    ensure_demo_dataset(out, seed=3, **SMALL)
    assert (out / MARKER).exists()
    assert not list(tmp_path.glob(".demo.tmp-*"))  # cleaned up by the next generation


def test_concurrent_ensure_generates_once(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    calls = []
    real = gen._build_into

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "_build_into", counting)
    errors = []

    def run():
        try:
            ensure_demo_dataset(out, seed=3, **SMALL)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and (out / MARKER).exists()


def test_bad_parameters_and_targets_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="n_items"):
        generate_demo_dataset(tmp_path / "x", n_items=10)
    with pytest.raises(ValueError, match="target_interactions"):
        generate_demo_dataset(tmp_path / "x", n_users=100, target_interactions=100)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        generate_demo_dataset(tmp_path / "file", **SMALL)
    assert (tmp_path / "file").read_text() == "not a folder"
    assert not (tmp_path / "x").exists()


def test_cli_generates_and_reports(tmp_path, capsys):
    args = ["--out", str(tmp_path / "cli"), "--seed", "5", "--items", "200", "--users", "40",
            "--interactions", "1600", "--batches", "1"]
    assert demo_cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 5 and report["n_unique_pairs"] == 1600 and len(report["batches"]) == 1
    assert demo_cli.main(args) == 0  # already complete: reported, not regenerated
    assert json.loads(capsys.readouterr().out)["n_unique_pairs"] == 1600
    assert demo_cli.main(["--out", str(tmp_path / "bad"), "--users", "1"]) == 2
    assert "n_users" in capsys.readouterr().err


# --- the visual signal ----------------------------------------------------------------------


def test_metrics_of_the_signal_check_are_right():
    # 1 user, 5 items, profile {0}; target 3. Scores: 4 > 3 > 1 > 2 (0 excluded).
    scores = np.array([[9.0, 0.5, 0.1, 0.7, 0.8]])
    profile = np.array([[True, False, False, False, False]])
    m = sc.rank_metrics(scores, profile, np.array([3]), ks=(1, 2))
    assert m == {"AUC": pytest.approx(2 / 3), "R@1": 0.0, "R@2": 1.0}
    # Ties go to the lower item index.
    m = sc.rank_metrics(np.array([[0.0, 1.0, 1.0, 1.0, 0.0]]), profile, np.array([2]), ks=(1,))
    assert m["AUC"] == pytest.approx(2 / 3) and m["R@1"] == 0.0


@pytest.fixture(scope="module")
def full_signal(full) -> tuple[sc.HoldoutData, np.ndarray]:
    """Last-1 holdout of the shipped demo and cheap colour/texture features of its images."""
    out, _ = full
    data = sc.load_holdout(out)
    return data, sc.colour_texture_features(sc.image_paths(out, data.item_ids))


def test_appearance_drives_choices_visrank_beats_most_popular(full_signal):
    data, feats = full_signal
    assert data.test_user.size == 300
    report = sc.evaluate({"colour+texture": feats}, data)
    pop, vis = report["MostPopular"], report["VisRank[colour+texture]"]
    print(json.dumps(report, indent=1))
    assert 0.58 <= pop["AUC"] <= 0.75  # popularity is a real but weaker signal
    assert vis["AUC"] >= 0.72 and vis["AUC"] >= pop["AUC"] + 0.07
    assert vis["R@100"] >= pop["R@100"] + 0.05
    centred = report["VisRank[colour+texture, centred mean]"]
    assert centred["AUC"] >= pop["AUC"] + 0.07


def test_tastes_drift_so_the_recent_profile_matters(full_signal):
    data, feats = full_signal
    # Training rows are in time order; keep each user's oldest or newest 10.
    order = np.argsort(data.train_user, kind="stable")
    sizes = np.bincount(data.train_user, minlength=data.n_users)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    position = np.empty(order.size, np.int64)
    position[order] = np.arange(order.size) - starts
    heavy = sizes[data.test_user] >= 40
    auc = {}
    for label, keep in (("oldest", position < 10), ("newest", position >= sizes[data.train_user] - 10)):
        window = dataclasses.replace(
            data, train_user=data.train_user[keep], train_item=data.train_item[keep],
            test_user=data.test_user[heavy], test_item=data.test_item[heavy],
        )
        auc[label] = sc.evaluate({"f": feats}, window)["VisRank[f]"]["AUC"]
    print(auc)
    assert auc["newest"] >= auc["oldest"] + 0.03


def test_a_shuffled_catalogue_loses_the_visual_signal(full_signal):
    """Guards the check itself: features that do not belong to the items must not pass."""
    data, feats = full_signal
    shuffled = feats[np.random.default_rng(0).permutation(len(feats))]
    vis = sc.evaluate({"shuffled": shuffled}, data)["VisRank[shuffled]"]
    assert vis["AUC"] < 0.6
