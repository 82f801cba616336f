"""``python -m visrec_pipeline.demo --out DIR [--seed N]``: create the demo dataset folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visrec_pipeline.demo.generate import ensure_demo_summary, generate_demo_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m visrec_pipeline.demo", description=__doc__)
    ap.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--items", type=int, default=1500, help="items in the initial catalogue")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--interactions", type=int, default=30000, help="target number of distinct (user, item) pairs")
    ap.add_argument("--batches", type=int, default=1, help="later batches kept aside in later_batches/")
    ap.add_argument("--force", action="store_true", help="regenerate even if a complete dataset is there")
    args = ap.parse_args(argv)
    sizes = dict(
        seed=args.seed, n_items=args.items, n_users=args.users,
        target_interactions=args.interactions, later_batches=args.batches,
    )
    try:
        if args.force:
            summary = generate_demo_dataset(args.out, **sizes)
        else:
            summary = ensure_demo_summary(args.out, **sizes)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
