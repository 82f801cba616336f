"""Shared by the one-variant-one-seed benchmarks (bench/acf_variants.py, bench/curatornet_guided_variants.py):
arguments, the built workspace's split and inputs, and the JSON result line."""

from __future__ import annotations

import argparse
import json
import resource


def parse_variant(doc: str, variants: dict, epochs: int, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("variant", choices=sorted(variants))
    parser.add_argument("seed", type=int)
    parser.add_argument("--epochs", type=int, default=epochs)
    return parser.parse_args(argv)


def load_split(needs: frozenset[str]):
    """``(data, fit, inputs)`` of the workspace in the environment: the training split minus the
    validation rows, with the inputs ``needs`` asks for; one torch thread."""
    import torch

    torch.set_num_threads(1)
    from visrec_pipeline import db
    from visrec_pipeline.model_io import build_inputs, load_rec_data
    from visrec_pipeline.paths import Workspace

    ws = Workspace.from_env()
    with db.connect(ws.db_path, read_only=True) as conn:
        data = load_rec_data(conn)
    fit, validation = data.validation_split()
    inputs = build_inputs(ws, needs, fit)
    inputs.validation = validation
    return data, fit, inputs


def print_result(args: argparse.Namespace, auc: float, history, wall_s: float, **extra) -> None:
    print(json.dumps({
        "variant": args.variant,
        "seed": args.seed,
        "auc": round(float(auc), 5),
        "best_epoch": history.best_epoch,
        "val_auc": [round(v, 4) for v in history.val_auc],
        **extra,
        "wall_s": round(wall_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))
