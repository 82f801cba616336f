"""Matplotlib figures rendered to PNG bytes (headless, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: the pipeline runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves_png(loss: list[float], val_auc: list[float], *, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3))
    epochs = np.arange(1, len(loss) + 1)
    ax.plot(epochs, loss, marker="o", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    if val_auc:
        ax2 = ax.twinx()
        ax2.plot(np.arange(1, len(val_auc) + 1), val_auc, marker="s", color="tab:orange", label="validation AUC")
        ax2.set_ylabel("validation AUC", color="tab:orange")
    ax.set_title(title)
    return _png(fig)


PROFILE_BUCKETS = [0, 5, 10, 20, 50, 100, 10**9]
BUCKET_LABELS = ["1-5", "6-10", "11-20", "21-50", "51-100", ">100"]


def profile_bucket(profile_size: pd.Series) -> pd.Series:
    return pd.cut(profile_size, PROFILE_BUCKETS, labels=BUCKET_LABELS, right=True)


def metric_by_profile_size_png(rows: pd.DataFrame, metric: str) -> bytes:
    """Violin plots of ``metric`` per model, split by the user's profile-size bucket.

    ``rows``: columns model, profile_size, value (one row per holdout row).
    """
    rows = rows.assign(bucket=profile_bucket(rows["profile_size"]))
    models = list(dict.fromkeys(rows["model"]))
    buckets = [b for b in BUCKET_LABELS if (rows["bucket"] == b).any()]
    fig, axes = plt.subplots(1, len(buckets), figsize=(3.2 * max(len(buckets), 1), 3.6), sharey=True, squeeze=False)
    for ax, bucket in zip(axes[0], buckets):
        data, labels = [], []
        for m in models:
            v = rows.loc[(rows["model"] == m) & (rows["bucket"] == bucket), "value"].to_numpy()
            if v.size:
                data.append(v)
                labels.append(m)
        if data:
            parts = ax.violinplot(data, showmeans=True, showextrema=False)
            for body in parts["bodies"]:
                body.set_alpha(0.5)
        ax.set_xticks(np.arange(1, len(labels) + 1))
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
        n = int((rows["bucket"] == bucket).sum() / max(len(models), 1))
        ax.set_title(f"profile {bucket} (n={n})", fontsize=9)
    axes[0][0].set_ylabel(metric)
    fig.suptitle(f"{metric} by profile size")
    return _png(fig)
