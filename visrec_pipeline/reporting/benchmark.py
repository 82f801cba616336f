"""The benchmark table: every evaluated model side by side, in the tutorial's layout."""

from __future__ import annotations

import re

import pandas as pd

_DISPLAY = {"auc": "AUC", "rr": "RR"}
_PREFIX = {"recall": "R", "r": "R", "precision": "P", "p": "P", "ndcg": "nDCG"}


def display_name(metric: str) -> str | None:
    """``recall@20`` -> ``R@20`` etc.; None for keys that are not headline metrics."""
    if metric in _DISPLAY:
        return _DISPLAY[metric]
    m = re.fullmatch(r"([a-z]+)@(\d+)", metric)
    if m and m.group(1) in _PREFIX:
        return f"{_PREFIX[m.group(1)]}@{m.group(2)}"
    return None


def _order(col: str) -> tuple:
    if col in ("AUC", "RR"):
        return (0, 0, ["AUC", "RR"].index(col))
    kind, k = col.split("@")
    return (1, int(k), ["R", "P", "nDCG"].index(kind))


# two models' mean metrics differ "within noise" when the difference is at most this many standard
# errors of the difference (sqrt(s_a^2/n_a + s_b^2/n_b), s: standard deviation over seeds)
NOISE_Z = 2.0
SEEDS_COLUMN = "seeds"
STD_SUFFIX = " std"
NEXT_COLUMN = "AUC vs next"
WITHIN_NOISE = "≈ within noise"


def within_noise(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int, z: float = NOISE_Z) -> bool | None:
    """Whether two means over seeds differ by at most ``z`` standard errors of their difference;
    None when either has fewer than 2 seeds (no spread to judge by)."""
    if n_a < 2 or n_b < 2:
        return None
    se = (std_a**2 / n_a + std_b**2 / n_b) ** 0.5
    return bool(abs(mean_a - mean_b) <= z * se)


def benchmark_table(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary``: model, metric, value (+ seed, train_seconds). Rows: models; columns: AUC, RR, R@k,
    P@k, nDCG@k (the mean over the model's seeds) and ``train s``, sorted by AUC. When a model has
    several seeds: also ``seeds`` (n), ``<metric> std`` (sample standard deviation over seeds) and
    ``AUC vs next``, which marks a model whose AUC is within noise of the next row's (:func:`within_noise`)."""
    summary = summary.assign(column=summary["metric"].map(display_name)).dropna(subset=["column"])
    if "seed" not in summary:
        summary = summary.assign(seed=0)
    stats = summary.groupby(["model", "column"])["value"].agg(["mean", "std", "count"])
    table = stats["mean"].unstack("column")
    table = table[sorted(table.columns, key=_order)]
    if "train_seconds" in summary:
        secs = summary.groupby(["model", "seed"])["train_seconds"].first().groupby("model").mean()
        table["train s"] = secs.reindex(table.index)
    if "AUC" in table:
        table = table.sort_values("AUC", ascending=False)
    n_seeds = summary.groupby("model")["seed"].nunique().reindex(table.index)
    if n_seeds.max() > 1:
        std = stats["std"].unstack("column").reindex(table.index)
        metric_cols = [c for c in table.columns if c != "train s"]
        for c in metric_cols:
            table[c + STD_SUFFIX] = std[c]
        table[SEEDS_COLUMN] = n_seeds
        table[NEXT_COLUMN] = _next_marks(table)
    return table


def _next_marks(table: pd.DataFrame) -> list[str]:
    if "AUC" not in table:
        return [""] * len(table)
    marks = []
    rows = list(table.itertuples(index=False))
    cols = {c: i for i, c in enumerate(table.columns)}
    for a, b in zip(rows, rows[1:] + [None]):
        if b is None:
            marks.append("")
            continue
        same = within_noise(
            a[cols["AUC"]], a[cols["AUC" + STD_SUFFIX]], int(a[cols[SEEDS_COLUMN]]),
            b[cols["AUC"]], b[cols["AUC" + STD_SUFFIX]], int(b[cols[SEEDS_COLUMN]]),
        )
        marks.append("" if same is None else WITHIN_NOISE if same else "distinct")
    return marks


def _metric(v: float) -> str:
    return f"{v:.5f}".replace("0.", ".", 1)


def table_markdown(table: pd.DataFrame) -> str:
    """The table as markdown; with seeds, each metric as ``mean ± std`` and the noise marks."""
    seeded = SEEDS_COLUMN in table
    out = pd.DataFrame(index=table.index)
    for c in table.columns:
        if c.endswith(STD_SUFFIX) or c in (SEEDS_COLUMN, NEXT_COLUMN):
            continue
        if c == "train s":
            out[c] = table[c].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
        elif seeded:
            out[c] = [
                "" if pd.isna(m) else _metric(m) + ("" if pd.isna(s) else f" ± {_metric(s)}")
                for m, s in zip(table[c], table[c + STD_SUFFIX])
            ]
        else:
            out[c] = table[c].map(lambda v: "" if pd.isna(v) else _metric(v))
    if seeded:
        out["n"] = table[SEEDS_COLUMN].astype(int)
        out[NEXT_COLUMN] = table[NEXT_COLUMN]
    return out.reset_index().to_markdown(index=False)


def noise_note(table: pd.DataFrame) -> str:
    """The sentence under a table with seeds saying what ± and the marks mean ("" without seeds)."""
    if SEEDS_COLUMN not in table:
        return ""
    return (
        "Each metric: mean ± sample standard deviation over the model's `n` seeds (seed k trains with the "
        f"config's seed + k). `{NEXT_COLUMN}`: {WITHIN_NOISE} when the model's mean AUC differs from the next "
        f"row's by at most {NOISE_Z:g} standard errors of the difference, √(s₁²/n₁ + s₂²/n₂), so their order "
        "may be seed noise; distinct otherwise; empty when either model has a single seed."
    )
