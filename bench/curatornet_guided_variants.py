"""CuratorNet guided-triple variants against the random-triples ablation on a built workspace (issue 15).

One variant and seed per call; test AUC under the standard protocol, 6 epochs (the demo's cap), one
torch thread, no checkpoint written. The workspace needs the assets upstream of the triples (see
docs/curatornet_guided.md). The last line printed is a JSON object.

    VISREC_DATA_DIR=<data> VISREC_DATASET=demo uv run --frozen --no-sync \\
        python bench/curatornet_guided_variants.py shuffled_resample 0
"""

from __future__ import annotations

import time

from variant_runs import load_split, parse_variant, print_result

VARIANTS: dict[str, dict] = {
    "fixed": {},  # the default: one guided set, batches grouped by profile
    "resample": {"resample_guided": True},
    "shuffled": {"guided_batches_by_profile": False},
    "shuffled_resample": {"guided_batches_by_profile": False, "resample_guided": True},
    "no_g4": {"guided": {"profile_items_per_user": 0}},
    "twice_the_positives": {
        "guided": {
            "holdouts_per_user": 10,
            "prefixes_per_user": 10,
            "similar_per_user": 20,
            "profile_items_per_user": 20,
            "single_profiles_per_user": 6,
        }
    },
    "random": {"sampler": "random"},  # the default: chunks of random_user_chunk (4) triples of one user
    "random_chunk8": {"sampler": "random", "random_user_chunk": 8},
    "random_shuffle": {"sampler": "random", "random_user_chunk": 1},  # every triple alone
    "random_chunk2": {"sampler": "random", "random_user_chunk": 2},
    "random_chunk4": {"sampler": "random", "random_user_chunk": 4},
    "random_chunk16": {"sampler": "random", "random_user_chunk": 16},
    # chunks of 4 for everyone, heavy users included (before random_profile_rows_per_triple)
    "random_chunk4_fixed": {"sampler": "random", "random_user_chunk": 4, "random_profile_rows_per_triple": 0},
    "random_rows8": {"sampler": "random", "random_profile_rows_per_triple": 8},
    "random_rows32": {"sampler": "random", "random_profile_rows_per_triple": 32},
    "random_by_user": {"sampler": "random", "random_batches_by_user": True},  # batches of whole users
}


def main(argv=None) -> int:
    args = parse_variant(__doc__, VARIANTS, epochs=6, argv=argv)
    from visrec_pipeline.model_io import FEATURE_BACKBONE
    from visrec_pipeline.recsys.evaluate import evaluate
    from visrec_pipeline.recsys.guided_sampler import GuidedSamplerConfig
    from visrec_pipeline.recsys.models.curatornet import CuratorNet, CuratorNetConfig

    data, fit, inputs = load_split(frozenset({f"features:{FEATURE_BACKBONE}"}))
    kw = dict(VARIANTS[args.variant])
    sampler = GuidedSamplerConfig(seed=args.seed, **kw.pop("guided", {}))
    config = CuratorNetConfig(train={"epochs": args.epochs, "seed": args.seed}, guided=sampler, **kw)
    start = time.perf_counter()
    model = CuratorNet(config)
    history = model.fit(fit, inputs)
    auc = evaluate(model.score, data.holdout, len(data.items)).means["auc"]
    print_result(args, auc, history, time.perf_counter() - start, loss=[round(v, 3) for v in history.loss])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
