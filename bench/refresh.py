"""Benchmark: full rebuild of the data side vs the incremental refresh after 1 % new interactions.

One process, one workspace in a temp folder, the demo dataset generated there (not timed):

1. full rebuild: raw_interactions, interactions, item_catalog, split, item_images,
   embeddings_<backbone> (every registered backbone), visual_clusters, triples_random, triples_guided,
   from an empty workspace;
   then os.sync(), timed apart: the refresh should not wait behind the rebuild's writeback;
2. refresh: 1 % new interactions (the first rows of the demo's later batch, with its items file)
   dropped into incoming/, then what production runs: one tick of incoming_files_sensor,
   the batch's partition of incoming_interactions, and the data side (visrec_refresh's assets);
3. training (reported apart, not in the ratio): the selected models on the refreshed data.

Everything runs through Dagster (``dg.materialize``, in-process, ephemeral instance), so step
overhead is included on both sides. Embedding weights: ``auto`` with VISREC_OFFLINE=1 unless the
environment says otherwise (random init when ImageNet weights are not cached).

    uv run python bench/refresh.py [--items 9636] [--users 1079] [--interactions 96991] [--share 0.01]
        [--models most_popular,bpr_mf,vbpr,curatornet]

The last line printed is one JSON object with both times and "refresh_ratio" (goal: <= 0.05).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VISREC_OFFLINE", "1")

import dagster as dg  # noqa: E402
import torch  # noqa: E402

from visrec_pipeline import db  # noqa: E402
from visrec_pipeline.cli import demo_run_config  # noqa: E402
from visrec_pipeline.defs.images import CommonsImageSource  # noqa: E402
from visrec_pipeline.defs.incoming import INCOMING_ASSET  # noqa: E402
from visrec_pipeline.defs.refresh import DATA_SIDE, incoming_files_sensor  # noqa: E402
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings  # noqa: E402
from visrec_pipeline.demo.generate import ensure_demo_summary  # noqa: E402
from visrec_pipeline.paths import Workspace  # noqa: E402

DEFAULT_MODELS = "most_popular,bpr_mf,vbpr,curatornet"


def _take_share(summary, dataset_dir: Path, incoming: Path, share: float) -> int:
    """Write the first ``share`` x (initial rows) rows of the later batch, and its items file, to incoming/."""
    batch = dataset_dir / "later_batches" / f"{summary.batches[0].name}.csv"
    n = max(1, round(share * summary.n_interactions))
    with open(batch, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1 : 1 + n]
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copy(batch.with_name(f"{summary.batches[0].name}_items.csv"), incoming / "bench_items.csv")
    tmp = incoming / ".bench.csv.part"  # dot file: the sensor ignores it until it is renamed into place
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *body])
    tmp.rename(incoming / "bench.csv")
    return len(body)


def _step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    start, out = {}, {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None or not entry.step_key:
            continue
        if ev.event_type_value == "STEP_START":
            start[entry.step_key] = entry.timestamp
        elif ev.event_type_value == "STEP_SUCCESS" and entry.step_key in start:
            out[entry.step_key] = round(entry.timestamp - start[entry.step_key], 3)
    return out


def _meta(result, node: str) -> dict:
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: the size of the tutorial's Wikimedia dataset (1,079 users, 9,636 items, 96,991
    # interactions). Below it the fixed cost of a refresh dominates the ratio: ~1.6 s for nine Dagster
    # steps that find nothing new, against a rebuild that shrinks with the data.
    ap.add_argument("--items", type=int, default=9636)
    ap.add_argument("--users", type=int, default=1079)
    ap.add_argument("--interactions", type=int, default=96991)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--share", type=float, default=0.01, help="new interactions as a share of the initial ones")
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated models to train (empty: none)")
    ap.add_argument("--workdir", default="", help="keep the workspace here instead of a temp folder")
    args = ap.parse_args()

    if args.workdir:
        run_bench(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="visrec-bench-refresh-") as tmp:
            run_bench(args, Path(tmp))


def run_bench(args: argparse.Namespace, root: Path) -> None:
    dataset_dir = root / "dataset"
    summary = ensure_demo_summary(
        dataset_dir, seed=args.seed, n_items=args.items, n_users=args.users, target_interactions=args.interactions
    )
    ws = Workspace.from_settings(root / "data", str(dataset_dir))
    if ws.root.exists():
        shutil.rmtree(ws.root)
    shutil.rmtree(ws.incoming_dir, ignore_errors=True)
    resources = {
        "settings": VisrecSettings(data_dir=str(ws.data_dir), dataset=ws.dataset),
        "duckdb": VisrecDuckDB(database=str(ws.db_path)),
        "commons": CommonsImageSource(),
    }
    from visrec_pipeline.definitions import build_definitions

    defs = build_definitions(resources)
    assets = list(defs.assets)
    graph = defs.resolve_asset_graph()
    data_side = sorted(DATA_SIDE.resolve(graph))
    models = [m for m in args.models.split(",") if m]
    run_config = demo_run_config(torch.cuda.is_available())["ops"]

    def run(instance, keys, **kw):
        keys = [dg.AssetKey(k) if isinstance(k, str) else k for k in keys]
        ops = {k: v for k, v in run_config.items() if dg.AssetKey(k) in keys}
        t0 = time.perf_counter()
        result = dg.materialize(
            assets, selection=keys, resources=resources, instance=instance, run_config={"ops": ops}, **kw
        )
        seconds = time.perf_counter() - t0
        assert result.success
        return result, seconds, _step_seconds(instance, result.run_id)

    with dg.DagsterInstance.ephemeral() as instance:
        full, full_s, full_steps = run(instance, [dg.AssetKey("raw_interactions"), *data_side])
        print(f"full data-side rebuild: {full_s:.2f} s  {full_steps}", flush=True)
        # The rebuild leaves GBs of dirty pages (thumbnails, feature shards) that the kernel writes back
        # for many seconds; every fsync of the refresh (DuckDB commits, atomic file writes) would queue
        # behind them. Flush them first, timed and reported apart, so the refresh pays for its own writes.
        t0 = time.perf_counter()
        os.sync()
        writeback_s = time.perf_counter() - t0
        print(f"writeback of the rebuild's files (os.sync, in neither figure): {writeback_s:.2f} s", flush=True)
        with db.connect(ws.db_path, read_only=True) as conn:
            n_before = conn.execute("SELECT count(*) FROM raw_interactions").fetchall()[0][0]

        n_new = _take_share(summary, dataset_dir, ws.incoming_dir, args.share)
        t0 = time.perf_counter()
        ctx = dg.build_sensor_context(instance=instance, definitions=defs, resources=resources)
        tick = incoming_files_sensor(ctx)
        for req in tick.dynamic_partitions_requests:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        (request,) = tick.run_requests
        sensor_s = time.perf_counter() - t0
        _ingest, ingest_s, ingest_steps = run(instance, [INCOMING_ASSET], partition_key=request.partition_key)
        refresh, data_s, refresh_steps = run(instance, data_side)
        refresh_s = sensor_s + ingest_s + data_s
        print(
            f"refresh after {n_new} new interactions ({n_new / n_before:.2%}): {refresh_s:.2f} s "
            f"(sensor {sensor_s:.2f}, ingest {ingest_s:.2f}, data side {data_s:.2f})  {refresh_steps}",
            flush=True,
        )
        new_items = _meta(refresh, "item_catalog")["new_items"]
        embeddings = [k.to_user_string() for k in data_side if k.to_user_string().startswith("embeddings_")]
        computed = {k: _meta(refresh, k)["computed"] for k in embeddings}
        images = _meta(refresh, "item_images")["processed_this_run"]
        print(f"new items {new_items}; images processed {images}; features computed {computed}", flush=True)

        train_s, train_steps = 0.0, {}
        if models:
            _train, train_s, train_steps = run(instance, [f"model_{m}" for m in models])
            print(f"training {', '.join(models)}: {train_s:.2f} s  {train_steps}", flush=True)

    print(
        json.dumps(
            {
                "bench": "refresh",
                "items": args.items,
                "users": args.users,
                "initial_interactions": int(n_before),
                "new_interactions": n_new,
                "new_share": round(n_new / n_before, 4),
                "new_items": int(new_items),
                "images_processed_in_refresh": int(images),
                "features_computed_in_refresh": {k: int(v) for k, v in computed.items()},
                "full_rebuild_s": round(full_s, 3),
                "refresh_s": round(refresh_s, 3),
                "refresh_ratio": round(refresh_s / full_s, 4),
                "refresh_goal_met": refresh_s <= 0.05 * full_s,
                "writeback_after_rebuild_s": round(writeback_s, 3),
                "full_steps_s": full_steps,
                "refresh_steps_s": {"sensor": round(sensor_s, 3), **ingest_steps, **refresh_steps},
                "train_s": round(train_s, 3),
                "train_steps_s": train_steps,
                "trained_models": models,
                "torch_threads": torch.get_num_threads(),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
