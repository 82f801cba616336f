"""CuratorNet at scale: one training epoch (random triples, shuffled or in batches of whole users;
guideline triples) and the guided sampler, on synthetic power-law data, each run in its own process;
wall time, CPU time and peak RSS.

    uv run --frozen --no-sync python bench/curatornet_epoch.py [--sizes 100000,1000000 --dim 256]
    uv run --frozen --no-sync python bench/curatornet_epoch.py --uncapped   # the caps off, for comparison

Data: items = interactions / 10, users = interactions / 50; item popularity Zipf-like
(p ~ 1 / (rank + 10)), user activity log-normal (sigma 1.2, at least 3 items); random Gaussian
features of ``--dim`` dimensions; 20 visual clusters (thousands of items each at 1M) and no creator,
the case where every guideline's artist is a large cluster. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def synthetic(n_interactions: int, dim: int, seed: int = 0):
    from visrec_pipeline.recsys.data import CSR

    rng = np.random.default_rng(seed)
    n_items, n_users = max(n_interactions // 10, 100), max(n_interactions // 50, 20)
    pop = 1.0 / (np.arange(n_items) + 10.0)
    pop = pop[rng.permutation(n_items)]
    pop /= pop.sum()
    activity = rng.lognormal(0.0, 1.2, n_users)
    per_user = np.maximum(3, np.round(activity / activity.sum() * n_interactions)).astype(np.int64)
    per_user = np.minimum(per_user, n_items // 2)
    rows = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
    cols = rng.choice(n_items, size=rows.size, p=pop)
    train = CSR.from_pairs(rows, cols, n_users, n_items)  # repeats dropped
    ts = rng.integers(0, 10**9, train.nnz)
    features = rng.standard_normal((n_items, dim), dtype=np.float32)
    clusters = rng.integers(0, 20, n_items).astype(np.int64)
    return train, ts, features, clusters


def run_one(n: int, dim: int, mode: str, uncapped: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from visrec_pipeline.recsys.base import FitInputs
    from visrec_pipeline.recsys.data import IndexMap, RecData
    from visrec_pipeline.recsys.guided_sampler import GuidedSamplerConfig, build_guided_triples
    from visrec_pipeline.recsys.models.curatornet import CuratorNet, CuratorNetConfig

    train, ts, features, clusters = synthetic(n, dim)
    data = RecData(
        IndexMap(np.arange(train.n_rows, dtype=np.int64)), IndexMap(np.arange(train.n_cols, dtype=np.int64)), train, ts
    )
    cap = {"candidates_per_artist": 10**9} if uncapped else {}
    out: dict = {"interactions": int(train.nnz), "items": train.n_cols, "users": train.n_rows, "mode": mode}
    inputs = FitInputs(features=features, feature_mask=np.ones(train.n_cols, bool), clusters=clusters)
    wall, cpu = time.perf_counter(), time.process_time()
    if mode in ("sampler", "guided"):
        triples = build_guided_triples(train, ts, features, clusters=clusters, config=GuidedSamplerConfig(**cap))
        out["sampler_wall_s"] = round(time.perf_counter() - wall, 2)
        out["sampler_cpu_s"] = round(time.process_time() - cpu, 2)
        out["triples"] = len(triples)
        out["profile_entries"] = int(triples.profiles.nnz)
        inputs.extra["triples_guided"] = triples
    if mode in ("random", "random_by_user", "guided") or mode.startswith("random_chunk"):
        # random: the plain shuffle (chunks of 1); random_chunkN: chunks of N triples of one user
        chunk = int(mode.removeprefix("random_chunk")) if mode.startswith("random_chunk") else 1
        config = CuratorNetConfig(
            sampler="guided" if mode == "guided" else "random",
            random_batches_by_user=mode == "random_by_user",
            random_user_chunk=chunk,
            train={"epochs": 1, "batch_size": 1024, "seed": 0, "device": "cpu"},
            train_profile_items=0 if uncapped else CuratorNetConfig().train_profile_items,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        CuratorNet(config).fit(data, inputs)
        out["epoch_wall_s"] = round(time.perf_counter() - wall, 2)
        out["epoch_cpu_s"] = round(time.process_time() - cpu, 2)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--modes", default="sampler,random,random_chunk4,random_by_user,guided")
    parser.add_argument("--uncapped", action="store_true", help="candidates_per_artist and train_profile_items off")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.dim, args.child[1], args.uncapped)))
        return 0
    results = []
    for mode in args.modes.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--child", str(n), mode, "--dim", str(args.dim)]
            cmd += ["--uncapped"] if args.uncapped else []
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                    "mode": mode, "target": n, "failed": done.stderr.strip().splitlines()[-1:]}
            except subprocess.TimeoutExpired:
                row = {"mode": mode, "target": n, "failed": f"timeout after {args.timeout} s"}
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    summary: dict = {"runs": results}
    for mode in args.modes.split(","):
        rows = [r for r in results if r.get("mode") == mode and "failed" not in r]
        key = "sampler_cpu_s" if mode == "sampler" else "epoch_cpu_s"
        if len(rows) >= 2 and all(r.get(key) for r in rows):
            a, b = rows[0], rows[-1]
            summary[f"{mode}_exponent"] = round(
                float(np.log(b[key] / a[key]) / np.log(b["interactions"] / a["interactions"])), 2
            )
    summary["max_peak_rss_gb"] = max((r.get("peak_rss_gb", 0) for r in results), default=0)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
