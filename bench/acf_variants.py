"""ACF batch-layout variants on a built workspace (issue 13): test AUC under the standard protocol.

One variant and seed per call; 8 epochs (the demo's cap), one torch thread, no checkpoint written.
The workspace needs the assets upstream of the models (`make demo` builds them). The last line
printed is a JSON object.

    VISREC_DATA_DIR=<data> VISREC_DATASET=demo uv run --frozen --no-sync python bench/acf_variants.py rows2 0
"""

from __future__ import annotations

import argparse
import json
import resource
import time

VARIANTS: dict[str, dict] = {
    "default": {},  # chunks of 4, grown to bound the attended profile slots per triple at 2
    "chunk4_fixed": {"user_chunk": 4, "profile_rows_per_triple": 0},  # chunks of 4 for every user
    "rows3": {"profile_rows_per_triple": 3},
    "rows2": {"profile_rows_per_triple": 2},
    "rows1": {"profile_rows_per_triple": 1},
    "shuffle": {"user_chunk": 1},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("seed", type=int)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from visrec_pipeline import db
    from visrec_pipeline.model_io import build_inputs, load_rec_data
    from visrec_pipeline.paths import Workspace
    from visrec_pipeline.recsys.evaluate import evaluate
    from visrec_pipeline.recsys.registry import build_model, get_spec

    ws = Workspace.from_env()
    with db.connect(ws.db_path, read_only=True) as conn:
        data = load_rec_data(conn)
    fit, validation = data.validation_split()
    inputs = build_inputs(ws, get_spec("acf").needs, fit)
    inputs.validation = validation
    model = build_model("acf", {"train": {"epochs": args.epochs, "seed": args.seed}, **VARIANTS[args.variant]})
    start = time.perf_counter()
    history = model.fit(fit, inputs)
    fit_s = time.perf_counter() - start
    auc = evaluate(model.score, data.holdout, len(data.items)).means["auc"]
    print(json.dumps({
        "variant": args.variant,
        "seed": args.seed,
        "auc": round(float(auc), 5),
        "best_epoch": history.best_epoch,
        "val_auc": [round(v, 4) for v in history.val_auc],
        "fit_s": round(fit_s, 1),
        "sampler": {k: v for k, v in history.notes.get("sampler", {}).items() if "chunk" in k or "rows" in k},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
