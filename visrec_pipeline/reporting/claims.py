"""What the tutorial's papers claim, checked against this workspace's benchmark table.

A paper's claim that one model beats another (its ablation or its baseline) is a fact about the
paper's data; the report states whether it holds here, from the table's own numbers, so a user
reads a failed claim next to the figures instead of discovering it later (no dagster).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from visrec_pipeline.reporting.benchmark import SEEDS_COLUMN, STD_SUFFIX, within_noise

CLAIM_METRIC = "AUC"


@dataclass(frozen=True)
class Claim:
    model: str
    over: str  # the model the paper reports it beats
    source: str  # who claims it
    evidence: str  # where this project documents its own measurements of the claim ("" if none)


CLAIMS = (
    Claim("curatornet", "curatornet_random", "CuratorNet paper: guideline triples beat random triples",
          "docs/curatornet_guided.md"),
    Claim("vbpr", "bpr_mf", "VBPR paper: visual features improve BPR-MF", ""),
    Claim("acf", "bpr_mf", "ACF paper: attentive collaborative filtering improves BPR-MF", ""),
)


def _stats(table: pd.DataFrame, model: str) -> tuple[float, float, int]:
    mean = float(table.at[model, CLAIM_METRIC])
    std_col = CLAIM_METRIC + STD_SUFFIX
    std = float(table.at[model, std_col]) if std_col in table and pd.notna(table.at[model, std_col]) else 0.0
    n = int(table.at[model, SEEDS_COLUMN]) if SEEDS_COLUMN in table else 1
    return mean, std, n


def claims_markdown(table: pd.DataFrame) -> str:
    """One bullet per claim whose two models are both in ``table`` (a benchmark table): holds, does
    not hold, or is within noise over the seeds; "" when no claim can be checked."""
    if CLAIM_METRIC not in table:
        return ""
    lines = []
    for claim in CLAIMS:
        if claim.model not in table.index or claim.over not in table.index:
            continue
        a, sa, na = _stats(table, claim.model)
        b, sb, nb = _stats(table, claim.over)
        noise = within_noise(a, sa, na, b, sb, nb)
        if noise:
            verdict = "within noise here"
        elif a > b:
            verdict = "holds here"
        else:
            verdict = "**does not hold here**"
        seeds = f" over {min(na, nb)} seeds" if min(na, nb) > 1 else " (one seed: spread unknown)"
        line = (
            f"- {claim.source}: {verdict}: `{claim.model}` {CLAIM_METRIC} {a:.4f} vs "
            f"`{claim.over}` {b:.4f}{seeds}."
        )
        if claim.evidence and not a > b:
            line += f" Measurements and causes: `{claim.evidence}`."
        lines.append(line)
    if not lines:
        return ""
    return "## The papers' claims on this data\n\n" + "\n".join(lines) + "\n"
