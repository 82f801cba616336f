"""Int8 extraction (CPU): fidelity to fp32, a calibration that is stored once and reproduces the model
bit for bit in later runs, padding of short batches, the graph clean-up, the shard store keeping the
calibration file while its feature set lives."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import models

from visrec_pipeline import db
from visrec_pipeline.embeddings import int8, store
from visrec_pipeline.embeddings.backbones import BACKBONES, BackboneSpec
from visrec_pipeline.embeddings.extract import load_backbone, resolve_precision

from test_embeddings import _item_images, _write_run, jpeg, run

pytestmark = pytest.mark.skipif(int8.unavailable_reason() is not None, reason=f"no int8 here: {int8.unavailable_reason()}")

RESNET18 = BackboneSpec("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "avgpool", "layer4")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("int8_imgs")
    return [jpeg(d / f"{i}.jpg", 100 + i, size=64) for i in range(14)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_is_close_to_fp32_and_its_stored_calibration_gives_the_same_features_in_a_later_run(pictures, tmp_path):
    spec = BACKBONES["alexnet"]
    calibration = store.calibration_path(tmp_path / "features", spec.name, "random:seed=0", spec.revision)
    first = load_backbone(spec, "random", seed=0)
    stats, sink = run(first, pictures, precision="int8", batch_size=4, int8_calibration=calibration,
                      int8_calibration_images=6)
    _, pooled, spatial = sink.result()
    assert stats.precision == "int8" and stats.graph == "int8+onednn" and stats.n_ok == len(pictures)
    assert "first 6 images of this run" in stats.int8_calibration and str(calibration) in stats.int8_calibration
    stored = np.load(calibration, allow_pickle=False)
    assert stored.dtype == np.float16 and stored.shape == (6, 3, 224, 224)
    assert pooled.dtype == np.float32 and pooled.shape == (len(pictures), 4096) and spatial is None

    _, fp32_sink = run(first, pictures, precision="fp32")
    assert cosine(pooled, fp32_sink.result()[1]).min() > 0.999

    # A later run (a new process would load the backbone anew) on other images, other batches, other
    # workers: the same quantized model, so the same features for the images both runs saw.
    later = load_backbone(spec, "random", seed=0)
    order = [pictures[i] for i in (13, 2, 7, 5, 0)]
    stats2, sink2 = run(later, order, precision="int8", batch_size=3, num_workers=1, int8_calibration=calibration)
    assert stats2.int8_calibration.startswith("6 stored images")
    pos, pooled2, _ = sink2.result()
    np.testing.assert_array_equal(pooled2, pooled[[13, 2, 7, 5, 0]])  # batch size 3 rebuilt the graph: still equal


def test_int8_resnet_gives_pooled_and_spatial_features_from_a_clean_8_bit_graph(pictures, tmp_path):
    bb = load_backbone(RESNET18, "random", seed=1)
    int8_run = {"precision": "int8", "batch_size": 4, "int8_calibration": tmp_path / "cal.npy", "int8_calibration_images": 8}
    stats, sink = run(bb, pictures[:10], **int8_run)
    _, pooled, spatial = sink.result()
    assert pooled.shape == (10, 512) and spatial.shape == (10, 49, 512) and spatial.dtype == np.float16
    _, ref = run(bb, pictures[:10], precision="fp32")
    _, ref_pooled, ref_spatial = ref.result()
    assert cosine(pooled, ref_pooled).min() > 0.999
    assert cosine(spatial, ref_spatial).min() > 0.99

    # The clean-up left one quantization (the input), max pooling on 8-bit values, every conv in int8.
    (int8_model,) = [p.model for p in bb.prepared.values() if p.graph == "int8+onednn"]
    ops = Counter(str(n.target) for n in int8_model.lowered.graph.nodes if n.op == "call_function")
    assert ops["quantized_decomposed.quantize_per_tensor.default"] == 1
    assert ops["aten.max_pool2d_with_indices.default"] == 0 and ops["aten.max_pool2d.default"] == 1
    convs = sum(1 for m in models.resnet18().modules() if isinstance(m, torch.nn.Conv2d))
    assert ops["onednn.qconv_pointwise.default"] + ops["onednn.qconv2d_pointwise.binary"] == convs

    # The last batch (10 = 4 + 4 + 2) was padded to the graph's batch size: same result as in a full batch.
    _, again = run(bb, pictures[8:10] + pictures[:2], **int8_run)
    np.testing.assert_array_equal(again.result()[1][:2], pooled[8:10])


def test_int8_is_refused_on_cuda_and_needs_readable_images_to_calibrate(tmp_path):
    with pytest.raises(ValueError, match="int8 runs on CPU"):
        resolve_precision("int8", torch.device("cuda"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    bb = load_backbone(BACKBONES["alexnet"], "random", seed=0)
    with pytest.raises(RuntimeError, match="calibration needs readable images"):
        run(bb, [broken, None], precision="int8", int8_calibration=tmp_path / "cal.npy")
    assert not (tmp_path / "cal.npy").exists()


def test_without_a_calibration_file_int8_calibrates_on_the_run_and_says_so(pictures):
    bb = load_backbone(BACKBONES["alexnet"], "random", seed=0)
    stats, sink = run(bb, pictures[:5], precision="int8", int8_calibration_images=3)
    assert stats.int8_calibration == "the first 3 images of this run (not stored)" and stats.n_ok == 5


def test_a_damaged_calibration_file_is_replaced(pictures, tmp_path, caplog):
    calibration = tmp_path / "cal.npy"
    calibration.write_bytes(b"\x93NUMPY garbage")
    bb = load_backbone(BACKBONES["alexnet"], "random", seed=0)
    stats, _ = run(bb, pictures[:4], precision="int8", int8_calibration=calibration, int8_calibration_images=4)
    assert "unreadable" in caplog.text and "first 4 images" in stats.int8_calibration
    assert np.load(calibration, allow_pickle=False).shape == (4, 3, 224, 224)


def test_the_shard_store_keeps_a_calibration_while_its_feature_set_has_shards(tmp_path):
    dbp, fdir = tmp_path / "v.duckdb", tmp_path / "features"
    with db.connect(dbp) as conn:
        store.ensure_tables(conn)
        _item_images(conn, [(1, "ok", "h1")])
        _write_run(tmp_path, conn, [1], ["h1"], tag="random:seed=0")
        kept = store.calibration_path(fdir, "toy", "random:seed=0", 0)
        orphan = store.calibration_path(fdir, "toy", "random:seed=5", 0)
        for path in (kept, orphan):
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.zeros((1, 3, 2, 2), np.float16), allow_pickle=False)
        old = time.time() - 2 * store.ORPHAN_AGE_S
        for path in (kept, orphan):
            os.utime(path, (old, old))
        assert store.remove_unreferenced(conn, fdir, "toy") == 1
    assert kept.exists() and not orphan.exists() and not orphan.parent.exists()
    with pytest.raises(ValueError):
        store.calibration_path(fdir, "../etc", "t", 0)


def test_a_graph_the_quantizer_cannot_take_is_a_clear_error(pictures, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("Input partition has more than one output node")

    monkeypatch.setattr(int8, "quantize_extractor", refuse)
    bb = load_backbone(BACKBONES["alexnet"], "random", seed=0)
    with pytest.raises(RuntimeError, match="alexnet: int8 quantization failed .*precision auto or bf16"):
        run(bb, pictures[:2], precision="int8", int8_calibration_images=2)
