"""Batched feature extraction vs the tutorial's one-image-at-a-time loop, same model, same images.

    uv run python bench/embeddings.py [--n 200] [--images DIR] [--device cpu|cuda] [--backbone resnet50]

Baseline (the tutorial's way): for each image, PIL open, the weights' transform, ``model(x.unsqueeze(0))``
with autograd on. Ours: ``extract_features`` (DataLoader decode workers, batches, ``inference_mode``,
channels-last, autocast where the hardware supports it natively), once at fp32 and once at the
pipeline's default precision. Both use the same randomly initialised backbone (seed 0) and the same
files; features are compared so the speed-up is for the same computation. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from visrec_pipeline.embeddings.backbones import get_backbone  # noqa: E402
from visrec_pipeline.embeddings.extract import extract_features, load_backbone, resolve_precision  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` real JPEGs of varied sizes and aspect ratios (smooth colour fields plus noise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(160, 640, size=2))
        base = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(base, dtype=np.int16) + rng.integers(-20, 20, size=(h, w, 3))
        p = folder / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, "JPEG", quality=88)
        paths.append(p)
    return paths


def baseline(model: torch.nn.Module, transform, paths: list[Path], device: torch.device) -> tuple[np.ndarray, float]:
    """The tutorial's loop: one image per forward pass, autograd left on, default memory format."""
    out = []
    t0 = time.perf_counter()
    for p in paths:
        x = transform(Image.open(p).convert("RGB")).to(device)
        feats = model(x.unsqueeze(0))
        out.append(feats["pooled"].flatten(1).detach().cpu().numpy())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(out), time.perf_counter() - t0


def ours(backbone, paths, device: str, precision: str, batch_size: int, num_workers: int) -> tuple[np.ndarray, float, object]:
    pooled = np.zeros((len(paths), 0), np.float32)
    chunks = {}

    def sink(pos, p, s):
        chunks[int(pos[0])] = p

    stats = extract_features(
        backbone, paths, sink, device=device, precision=precision, batch_size=batch_size, num_workers=num_workers
    )
    pooled = np.concatenate([chunks[k] for k in sorted(chunks)])
    return pooled, stats.seconds, stats


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--n", type=int, default=200, help="images to generate (ignored with --images)")
    ap.add_argument("--images", type=Path, help="a folder of JPEG/PNG images to use instead")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=-1, help="-1 = min(2, CPUs)")
    ap.add_argument("--baseline-n", type=int, default=0, help="time the baseline on the first N images only (0 = all)")
    args = ap.parse_args()

    spec = get_backbone(args.backbone)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        else:
            paths = make_images(Path(tmp), args.n)
        print(f"{len(paths)} images, {spec.name} (random init, seed 0), device {device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

        bb = load_backbone(spec, "random", seed=0)
        # Baseline first on a fresh model in default (contiguous) layout; ours moves it to channels-last.
        ref_model = load_backbone(spec, "random", seed=0).extractor.to(device).eval()
        base_paths = paths[: args.baseline_n] if args.baseline_n else paths
        baseline(ref_model, bb.transform, base_paths[:2], device)  # warm-up (allocator, oneDNN kernels)
        base_feats, base_s = baseline(ref_model, bb.transform, base_paths, device)
        base_rate = len(base_paths) / base_s
        print(f"baseline one-at-a-time : {base_rate:7.1f} images/s ({base_s:.1f} s)")
        del ref_model

        ours(bb, paths[:4], args.device, "fp32", 4, 0)  # warm-up
        f32, s32, st32 = ours(bb, paths, args.device, "fp32", args.batch_size, args.num_workers)
        rate32 = len(paths) / s32
        print(f"batched fp32           : {rate32:7.1f} images/s ({s32:.1f} s, workers {st32.num_workers})")
        default_prec = "fp32" if resolve_precision("auto", device) is None else "auto"
        if default_prec == "auto":
            ours(bb, paths[:4], args.device, "auto", 4, 0)
            fa, sa, sta = ours(bb, paths, args.device, "auto", args.batch_size, args.num_workers)
        else:
            fa, sa, sta = f32, s32, st32
        rate_auto = len(paths) / sa
        print(f"batched default ({sta.precision:4s}) : {rate_auto:7.1f} images/s ({sa:.1f} s)")

    n_cmp = len(base_paths)
    result = {
        "backbone": spec.name,
        "device": str(device),
        "n_images": len(paths),
        "baseline_images": n_cmp,
        "batch_size": args.batch_size,
        "num_workers": st32.num_workers,
        "baseline_images_per_s": round(base_rate, 2),
        "batched_fp32_images_per_s": round(rate32, 2),
        "batched_default_precision": sta.precision,
        "batched_default_images_per_s": round(rate_auto, 2),
        "speedup_fp32": round(rate32 / base_rate, 2),
        "speedup": round(rate_auto / base_rate, 2),
        "max_abs_diff_fp32_vs_baseline": float(np.abs(f32[:n_cmp] - base_feats).max()),
        "min_cosine_default_vs_baseline": round(cosine(fa[:n_cmp], base_feats), 5),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
