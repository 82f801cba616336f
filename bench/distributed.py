"""Embeddings throughput: in the step's process (local) vs a private Ray cluster of 1 and 2 workers.

    uv run --frozen --no-sync python bench/distributed.py [--n 160] [--backbone resnet50] [--workers 1,2]
        [--batch-size 32] [--precision auto]

One temp workspace: ``--n`` real JPEG thumbnails (256 x 256, smooth colour fields plus noise) put
in the content-addressed image store and marked ok in ``item_images``; the plan of the embeddings
step (every image to compute). Then, each in its own process so that its peak RSS is its own:

- ``local``: ``update.extract`` as the asset runs it (device auto, torch's default threads);
- ``ray:W``: a private cluster (``LocalRayCluster``: a head and W worker nodes of 1 CPU, or 1 GPU
  each on a CUDA machine) started and connected (``startup_s``, reported apart), then
  ``extract_on_ray`` (``extract_s``: actors start, load the backbone, write one shard each;
  ``actor_setup_s``: until the last actor had started and loaded the backbone, inside ``extract_s``;
  ``worker_peak_rss_mb``: the largest actor's peak RSS).

Same weights everywhere (random init, seed 0: no download); each mode's pooled features are
compared with the local ones (min cosine per image). ``images_per_s`` = n / extract_s;
``steady_images_per_s`` = n / (extract_s - actor_setup_s). On CUDA, ``images_per_s_per_gpu``.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from visrec_pipeline import db  # noqa: E402
from visrec_pipeline.paths import INIT_CACHE_ENV, Workspace  # noqa: E402


def write_store(ws: Workspace, n: int, seed: int = 0) -> None:
    """``n`` JPEG thumbnails in the image store, one ok ``item_images`` row each."""
    from PIL import Image

    from visrec_pipeline.images import table as images_table
    from visrec_pipeline.images.store import ImageStore
    from visrec_pipeline.images.worker import ItemImageRow

    rng = np.random.default_rng(seed)
    store = ImageStore.for_workspace(ws)
    rows = []
    for item_id in range(1, n + 1):
        field = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((256, 256), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-20, 20, size=(256, 256, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
        h, rel = store.put(buf.getvalue())
        rows.append(ItemImageRow(item_id, "ok", "", h, rel, 256, 256, "bench"))
    with db.connect(ws.db_path) as conn:
        images_table.ensure_table(conn)
        with db.transaction(conn):
            images_table.upsert_rows(conn, rows)


def _pooled_in_plan_order(ws: Workspace, features_dir: Path, backbone: str, tag: str, todo, rows) -> np.ndarray:
    from visrec_pipeline.embeddings import store

    out = None
    pos_of = {int(i): k for k, i in enumerate(todo["item_id"])}
    for shard, group in rows.groupby("shard"):
        arr = np.load(store.shard_path(features_dir, backbone, tag, shard, "pooled"), mmap_mode="r", allow_pickle=False)
        if out is None:
            out = np.zeros((len(todo), arr.shape[1]), np.float32)
        dst = [pos_of[int(i)] for i in group["item_id"]]
        out[dst] = arr[group["row"].to_numpy()]
    return out


def child(args: argparse.Namespace) -> dict:
    """One mode in this process; writes its pooled features next to the workspace."""
    import torch

    from visrec_pipeline.embeddings import update
    from visrec_pipeline.embeddings.backbones import get_backbone
    from visrec_pipeline.embeddings.extract import load_backbone

    ws = Workspace.from_settings(Path(args.root) / "data", "bench").ensure()
    spec = get_backbone(args.backbone)
    cuda = torch.cuda.is_available()
    options = {"device": "auto", "precision": args.precision, "batch_size": args.batch_size}
    t0 = time.perf_counter()
    backbone = load_backbone(spec, "random", init_cache_dir=ws.init_cache_dir)
    plan = update.plan(lambda: db.connect(ws.db_path), ws.features_dir, backbone)
    features_dir = Path(args.root) / f"features_{args.mode.replace(':', '_')}"
    out: dict = {"mode": args.mode, "n": len(plan.todo), "load_s": round(time.perf_counter() - t0, 2)}
    if args.mode == "local":
        t0 = time.perf_counter()
        x = update.extract(backbone, plan, ws.root, features_dir, num_workers=-1, **options)
        out.update(extract_s=round(time.perf_counter() - t0, 2), threads=torch.get_num_threads())
    else:
        from visrec_pipeline.distributed.cluster import ComputeSettings, LocalRayCluster, ray_session
        from visrec_pipeline.distributed.embeddings import extract_on_ray

        workers = int(args.mode.split(":")[1])
        t0 = time.perf_counter()
        cluster = LocalRayCluster(workers=workers, cpus_per_worker=1, gpus_per_worker=1 if cuda else 0)
        settings = ComputeSettings(
            engine="ray", address=cluster.address, workers=workers, gpus_per_worker=1.0 if cuda else 0.0
        )
        try:
            with ray_session(settings):
                out["startup_s"] = round(time.perf_counter() - t0, 2)
                t0 = time.perf_counter()
                on_ray = extract_on_ray(
                    backbone, plan, ws.root, features_dir, settings, init_cache_dir=ws.init_cache_dir, **options
                )
                out["extract_s"] = round(time.perf_counter() - t0, 2)
        finally:
            cluster.close()
        x = on_ray.extraction
        out.update(
            workers=on_ray.workers, shards=on_ray.shards, actor_setup_s=round(on_ray.setup_seconds, 2),
            steady_images_per_s=round(len(plan.todo) / max(out["extract_s"] - on_ray.setup_seconds, 1e-9), 2),
            worker_peak_rss_mb=round(on_ray.worker_peak_rss_mb),
        )
    out.update(
        images_per_s=round(len(plan.todo) / out["extract_s"], 2), device=x.stats.device, precision=x.stats.precision,
        graph=x.stats.graph, failed=len(x.failures), peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    if cuda:
        out["images_per_s_per_gpu"] = round(out["images_per_s"] / max(out.get("workers", 1), 1), 2)
    pooled = _pooled_in_plan_order(ws, features_dir, spec.name, backbone.weights.tag, plan.todo, x.rows)
    np.save(Path(args.root) / f"pooled_{args.mode.replace(':', '_')}.npy", pooled, allow_pickle=False)
    return out


def _run_child(args: argparse.Namespace, mode: str, root: Path) -> dict:
    argv = [
        sys.executable, __file__, "--child", mode, "--root", str(root), "--backbone", args.backbone,
        "--batch-size", str(args.batch_size), "--precision", args.precision,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"mode {mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return round(float(cos.min()), 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=160, help="images (over 64 per actor with 2 workers: the traced graph runs everywhere)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        # one random-init cache for every mode: each loads the same file
        os.environ[INIT_CACHE_ENV] = str(root / "init_cache")
        ws = Workspace.from_settings(root / "data", "bench").ensure()
        t0 = time.perf_counter()
        write_store(ws, args.n)
        print(f"{args.n} thumbnails written in {time.perf_counter() - t0:.1f} s", flush=True)
        results = {}
        for mode in ["local", *(f"ray:{int(w)}" for w in args.workers.split(","))]:
            results[mode] = _run_child(args, mode, root)
            print(json.dumps(results[mode]), flush=True)
        local = np.load(root / "pooled_local.npy")
        for mode in results:
            if mode != "local":
                results[mode]["min_cosine_vs_local"] = _min_cosine(np.load(root / f"pooled_{mode.replace(':', '_')}.npy"), local)
    base = results["local"]["images_per_s"]
    summary = {
        "bench": "distributed_embeddings",
        "n": args.n,
        "backbone": args.backbone,
        "cpus": os.cpu_count(),
        "modes": results,
        "ratio_vs_local": {m: round(r["images_per_s"] / base, 3) for m, r in results.items() if m != "local"},
        "steady_ratio_vs_local": {
            m: round(r["steady_images_per_s"] / base, 3) for m, r in results.items() if m != "local"
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
