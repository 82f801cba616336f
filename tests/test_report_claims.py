"""The report checks the papers' claims against its own table."""

import pandas as pd

from visrec_pipeline.reporting.benchmark import benchmark_table
from visrec_pipeline.reporting.claims import claims_markdown


def _summary(aucs: dict[str, list[float]]) -> pd.DataFrame:
    rows = [
        {"model": m, "metric": "auc", "value": v, "seed": s, "train_seconds": 1.0}
        for m, values in aucs.items()
        for s, v in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_a_claim_that_fails_on_this_data_says_so_and_points_to_the_evidence():
    md = claims_markdown(benchmark_table(_summary({"curatornet": [0.76], "curatornet_random": [0.79]})))
    assert "does not hold here" in md
    assert "`curatornet` AUC 0.7600 vs `curatornet_random` 0.7900" in md
    assert "docs/curatornet_guided.md" in md
    assert "one seed" in md


def test_a_claim_that_holds_says_so_and_claims_without_both_models_are_left_out():
    md = claims_markdown(benchmark_table(_summary({"vbpr": [0.90], "bpr_mf": [0.89]})))
    assert "VBPR paper" in md and "holds here" in md and "does not hold" not in md
    assert "CuratorNet" not in md and "ACF" not in md
    assert claims_markdown(benchmark_table(_summary({"ease": [0.9], "random": [0.5]}))) == ""


def test_differences_within_the_seeds_spread_are_called_noise():
    noisy = _summary({"curatornet": [0.70, 0.80, 0.75], "curatornet_random": [0.74, 0.78, 0.76]})
    md = claims_markdown(benchmark_table(noisy))
    assert "within noise here" in md and "over 3 seeds" in md
    clear = _summary({"curatornet": [0.800, 0.801, 0.802], "curatornet_random": [0.700, 0.701, 0.702]})
    assert "holds here" in claims_markdown(benchmark_table(clear))
