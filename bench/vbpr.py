"""Our VBPR against Cornac's VBPR, in one run, on the same data, features, split, dimensions and epochs.

    uv sync --group bench
    uv run --group bench python bench/vbpr.py [--users 1000 --items 2000 --dim 2048 --epochs 20]
    uv run --group bench python bench/vbpr.py --dataset-dir data/demo   # a pipeline workspace

Both models train on the same training rows for the same number of epochs, one
triple per training interaction per epoch (no early stopping, so the triple counts
match), with the same latent sizes, batch size, learning rate and L2 weights, and the
same feature matrix. Throughput = training triples / wall-clock seconds of ``fit``
(sampling included: both samplers draw fresh negatives every epoch), and per CPU
second of this process (steadier on a shared machine). Test AUC is the
full-ranking AUC of our evaluator for both (Cornac's parameters are wrapped into a
score function). ``ours_early_stopping`` adds, outside the equal-work comparison, what
the pipeline itself runs: a validation split carved from the training rows and the
best epoch kept. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from visrec_pipeline.recsys.base import FitInputs, ScoreBatch
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.models.vbpr import VBPR, VBPRConfig, scale_to_unit_norm
from visrec_pipeline.recsys.models.features import pooled_features
from visrec_pipeline.recsys.synthetic import planted_dataset


def load_workspace(root: Path) -> tuple[RecData, np.ndarray, np.ndarray]:
    from visrec_pipeline import db
    from visrec_pipeline.embeddings.store import load_pooled
    from visrec_pipeline.model_io import FEATURE_BACKBONE, load_rec_data

    db_path = root / "visrec.duckdb"
    if not db_path.is_file():
        raise SystemExit(f"--dataset-dir {root}: no visrec.duckdb there (expected a pipeline workspace)")
    with db.connect(db_path, read_only=True) as conn:
        data = load_rec_data(conn)
    feats, mask = load_pooled(db_path, root / "features", FEATURE_BACKBONE, data.items.ids)
    return data, feats, mask


def our_config(args) -> VBPRConfig:
    """Cornac's settings: raw features (``args.feature_scale`` was applied when loading), no L2 on E."""
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "device": args.device}
    return VBPRConfig(
        train=train, dim_gamma=args.k, dim_theta=args.k2, reg=args.reg, reg_visual=0.0, feature_scale="none"
    )


def fit_ours(data: RecData, feats: np.ndarray, mask: np.ndarray, args) -> tuple[VBPR, float]:
    model = VBPR(our_config(args))
    started, cpu = time.perf_counter(), time.process_time()
    history = model.fit(data, FitInputs(features=feats, feature_mask=mask))  # no validation: all epochs run
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    logging.info("ours: %d epochs, final loss %.4f, %.1fs (%.1f CPU s)", len(history.loss), history.loss[-1], seconds, cpu_seconds)
    return model, seconds, cpu_seconds


def fit_ours_early_stopping(data: RecData, feats: np.ndarray, mask: np.ndarray, args) -> VBPR:
    """What the pipeline runs: the last training row of each user carved out as validation, the
    epoch with the best validation AUC kept (at most ``--epochs``)."""
    fit, validation = data.validation_split()
    model = VBPR(our_config(args))
    history = model.fit(fit, FitInputs(features=feats, feature_mask=mask, validation=validation))
    logging.info("ours with early stopping: best epoch %s of %d", history.best_epoch, len(history.loss))
    return model


def fit_cornac(data: RecData, feats: np.ndarray, args):
    import cornac
    from cornac.data import Dataset, ImageModality

    users = data.train.row_ids()
    items = data.train.indices
    # identity id maps: Cornac's indices are exactly ours (items with no training row included)
    uid_map = OrderedDict((int(u), int(u)) for u in range(data.n_users))
    iid_map = OrderedDict((int(i), int(i)) for i in range(data.n_items))
    triples = list(zip(users.tolist(), items.tolist(), [1.0] * items.size, strict=True))
    train_set = Dataset.build(triples, fmt="UIR", global_uid_map=uid_map, global_iid_map=iid_map, seed=args.seed)
    image = ImageModality(features=feats, ids=list(range(data.n_items)), normalized=False)
    image.build(id_map=train_set.iid_map)
    train_set.add_modalities(item_image=image)
    # Cornac's loss is a sum with lambda/2 * ||.||^2 terms; ours a mean with reg * ||.||^2: lambda = 2 * reg
    model = cornac.models.VBPR(
        k=args.k, k2=args.k2, n_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        lambda_w=2 * args.reg, lambda_b=2 * args.reg, lambda_e=0.0, use_gpu=args.device != "cpu",
        verbose=False, seed=args.seed,
    )
    started, cpu = time.perf_counter(), time.process_time()
    model.fit(train_set)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    logging.info("cornac %s: %d epochs, %.1fs (%.1f CPU s)", cornac.__version__, args.epochs, seconds, cpu_seconds)

    item_mat = torch.as_tensor(
        np.concatenate([model.gamma_item, model.theta_item, (model.beta_item + model.visual_bias)[:, None]], 1),
        dtype=torch.float32,
    )
    user_mat = torch.as_tensor(np.concatenate([model.gamma_user, model.theta_user], 1), dtype=torch.float32)

    def score(batch: ScoreBatch) -> torch.Tensor:
        u = batch.user_idx.long()
        known = (u >= 0).unsqueeze(1)
        vec = torch.cat([user_mat[u.clamp(min=0)] * known, torch.ones(len(u), 1)], 1)
        return vec @ item_mat.T

    return score, seconds, cpu_seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", type=Path, help="a pipeline workspace (visrec.duckdb + features/)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--per-user", type=int, nargs=2, default=(10, 60), metavar=("MIN", "MAX"),
                   help="synthetic interactions per user (before the holdout)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--reg", type=float, default=1e-4)
    p.add_argument("--k", type=int, default=200, help="latent (gamma) factors")
    p.add_argument("--k2", type=int, default=100, help="visual (theta) factors")
    p.add_argument("--feature-scale", default="l2", choices=["none", "l2", "standard"],
                   help="how the ONE feature matrix given to both models is scaled")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both (0 = torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (synthetic data drawn with it, both models seeded with it); "
                   "AUC is averaged and throughput pooled over the runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the first torch optimiser imports torch._dynamo (seconds); pay it before either timer starts
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

    runs = [run_once(args, seed) for seed in args.seeds]
    first = runs[0]
    result = {k: first[k] for k in ("dataset", "users", "items", "train_rows")}
    result.update(
        {
            "epochs": args.epochs, "batch_size": args.batch_size, "k": args.k, "k2": args.k2,
            "feature_dim": first["feature_dim"], "feature_scale": args.feature_scale,
            "threads": torch.get_num_threads(), "seeds": args.seeds,
        }
    )
    triples = sum(r["triples"] for r in runs)
    for name in ("ours", "cornac"):
        result[name] = {
            "triples_per_s": round(triples / sum(r[name]["fit_s"] for r in runs), 1),
            "triples_per_cpu_s": round(triples / sum(r[name]["cpu_s"] for r in runs), 1),
            "auc": round(float(np.mean([r[name]["auc"] for r in runs])), 5),
            "recall@100": round(float(np.mean([r[name]["recall@100"] for r in runs])), 5),
            "auc_per_seed": [round(r[name]["auc"], 5) for r in runs],
        }
    # not part of the equal-work comparison: the pipeline's own setting (validation split + early stopping)
    result["ours_early_stopping"] = {
        "auc": round(float(np.mean([r["ours_early_stopping"]["auc"] for r in runs])), 5),
        "recall@100": round(float(np.mean([r["ours_early_stopping"]["recall@100"] for r in runs])), 5),
    }
    result["throughput_ratio"] = round(result["ours"]["triples_per_s"] / result["cornac"]["triples_per_s"], 2)
    # the machine may be shared: CPU seconds of this process are the steadier measure of work done
    result["cpu_throughput_ratio"] = round(
        result["ours"]["triples_per_cpu_s"] / result["cornac"]["triples_per_cpu_s"], 2
    )
    print(json.dumps(result))
    return result


def run_once(args, seed: int) -> dict:
    args.seed = seed
    if args.dataset_dir:
        data, raw, mask = load_workspace(args.dataset_dir)
        source = str(args.dataset_dir)
    else:
        syn = planted_dataset(
            args.users, args.items, n_clusters=20, dim=args.dim, per_user=tuple(args.per_user), seed=seed
        )
        data, raw, mask = syn.data, syn.features, np.ones(args.items, bool)
        source = f"synthetic {args.users}x{args.items}, {args.dim}-d planted clusters"
    f, m = pooled_features(FitInputs(features=raw, feature_mask=mask), data.n_items, model="bench")
    feats = scale_to_unit_norm(f, m, args.feature_scale).numpy()
    logging.info("seed %d, %s: %d users, %d items, %d training rows, %d holdout rows, %d threads", seed,
                 source, data.n_users, data.n_items, data.train.nnz, len(data.holdout), torch.get_num_threads())

    ours, ours_s, ours_cpu = fit_ours(data, feats, m.numpy(), args)
    ours_eval = evaluate(ours.score, data.holdout, data.n_items, ks=(20, 100)).means
    try:
        cornac_score, cornac_s, cornac_cpu = fit_cornac(data, feats, args)
    except ImportError as exc:
        raise SystemExit(f"cornac is not importable ({exc}); run `uv sync --group bench` first") from exc
    cornac_eval = evaluate(cornac_score, data.holdout, data.n_items, ks=(20, 100)).means
    early = fit_ours_early_stopping(data, feats, m.numpy(), args)
    early_eval = evaluate(early.score, data.holdout, data.n_items, ks=(20, 100)).means
    run = {
        "dataset": source, "users": data.n_users, "items": data.n_items, "train_rows": data.train.nnz,
        "feature_dim": int(feats.shape[1]), "triples": args.epochs * data.train.nnz,
        "ours": {"fit_s": ours_s, "cpu_s": ours_cpu, "auc": ours_eval["auc"], "recall@100": ours_eval["recall@100"]},
        "cornac": {"fit_s": cornac_s, "cpu_s": cornac_cpu, "auc": cornac_eval["auc"],
                   "recall@100": cornac_eval["recall@100"]},
        "ours_early_stopping": {"auc": early_eval["auc"], "recall@100": early_eval["recall@100"]},
    }
    logging.info("seed %d: ours AUC %.5f in %.1fs, cornac AUC %.5f in %.1fs",
                 seed, ours_eval["auc"], ours_s, cornac_eval["auc"], cornac_s)
    return run


if __name__ == "__main__":
    main()
