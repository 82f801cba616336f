"""Benchmark: the vectorised full-ranking evaluator vs the obvious per-user loop, on the same scores.

Synthetic: random scores (rounded to 3 decimals, so ties occur) for every user x item, profiles of
1-200 items, 1-5 items to predict. The score function hands out rows of one precomputed matrix.
The loop is ``metrics.reference_row_metrics`` (a stable argsort of each full row, then position
look-ups); both must agree to 1e-6 on every metric of every row, under both protocols.

Both sides are timed as the best of a few runs (the machine is shared); torch gets one thread
unless ``--threads`` says otherwise (the numpy loop uses one core). "ours_s"/"speedup" exclude the
time spent inside the score function (it only copies rows of the matrix, which the loop reads in
place); "ours_incl_score_fn_s"/"speedup_incl_score_fn" include it.

    uv run python bench/evaluation.py [--users 1000] [--items 30000] [--device cpu]

The last line printed is one JSON object with both times and the speedup.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import pandas as pd
import torch

from visrec_pipeline.recsys.data import Holdout
from visrec_pipeline.recsys.evaluate import TUTORIAL_PROFILE_LEN, evaluate
from visrec_pipeline.recsys.metrics import reference_row_metrics

KS = (20, 100)


def make_data(n_users: int, n_items: int, seed: int):
    rng = np.random.default_rng(seed)
    # rounded to 3 decimals: a few thousand distinct values, so ties are common
    scores = np.round(rng.standard_normal((n_users, n_items)), 3).astype(np.float32)
    profile_len = rng.integers(1, 201, n_users)
    predict_len = rng.integers(1, 6, n_users)
    # distinct items per user without a per-user loop: the first draws of a random permutation key
    keys = rng.random((n_users, n_items))
    picks = np.argpartition(keys, 205, axis=1)[:, :205]
    profile = [picks[u, : profile_len[u]] for u in range(n_users)]
    predict = [picks[u, 205 - predict_len[u] :] for u in range(n_users)]
    # each profile lists its items oldest first (the tutorial protocol keeps the last 10)
    holdout = Holdout.from_lists(
        np.arange(n_users, dtype=np.int64), profile, predict, n_items, np.arange(n_users, dtype=np.int64) + 1000
    )
    return scores, holdout, profile, predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--items", type=int, default=30000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="ours: best of this many runs")
    ap.add_argument("--loop-repeats", type=int, default=2, help="the loop: best of this many runs")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the numpy loop uses one core too)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    scores, holdout, profile, predict = make_data(args.users, args.items, args.seed)
    device = torch.device(args.device)
    scores_t = torch.from_numpy(scores).to(device)

    score_fn_s = [0.0]

    def score_fn(batch):
        # stands in for a model: rows of the precomputed matrix (a gather, since evaluate groups
        # rows by their number of relevant items); its time is reported apart
        t0 = time.perf_counter()
        out = scores_t.index_select(0, batch.user_idx.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        score_fn_s[0] += time.perf_counter() - t0
        return out

    figures = {}
    for protocol in ("standard", "tutorial"):
        # warm-up (allocator, kernels), then the best of a few runs
        evaluate(score_fn, holdout, args.items, ks=KS, protocol=protocol, batch_size=args.batch_size, device=device)
        ours_s, ours_eval_s = [], []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            score_fn_s[0] = 0.0
            t0 = time.perf_counter()
            result = evaluate(
                score_fn, holdout, args.items, ks=KS, protocol=protocol, batch_size=args.batch_size, device=device
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            ours_s.append(time.perf_counter() - t0)
            ours_eval_s.append(ours_s[-1] - score_fn_s[0])

        loop_times = []
        for _ in range(args.loop_repeats):
            t0 = time.perf_counter()
            shown = profile if protocol == "standard" else [p[-TUTORIAL_PROFILE_LEN:] for p in profile]
            loop_rows = [
                reference_row_metrics(scores[u], shown[u], predict[u], ks=KS, protocol=protocol)
                for u in range(args.users)
            ]
            loop_times.append(time.perf_counter() - t0)
        loop_s = min(loop_times)

        loop = pd.DataFrame(loop_rows)
        ours = result.per_row[loop.columns].to_numpy()
        worst = float(np.abs(ours - loop.to_numpy()).max())
        assert np.allclose(ours, loop.to_numpy(), rtol=0, atol=1e-6), f"{protocol}: max abs difference {worst}"
        print(
            f"{protocol}: ours {min(ours_s):.3f} s incl. score function, {min(ours_eval_s):.3f} s evaluation only "
            f"(runs {', '.join(f'{t:.3f}' for t in ours_s)}); per-user loop {loop_s:.3f} s "
            f"(runs {', '.join(f'{t:.3f}' for t in loop_times)}); max |diff| {worst:.2e}"
        )
        print(result.table_markdown())
        figures[protocol] = {
            "ours_s": min(ours_eval_s),
            "ours_incl_score_fn_s": min(ours_s),
            "loop_s": loop_s,
            "max_abs_diff": worst,
        }

    print(
        json.dumps(
            {
                "bench": "evaluation",
                "users": args.users,
                "items": args.items,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "ours_s": round(figures["standard"]["ours_s"], 4),
                "loop_s": round(figures["standard"]["loop_s"], 4),
                "speedup": round(figures["standard"]["loop_s"] / figures["standard"]["ours_s"], 2),
                "ours_incl_score_fn_s": round(figures["standard"]["ours_incl_score_fn_s"], 4),
                "speedup_incl_score_fn": round(
                    figures["standard"]["loop_s"] / figures["standard"]["ours_incl_score_fn_s"], 2
                ),
                "tutorial_ours_s": round(figures["tutorial"]["ours_s"], 4),
                "tutorial_loop_s": round(figures["tutorial"]["loop_s"], 4),
                "tutorial_speedup": round(figures["tutorial"]["loop_s"] / figures["tutorial"]["ours_s"], 2),
                "max_abs_diff": max(f["max_abs_diff"] for f in figures.values()),
                "identical_metrics": True,
            }
        )
    )


if __name__ == "__main__":
    main()
