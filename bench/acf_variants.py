"""ACF batch-layout variants on a built workspace (issue 13): test AUC under the standard protocol.

One variant and seed per call; 8 epochs (the demo's cap), one torch thread, no checkpoint written.
The workspace needs the assets upstream of the models (`make demo` builds them). The last line
printed is a JSON object.

    VISREC_DATA_DIR=<data> VISREC_DATASET=demo uv run --frozen --no-sync python bench/acf_variants.py rows2 0
"""

from __future__ import annotations

import time

from variant_runs import load_split, parse_variant, print_result

VARIANTS: dict[str, dict] = {
    "default": {},  # chunks of 4, grown to bound the attended profile slots per triple at 2
    "chunk4_fixed": {"user_chunk": 4, "profile_rows_per_triple": 0},  # chunks of 4 for every user
    "rows3": {"profile_rows_per_triple": 3},
    "rows2": {"profile_rows_per_triple": 2},
    "rows1": {"profile_rows_per_triple": 1},
    "shuffle": {"user_chunk": 1},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_variant(__doc__, VARIANTS, epochs=8, argv=argv)
    from visrec_pipeline.recsys.evaluate import evaluate
    from visrec_pipeline.recsys.registry import build_model, get_spec

    data, fit, inputs = load_split(get_spec("acf").needs)
    model = build_model("acf", {"train": {"epochs": args.epochs, "seed": args.seed}, **VARIANTS[args.variant]})
    start = time.perf_counter()
    history = model.fit(fit, inputs)
    fit_s = time.perf_counter() - start
    auc = evaluate(model.score, data.holdout, len(data.items)).means["auc"]
    sampler = {k: v for k, v in history.notes.get("sampler", {}).items() if "chunk" in k or "rows" in k}
    print_result(args, auc, history, fit_s, sampler=sampler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
