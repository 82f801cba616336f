"""Tuned against untuned: each model's validation AUC (from its latest tuning run) and test metrics.

Runs on the workspace of ``VISREC_DATASET``/``VISREC_DATA_DIR`` after ``make demo`` (upstream assets)
and the tuning (``python -m visrec_pipeline.cli tune``, or ``--tune`` here: the library, one model
after another, timed per model). For every model it trains the default config and the tuned one
(``use_tuned``), seed 0, with the demo's epoch caps on a CPU, and evaluates both on the test holdout
(standard protocol). It overwrites the workspace's checkpoints and evaluation rows of those models.

    uv run python bench/tuning.py [--models bpr_mf,ease,...] [--tune] [--n-trials 8] [--refit]

Prints a markdown table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from visrec_pipeline import db
from visrec_pipeline.cli import DEMO_EPOCHS
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import evaluate_model, train_model
from visrec_pipeline.pipeline.tuning import TuningBudget, tune_model
from visrec_pipeline.pipeline.tuning_store import best_tuned
from visrec_pipeline.recsys.search_spaces import EXPENSIVE_TO_TUNE, SEARCH_SPACES

METRICS = ("auc", "ndcg@20", "recall@20")


def _epoch_config(name: str, on_gpu: bool) -> dict:
    n = DEMO_EPOCHS.get(name)
    return {"train": {"epochs": n, "seed": 0}} if n and not on_gpu else {}


def _default_value(ws: Workspace, name: str, run_id: str) -> float | None:
    with db.connect(ws.db_path, read_only=True) as conn:
        row = conn.execute(
            "SELECT avg(value), bool_and(state = 'COMPLETE') FROM tuning_trials WHERE model = ? AND run_id = ? AND trial = 0",
            [name, run_id],
        ).fetchone()
    return float(row[0]) if row and row[1] else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(n for n in SEARCH_SPACES if n not in EXPENSIVE_TO_TUNE))
    parser.add_argument("--tune", action="store_true", help="tune each model here first (library, timed)")
    parser.add_argument("--n-trials", type=int, default=TuningBudget().n_trials)
    parser.add_argument("--refit", action="store_true", help="also train the tuned config with refit")
    args = parser.parse_args()
    ws = Workspace.from_env()
    on_gpu = torch.cuda.is_available()
    rows = []
    for name in args.models.split(","):
        tune_seconds = None
        if args.tune:
            started = time.perf_counter()
            cap = 0 if on_gpu else DEMO_EPOCHS.get(name, 0)
            tune_model(ws, name, TuningBudget(n_trials=args.n_trials, max_epochs=cap))
            tune_seconds = round(time.perf_counter() - started, 1)
        with db.connect(ws.db_path, read_only=True) as conn:
            tuned = best_tuned(conn, name)
            wall = conn.execute(
                "SELECT wall_seconds FROM tuning_runs WHERE model = ? AND run_id = ?", [name, tuned.run_id]
            ).fetchone()[0]
        row = {
            "model": name,
            "tuning_s": tune_seconds if tune_seconds is not None else round(wall, 1),
            "val_default": _default_value(ws, name, tuned.run_id),
            "val_tuned": tuned.value,
            "best_params": tuned.params,
        }
        variants = [("default", {}), ("tuned", {"use_tuned": True})]
        if args.refit:
            variants.append(("tuned_refit", {"use_tuned": True, "refit": True}))
        for label, options in variants:
            train_model(ws, name, _epoch_config(name, on_gpu), **options)
            means = evaluate_model(ws, name).result.means
            for metric in METRICS:
                row[f"test_{metric}_{label}"] = float(means[metric])
        rows.append(row)
        print(json.dumps(row), flush=True)
    labels = ["default", "tuned"] + (["tuned_refit"] if args.refit else [])
    header = ["model", "tuning s", "val AUC default", "val AUC tuned"] + [
        f"test {m} {label}" for m in ("auc", "ndcg@20") for label in labels
    ]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [r["model"], f"{r['tuning_s']}", f"{r['val_default'] or float('nan'):.4f}", f"{r['val_tuned']:.4f}"]
        cells += [f"{r[f'test_{m}_{label}']:.4f}" for m in ("auc", "ndcg@20") for label in labels]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
