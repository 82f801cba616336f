"""Feature extraction, weights, preprocessing, the shard store and k-means (plain Python, no Dagster)."""

from __future__ import annotations

import hashlib
import io
import platform
import re
import socket
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import models

from visrec_pipeline import db
from visrec_pipeline.embeddings import store, weights as weights_mod
from visrec_pipeline.embeddings.backbones import BACKBONES, BackboneSpec, output_shapes
from visrec_pipeline.embeddings.extract import ImageFileDataset, extract_features, load_backbone
from visrec_pipeline.embeddings.kmeans import kmeans
from visrec_pipeline.embeddings.similarity import cosine_neighbours
from visrec_pipeline.embeddings.weights import WeightsUnavailableError, build_model, imagenet_cache_path

# "Adding ResNet-18 is one line": a registry entry like this one (small, so the tests stay fast).
RESNET18 = BackboneSpec("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "avgpool", "layer4")
PKG = Path(__file__).resolve().parent.parent / "visrec_pipeline"


def jpeg(path: Path, seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path, "JPEG", quality=90)
    return path


class ListSink:
    def __init__(self):
        self.pos, self.pooled, self.spatial = [], [], []

    def __call__(self, pos, pooled, spatial):
        self.pos.append(pos)
        self.pooled.append(pooled)
        self.spatial.append(spatial)

    def result(self):
        order = np.argsort(np.concatenate(self.pos))
        pooled = np.concatenate(self.pooled)[order]
        spatial = None if self.spatial[0] is None else np.concatenate(self.spatial)[order]
        return np.concatenate(self.pos)[order], pooled, spatial


def run(backbone, paths, **kw):
    sink = ListSink()
    kw = {"device": "cpu", "precision": "fp32", "batch_size": 4, "num_workers": 0, "small_job": 0, **kw}
    stats = extract_features(backbone, paths, sink, **kw)
    return stats, sink


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("imgs")
    return [jpeg(d / f"{i}.jpg", i) for i in range(5)]


def test_declared_output_shapes():
    # ResNet-50 extraction itself (dtypes, 49 x 2048 maps, workers) is exercised in test_embeddings_assets.py
    assert output_shapes(BACKBONES["resnet50"]) == (2048, (49, 2048))
    assert output_shapes(BACKBONES["alexnet"]) == (4096, None)


def test_alexnet_pooled_is_fc7(images):
    spec = BACKBONES["alexnet"]
    bb = load_backbone(spec, "random", seed=3)
    _, sink = run(bb, images[:2])
    _, pooled, spatial = sink.result()
    assert pooled.shape == (2, 4096) and spatial is None and output_shapes(spec) == (4096, None)
    torch.manual_seed(3)
    ref = models.alexnet().eval()
    x = torch.stack([spec.weights.transforms()(Image.open(p).convert("RGB")) for p in images[:2]])
    with torch.no_grad():
        expected = ref.classifier[:-1](torch.flatten(ref.avgpool(ref.features(x)), 1))  # fc7 after its ReLU
    np.testing.assert_allclose(pooled, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_file_weights_give_the_features_of_a_model_loaded_with_that_state_dict(images, tmp_path):
    torch.manual_seed(11)
    ref = models.resnet18().eval()
    path = tmp_path / "resnet18_state.pth"
    torch.save(ref.state_dict(), path)
    bb = load_backbone(RESNET18, str(path))
    assert bb.weights.tag == "file:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    _, sink = run(bb, images[:3], batch_size=2)
    _, pooled, spatial = sink.result()
    assert pooled.shape == (3, 512) and spatial.shape == (3, 49, 512)
    ref.fc = torch.nn.Identity()
    x = torch.stack([RESNET18.weights.transforms()(Image.open(p).convert("RGB")) for p in images[:3]])
    with torch.no_grad():
        expected = ref(x)
    np.testing.assert_allclose(pooled, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit ResNet"):
        build_model(RESNET18, str(path))
    with pytest.raises(FileNotFoundError, match="neither imagenet"):
        build_model(RESNET18, str(tmp_path / "nope.pth"))


def test_random_weights_are_deterministic_per_seed(images):
    a, b, c = (load_backbone(RESNET18, "random", seed=s) for s in (0, 0, 1))
    assert a.weights.tag == "random:seed=0" and a.weights.warning is None
    fa, fb = (run(m, images[:1])[1].result()[1] for m in (a, b))
    np.testing.assert_array_equal(fa, fb)
    assert not torch.equal(a.extractor.conv1.weight, c.extractor.conv1.weight)
    # seeding does not disturb the caller's RNG stream
    torch.manual_seed(7)
    x1 = torch.rand(3)
    torch.manual_seed(7)
    build_model(RESNET18, "random", seed=0)
    assert torch.equal(torch.rand(3), x1)


def test_preprocessing_is_exactly_the_declared_weights_transforms(images):
    for spec in BACKBONES.values():
        bb = load_backbone(spec, "random")
        assert repr(bb.transform) == repr(spec.weights.transforms())
        _, x, err = ImageFileDataset([images[0]], bb.transform)[0]
        assert err == ""
        assert torch.equal(x, spec.weights.transforms()(Image.open(images[0]).convert("RGB")))
    assert repr(BACKBONES["resnet50"].weights.transforms()).count("232")  # V2 weights: resize 232, crop 224


def test_unreadable_images_are_reported_not_fatal(images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    bb = load_backbone(RESNET18, "random")
    stats, sink = run(bb, [images[0], bad, None, images[1]], batch_size=3)
    assert stats.n_ok == 2
    assert stats.retained_memory == (platform.libc_ver()[0] == "glibc")  # allocator tuning applied where it can be
    assert [p for p, _ in stats.failures] == [1, 2]
    assert "UnidentifiedImageError" in stats.failures[0][1]
    assert sink.result()[0].tolist() == [0, 3]


def test_workers_that_cannot_start_fall_back_to_in_process_decoding(images, monkeypatch):
    import multiprocessing

    # What a daemonic step process sees: multiprocessing refuses to start children.
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    bb = load_backbone(RESNET18, "random", seed=0)
    stats, sink = run(bb, images[:2], num_workers=2, batch_size=2)
    assert stats.num_workers == 0 and stats.n_ok == 2
    assert "falling back to num_workers=0" in stats.notes[0] and "daemonic" in stats.notes[0]
    monkeypatch.undo()
    _, ref = run(bb, images[:2], num_workers=0, batch_size=2)
    np.testing.assert_array_equal(sink.result()[1], ref.result()[1])


def test_imagenet_weights_load_from_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = imagenet_cache_path(RESNET18.weights)
    assert cached.parent == tmp_path / "torch" / "hub" / "checkpoints" and cached.name.startswith("resnet18-")
    torch.manual_seed(5)
    ref = models.resnet18()
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    model, choice = build_model(RESNET18, "auto")
    assert choice.tag == "imagenet:IMAGENET1K_V1" and choice.warning is None
    assert torch.equal(model.conv1.weight, ref.conv1.weight)


@pytest.fixture()
def hanging_server():
    """A 127.0.0.1 server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def test_auto_falls_back_to_random_fast_and_loudly(tmp_path, monkeypatch, hanging_server):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv(weights_mod.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(weights_mod, "weights_url", lambda w: f"{hanging_server}/{Path(w.url).name}")
    spec = RESNET18
    t0 = time.perf_counter()
    _, choice = build_model(spec, "auto", seed=4, download_timeout_s=0.5)
    assert time.perf_counter() - t0 < 5
    assert choice.tag == "random:seed=4"
    assert "RANDOMLY INITIALISED" in choice.warning and "timed out" in choice.warning
    with pytest.raises(WeightsUnavailableError):
        build_model(spec, "imagenet", download_timeout_s=0.3)
    assert not any((tmp_path / "empty").rglob("*.pth"))  # no partial file left behind
    monkeypatch.setenv(weights_mod.OFFLINE_ENV, "1")
    t0 = time.perf_counter()
    _, choice = build_model(spec, "auto")
    assert time.perf_counter() - t0 < 3 and "VISREC_OFFLINE" in choice.warning


def test_download_checks_the_hash_in_the_file_name(tmp_path, monkeypatch):
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"definitely not the alexnet weights"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
        monkeypatch.delenv(weights_mod.OFFLINE_ENV, raising=False)
        port = srv.server_address[1]
        monkeypatch.setattr(weights_mod, "weights_url", lambda w: f"http://127.0.0.1:{port}/{Path(w.url).name}")
        with pytest.raises(WeightsUnavailableError, match="expected prefix"):
            build_model(RESNET18, "imagenet", download_timeout_s=2)
        assert not imagenet_cache_path(RESNET18.weights).exists()
    finally:
        srv.shutdown()


def test_no_pickle_anywhere_in_the_feature_code():
    files = [*(PKG / "embeddings").glob("*.py"), PKG / "defs" / "embeddings.py", PKG.parent / "bench" / "embeddings.py"]
    assert len(files) >= 8
    for f in files:
        text = f.read_text()
        assert not re.search(r"import pickle|pickle\.load|allow_pickle\s*=\s*True|weights_only\s*=\s*False", text), f
        # every load call (kept on one line) says so explicitly
        for call in re.findall(r"np\.load\(.*", text):
            assert "allow_pickle=False" in call, (f, call)
        for call in re.findall(r"torch\.load\(.*", text):
            assert "weights_only=True" in call, (f, call)


# --- the store, without Dagster -----------------------------------------------------------------


def _item_images(conn, rows):
    conn.execute(
        "CREATE TABLE IF NOT EXISTS item_images (item_id BIGINT PRIMARY KEY, status VARCHAR, reason VARCHAR, "
        "content_hash VARCHAR, path VARCHAR, orig_width INTEGER, orig_height INTEGER, source VARCHAR, updated_at TIMESTAMP)"
    )
    for item_id, status, h in rows:
        conn.execute(
            "INSERT OR REPLACE INTO item_images VALUES (?, ?, NULL, ?, ?, 8, 8, 'test', now()::TIMESTAMP)",
            [item_id, status, h, f"images/{h}.jpg"],
        )


def _write_run(tmp_path, conn, ids, hashes, tag="random:seed=0", dim=3, value=None):
    fdir = tmp_path / "features"
    ids = np.asarray(ids, np.int64)
    with store.ShardWriter(fdir, "toy", tag, ids) as w:
        pooled = np.stack([np.full(dim, i if value is None else value, np.float32) for i in ids])
        spatial = np.repeat(pooled[:, None, :], 2, axis=1).astype(np.float16)
        w.write(np.arange(len(ids)), pooled, spatial)
    rows = pd.DataFrame({"item_id": ids, "row": np.arange(len(ids)), "content_hash": hashes})
    prov = {"weights_used": tag, "pooled_node": "p", "pooled_dim": dim, "spatial_node": "s", "spatial_regions": 2,
            "spatial_channels": dim, "preprocessing": "x"}
    store.commit_index(conn, "toy", tag, w.shard, rows, prov)
    return w.shard


def test_store_serves_only_current_ok_unchanged_items_and_compacts(tmp_path):
    dbp = tmp_path / "v.duckdb"
    fdir = tmp_path / "features"
    with db.connect(dbp) as conn:
        store.ensure_tables(conn)
        _item_images(conn, [(i, "ok", f"h{i}") for i in range(1, 7)])
        _write_run(tmp_path, conn, [1, 2, 3], ["h1", "h2", "h3"])
        _write_run(tmp_path, conn, [4, 5], ["h4", "h5"])
        _item_images(conn, [(2, "corrupt", "h2"), (3, "ok", "h3-new")])
    query = np.array([5, 1, 2, 3, 99, 1, 6])
    pooled, mask = store.load_pooled(dbp, fdir, "toy", query)
    assert pooled.dtype == np.float32 and pooled.shape == (7, 3)
    assert mask.tolist() == [True, True, False, False, False, True, False]
    assert pooled[:, 0].tolist() == [5, 1, 0, 0, 0, 1, 0]
    spatial, smask = store.load_spatial(dbp, fdir, "toy", query)
    assert spatial.dtype == np.float16 and spatial.shape == (7, 2, 3) and np.array_equal(smask, mask)
    assert store.feature_dim(dbp, "toy") == 3 and store.spatial_shape(dbp, "toy") == (2, 3)
    snap = store.snapshot(dbp, fdir, "toy")
    streamed = {int(i): v for ids, feats in snap.iter_pooled(chunk=1) for i, v in zip(ids, feats)}
    assert sorted(streamed) == snap.item_ids.tolist() == [1, 4, 5]  # both shards, served items only
    for i, v in streamed.items():
        np.testing.assert_array_equal(v, store.load_pooled(dbp, fdir, "toy", [i])[0][0])
    with db.connect(dbp) as conn:
        todo = store.todo_items(conn, fdir, "toy", "random:seed=0")
        assert todo["item_id"].tolist() == [3, 6]  # changed hash, never computed; not the corrupt one
        assert store.todo_items(conn, fdir, "toy", "random:seed=9")["item_id"].tolist() == [1, 3, 4, 5, 6]
        before = store.referenced_shards(conn, "toy")
        assert store.compact(lambda: db.connect(dbp), fdir, "toy", max_shards=2) is None
        new = store.compact(lambda: db.connect(dbp), fdir, "toy", max_shards=1)
        assert new is not None and {s for _, s in store.referenced_shards(conn, "toy")} == {new}
        removed = store.remove_unreferenced(conn, fdir, "toy", before)
    assert removed == 6  # two old shards x (ids, pooled, spatial)
    again, mask2 = store.load_pooled(dbp, fdir, "toy", query)
    np.testing.assert_array_equal(again, pooled)
    np.testing.assert_array_equal(mask2, mask)
    prov = store.feature_provenance(duckdb.connect(str(dbp)), "toy")
    assert prov["weights_tag"] == "random:seed=0" and prov["pooled_dim"] == 3


def test_missing_shard_files_are_recomputed_and_failed_writes_leave_nothing(tmp_path):
    dbp = tmp_path / "v.duckdb"
    fdir = tmp_path / "features"
    with db.connect(dbp) as conn:
        store.ensure_tables(conn)
        _item_images(conn, [(1, "ok", "h1"), (2, "ok", "h2")])
        shard = _write_run(tmp_path, conn, [1, 2], ["h1", "h2"])
        assert store.todo_items(conn, fdir, "toy", "random:seed=0").empty
        store.shard_path(fdir, "toy", "random:seed=0", shard, "pooled").unlink()
        assert store.todo_items(conn, fdir, "toy", "random:seed=0")["item_id"].tolist() == [1, 2]
    files_before = sorted(fdir.rglob("*"))
    with pytest.raises(RuntimeError):
        with store.ShardWriter(fdir, "toy", "random:seed=0", np.array([1])) as w:
            w.write(np.array([0]), np.ones((1, 3), np.float32), None)
            raise RuntimeError("killed mid-run")
    assert sorted(fdir.rglob("*")) == files_before and w.shard is None
    with pytest.raises(ValueError, match="invalid feature shard"):
        store.shard_path(fdir, "toy", "t", "../../etc/passwd", "pooled")


def test_rows_of_an_older_feature_revision_are_recomputed_also_in_a_database_from_before_revisions(tmp_path):
    dbp = tmp_path / "v.duckdb"
    fdir = tmp_path / "features"
    with db.connect(dbp) as conn:
        # the index as created before the revision column existed
        conn.execute(
            "CREATE TABLE embedding_index (backbone VARCHAR NOT NULL, weights_tag VARCHAR NOT NULL, item_id BIGINT NOT NULL, "
            'shard VARCHAR NOT NULL, "row" BIGINT NOT NULL, content_hash VARCHAR NOT NULL, computed_at TIMESTAMP NOT NULL, '
            "PRIMARY KEY (backbone, item_id))"
        )
        store.ensure_tables(conn)
        _item_images(conn, [(1, "ok", "h1"), (2, "ok", "h2")])
        _write_run(tmp_path, conn, [1, 2], ["h1", "h2"])  # revision 0
        assert store.todo_items(conn, fdir, "toy", "random:seed=0").empty
        assert store.todo_items(conn, fdir, "toy", "random:seed=0", revision=1)["item_id"].tolist() == [1, 2]
        rows = pd.DataFrame({"item_id": [1], "row": [0], "content_hash": ["h1"]})
        shard = _write_run(tmp_path, conn, [1], ["h1"])
        prov = store.feature_provenance(conn, "toy")
        store.commit_index(conn, "toy", "random:seed=0", shard, rows, {**prov, "weights_used": "x"}, revision=1)
        assert store.todo_items(conn, fdir, "toy", "random:seed=0", revision=1)["item_id"].tolist() == [2]


def test_reading_a_backbone_never_computed_is_a_clear_error(tmp_path):
    dbp = tmp_path / "v.duckdb"
    with db.connect(dbp) as conn:
        store.ensure_tables(conn)
        _item_images(conn, [])
        assert store.feature_provenance(conn, "resnet50") == {}
    with pytest.raises(store.FeaturesNotFoundError, match="materialize embeddings_resnet50"):
        store.load_pooled(dbp, tmp_path, "resnet50", np.array([1]))


# --- k-means and neighbours ----------------------------------------------------------------------


def test_kmeans_is_deterministic_and_finds_the_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    truth = np.repeat(np.arange(4), [50, 40, 30, 20])
    x = centres[truth] + rng.normal(size=(len(truth), 8))
    a, b = kmeans(x, 4, seed=1), kmeans(x, 4, seed=1)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.converged and len(np.unique(a.labels)) == 4
    assert a.sizes.tolist() == [50, 40, 30, 20]  # relabelled largest first
    # each true blob maps to exactly one cluster
    assert all(len(np.unique(a.labels[truth == t])) == 1 for t in range(4))
    small = kmeans(x[:3], 20, seed=0)
    assert len(small.centroids) == 3 and sorted(small.labels.tolist()) == [0, 1, 2]
    same = kmeans(np.ones((10, 4)), 3, seed=0)  # degenerate data does not crash
    assert same.labels.shape == (10,)


def test_cosine_neighbours_over_chunks_match_a_full_ranking():
    rng = np.random.default_rng(1)
    ids = np.arange(100, 150)
    feats = rng.normal(size=(50, 16)).astype(np.float32)
    q = np.array([103, 140])
    chunks = [(ids[i : i + 7], feats[i : i + 7]) for i in range(0, 50, 7)]
    nn_ids, nn_s = cosine_neighbours(q, feats[q - 100], chunks, 5)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = f[q - 100] @ f.T
    sims[[0, 1], q - 100] = -np.inf
    expected = ids[np.argsort(-sims, axis=1)[:, :5]]
    np.testing.assert_array_equal(nn_ids, expected)
    assert np.all(np.diff(nn_s, axis=1) <= 1e-6)


def test_cpu_graph_and_bf16_agree_with_eager_fp32(images):
    bb = load_backbone(RESNET18, "random", seed=2)
    eager, ref = run(bb, images, cpu_graph=False)
    assert eager.graph == "eager"
    graph, fp32 = run(bb, images)
    assert graph.graph == "jit+onednn" and not graph.notes
    np.testing.assert_allclose(fp32.result()[1], ref.result()[1], rtol=1e-4, atol=1e-5)
    bf16_stats, bf16 = run(bb, images, precision="bf16")
    assert bf16_stats.precision == "bf16"
    (_, p, s), (_, rp, rs) = bf16.result(), ref.result()
    cos = (p * rp).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(rp, axis=1)
    assert cos.min() > 0.99 and s.dtype == np.float16 and s.shape == rs.shape
    # the bf16 model is a copy: the backbone itself still computes fp32, and prepared models are reused
    assert bb.extractor.conv1.weight.dtype == torch.float32
    again, _ = run(bb, images[:1])
    assert again.prepare_seconds < graph.prepare_seconds or again.prepare_seconds < 0.05


def test_alexnet_bf16_agrees_with_fp32_and_is_deterministic(images):
    # regression: the bf16 copy of the extractor came back in training mode and ran AlexNet's Dropout
    bb = load_backbone(BACKBONES["alexnet"], "random", seed=3)
    _, ref = run(bb, images)
    for cpu_graph in (False, True):
        first, second = (run(bb, images, precision="bf16", cpu_graph=cpu_graph)[1].result()[1] for _ in range(2))
        np.testing.assert_array_equal(first, second)
        rp = ref.result()[1]
        cos = (first * rp).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(rp, axis=1)
        assert cos.min() > 0.999, (cpu_graph, cos)


def test_random_init_is_cached_and_gives_the_same_model(tmp_path, caplog):
    from visrec_pipeline.embeddings.weights import random_init_cache_path

    fresh = build_model(RESNET18, "random", seed=4)[0].state_dict()
    cache = tmp_path / "init"
    first = build_model(RESNET18, "random", seed=4, init_cache_dir=cache)[0].state_dict()
    path = random_init_cache_path(cache, RESNET18, 4)
    assert path.is_file() and list(cache.iterdir()) == [path]
    cached = build_model(RESNET18, "random", seed=4, init_cache_dir=cache)[0]
    assert not any(t.is_meta for t in cached.state_dict().values())
    for sd in (first, cached.state_dict()):
        assert sd.keys() == fresh.keys() and all(torch.equal(sd[k], fresh[k]) for k in fresh)
    other_seed = build_model(RESNET18, "random", seed=5, init_cache_dir=cache)[0].state_dict()
    assert not torch.equal(other_seed["conv1.weight"], fresh["conv1.weight"])
    path.write_bytes(b"truncated")  # an unreadable cache is rebuilt, loudly
    with caplog.at_level("WARNING"):
        again = build_model(RESNET18, "random", seed=4, init_cache_dir=cache)[0].state_dict()
    assert "unreadable" in caplog.text and all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert torch.load(path, weights_only=True).keys() == fresh.keys()


class _FailsOnSecondCall(torch.nn.Module):
    """Stands in for a fused graph that oneDNN rejects only when it compiles (seen with AlexNet in bf16)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= 2:
            raise RuntimeError("could not add op to the graph")
        return self.inner(x)


def test_a_fused_graph_failing_at_run_time_falls_back_to_eager_with_a_note(images):
    from visrec_pipeline.embeddings.extract import prepare_model

    bb = load_backbone(RESNET18, "random", seed=2)
    _, ref = run(bb, images, cpu_graph=False)
    prepared = prepare_model(bb, torch.device("cpu"), None, True)  # what extract_features will use (cached)
    assert prepared.graph == "jit+onednn" and prepared.eager is not None
    prepared.model = _FailsOnSecondCall(prepared.model)
    assert len(images) >= 4  # two full batches of 2: the graph runs full batches only
    stats, sink = run(bb, images, batch_size=2)
    assert stats.graph == "eager" and stats.n_ok == len(images) and not stats.failures
    assert any("fused TorchScript graph failed" in n and "could not add op" in n for n in stats.notes)
    np.testing.assert_allclose(sink.result()[1], ref.result()[1], rtol=1e-4, atol=1e-5)
    # the switch is kept: the next extraction runs eager from the start and still says why, once
    again, _ = run(bb, images[:2], batch_size=2)
    assert again.graph == "eager" and len(again.notes) == 1 and "fused TorchScript graph failed" in again.notes[0]


def test_a_small_job_runs_eager_and_decodes_in_process(images):
    bb = load_backbone(RESNET18, "random", seed=2)
    small, sink = run(bb, images[:3], num_workers=None, small_job=64)
    assert small.graph == "eager" and small.num_workers == 0 and small.n_ok == 3
    big, big_sink = run(bb, images[:3], num_workers=None, small_job=2)
    assert big.graph == "jit+onednn" and big.num_workers > 0
    np.testing.assert_allclose(sink.result()[1], big_sink.result()[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sink.result()[2], big_sink.result()[2], rtol=1e-3, atol=1e-3)  # spatial, float16
    # an explicit worker count is kept
    assert run(bb, images[:3], num_workers=1, small_job=64)[0].num_workers == 1


def test_a_small_job_reads_the_nodes_by_hooks_that_leave_the_model_as_it_was(images):
    for spec in (RESNET18, BACKBONES["alexnet"]):
        light, traced = (load_backbone(spec, "random", seed=2) for _ in range(2))
        _, sink = run(light, images[:3], small_job=64)
        assert "extractor" not in vars(light)  # nothing was traced for it
        _, ref = run(traced, images[:3], small_job=0)
        np.testing.assert_allclose(sink.result()[1], ref.result()[1], rtol=1e-4, atol=1e-5)
        assert all(not m._forward_hooks for m in light.model.modules())
        bf16 = run(light, images[:3], small_job=64, precision="bf16")[1].result()[1]
        rp = ref.result()[1]
        assert ((bf16 * rp).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(rp, axis=1)).min() > 0.999
        assert light.model.conv1.weight.dtype == torch.float32 if spec is RESNET18 else True  # bf16 is a copy
        # the light and the traced variants of one backbone coexist
        _, again = run(light, images[:3], small_job=0)
        np.testing.assert_allclose(again.result()[1], ref.result()[1], rtol=1e-4, atol=1e-5)
    # a node that is a function call, not a submodule, cannot be hooked: the traced extractor is used
    flat = BackboneSpec("resnet18_flat", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "flatten")
    bb = load_backbone(flat, "random", seed=2)
    assert flat.hooked_extractor(bb.model) is None
    stats, sink = run(bb, images[:2], small_job=64)
    assert stats.n_ok == 2 and sink.result()[1].shape == (2, 512)


def test_a_short_batch_runs_eager_so_the_graph_keeps_one_input_shape(images):
    from visrec_pipeline.embeddings.extract import prepare_model

    bb = load_backbone(RESNET18, "random", seed=2)
    prepared = prepare_model(bb, torch.device("cpu"), None, True)
    shapes = []
    graph = prepared.model

    class Recording(torch.nn.Module):
        def forward(self, x):
            shapes.append(int(x.shape[0]))
            return graph(x)

    prepared.model = Recording()
    n = len(images)
    assert n % 4, "the fixture should leave a short last batch"
    _, sink = run(bb, images, batch_size=4)
    assert shapes == [4] * (n // 4)
    _, ref = run(bb, images, cpu_graph=False)
    np.testing.assert_allclose(sink.result()[1], ref.result()[1], rtol=1e-4, atol=1e-5)


def test_decode_workers_are_forked_even_where_forkserver_is_the_default(images):
    """A Dagster step runs in a forkserver child, whose default start method is forkserver: workers
    started that way re-import torch and the package before the first batch."""
    import multiprocessing

    from visrec_pipeline.embeddings.extract import _loader

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    bb = load_backbone(RESNET18, "random", seed=2)
    loader = _loader(ImageFileDataset(images, bb.transform), 2, 1, False)
    assert loader.multiprocessing_context.get_start_method() == "fork"
    assert _loader(ImageFileDataset(images, bb.transform), 2, 0, False).multiprocessing_context is None


def test_preview_queries_are_stable_and_unchanged_grids_come_from_the_cache(images, tmp_path):
    from visrec_pipeline.embeddings import preview

    ids = np.arange(1000, 2500)
    picked = preview.stable_sample(ids, 4)
    assert picked.size == 4 and np.all(np.diff(picked) > 0) and np.isin(picked, ids).all()
    grown = preview.stable_sample(np.arange(1000, 2515), 4)  # 15 new items: at most a new id or so joins
    assert np.isin(picked, grown).sum() >= 3
    assert preview.stable_sample(ids[:3], 4).tolist() == ids[:3].tolist()

    cache = preview.GridCache(tmp_path / "grids", keep=2)
    tiles, captions = [images[0], images[1], None], ["a", "b", "c"]
    first = cache.png(tiles, captions, cols=3)
    assert len(list((tmp_path / "grids").glob("*.png"))) == 1
    rendered = preview.GridCache(None).png(tiles, captions, cols=3)
    assert first == rendered and cache.png(tiles, captions, cols=3) == first
    (cached,) = (tmp_path / "grids").glob("*.png")
    cached.write_bytes(b"")  # a damaged cache file is rendered again, not served
    assert cache.png(tiles, captions, cols=3) == first
    assert cache.png(tiles, ["a", "b", "changed"], cols=3) != first  # captions are part of the key
    tile = jpeg(tmp_path / "tile.jpg", 98)
    before = cache.png([tile], ["x"], cols=1)
    jpeg(tile, 99, size=64)  # the same path with other content
    assert cache.png([tile], ["x"], cols=1) != before
    assert len(list((tmp_path / "grids").glob("*.png"))) == 2  # only the last `keep` are kept
    with Image.open(io.BytesIO(first)) as im:
        assert im.format == "PNG" and im.size[0] > 3 * preview.TILE


def test_a_single_use_backbone_converts_in_place_with_the_same_features(images):
    for small_job in (64, 0):  # the light (hooks) and the traced variant
        shared = load_backbone(RESNET18, "random", seed=6)
        once = load_backbone(RESNET18, "random", seed=6, single_use=True)
        _, a = run(shared, images[:3], precision="bf16", small_job=small_job)
        _, b = run(once, images[:3], precision="bf16", small_job=small_job)
        np.testing.assert_array_equal(a.result()[1], b.result()[1])
        assert shared.model.conv1.weight.dtype == torch.float32  # copied
        assert once.model.conv1.weight.dtype == torch.bfloat16  # converted in place
        with pytest.raises(RuntimeError, match="single use"):
            run(once, images[:3], precision="fp32", small_job=small_job)


def test_the_init_cache_folder_follows_the_data_dir_unless_the_environment_moves_it(tmp_path, monkeypatch):
    from visrec_pipeline.paths import INIT_CACHE_ENV, Workspace

    monkeypatch.delenv(INIT_CACHE_ENV, raising=False)
    ws = Workspace.from_settings(tmp_path / "data", "demo")
    assert ws.init_cache_dir == (tmp_path / "data" / "cache" / "random_init").resolve()
    monkeypatch.setenv(INIT_CACHE_ENV, str(tmp_path / "shared"))
    assert ws.init_cache_dir == (tmp_path / "shared").resolve()
