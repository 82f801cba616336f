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


def benchmark_table(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary``: model, metric, value (+ train_seconds). Rows: models; columns: AUC, RR, R@k, P@k, nDCG@k."""
    summary = summary.assign(column=summary["metric"].map(display_name)).dropna(subset=["column"])
    table = summary.pivot_table(index="model", columns="column", values="value", aggfunc="first")
    table = table[sorted(table.columns, key=_order)]
    if "train_seconds" in summary:
        secs = summary.groupby("model")["train_seconds"].first()
        table["train s"] = secs.reindex(table.index)
    return table.sort_values("AUC", ascending=False) if "AUC" in table else table


def table_markdown(table: pd.DataFrame) -> str:
    out = table.copy()
    fmt = {c: (lambda v: f"{v:.1f}") if c == "train s" else (lambda v: f"{v:.5f}".replace("0.", ".", 1)) for c in out}
    for c, f in fmt.items():
        out[c] = out[c].map(lambda v, f=f: "" if pd.isna(v) else f(v))
    return out.reset_index().rename(columns={"model": "model"}).to_markdown(index=False)
