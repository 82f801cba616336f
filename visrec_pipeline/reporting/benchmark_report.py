"""The benchmark report of a workspace: every evaluated model side by side (the tutorial's table),
metric-by-profile-size plots, recommendation grids and the ACF attention panel, written under
``reports/`` (no dagster)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import duckdb
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.embeddings.store import index_weights_tags
from visrec_pipeline.paths import Workspace
from visrec_pipeline.pipeline import DEFAULT_PROTOCOL, results_store
from visrec_pipeline.reporting.acf_panel import acf_attention_panel
from visrec_pipeline.recsys.registry import MODEL_SPECS
from visrec_pipeline.reporting.benchmark import benchmark_table, noise_note, table_markdown
from visrec_pipeline.reporting.claims import claims_markdown
from visrec_pipeline.reporting.grids import png_markdown
from visrec_pipeline.reporting.plots import metric_by_profile_size_png
from visrec_pipeline.reporting.recommendation_grids import recommendation_grids_markdown

REPORT_FILE = "benchmark.md"
TABLE_FILE = "benchmark.csv"
ACF_ATTENTION_FILE = "acf_attention.png"
DEFAULT_PLOT_METRICS = ("auc", "ndcg@20", "recall@100")
DEFAULT_GRID_USERS = 3
DEFAULT_ATTENTION_USERS = 3


@dataclass(frozen=True)
class BenchmarkReport:
    markdown: str  # what reports/benchmark.md holds
    path: Path  # reports/benchmark.md
    table: pd.DataFrame  # one row per model (also reports/benchmark.csv)
    plots_markdown: list[str]  # one embedded PNG per plotted metric that has rows
    grids_markdown: str  # embedded recommendation grids ("" when there is nothing to show)
    attention_markdown: str  # the ACF panel's note and embedded PNG ("" when not asked for)


def weights_warning(conn: duckdb.DuckDBPyConnection) -> str | None:
    """A warning when any stored features come from non-ImageNet (random) weights, else None."""
    random_tags = [t for t in index_weights_tags(conn) if t and not str(t).startswith("imagenet")]
    if random_tags:
        return (
            "**Warning:** visual features were extracted WITHOUT ImageNet weights "
            f"({', '.join(sorted(map(str, random_tags)))}); models using them are not comparable with published figures."
        )
    return None


def write_benchmark_report(
    ws: Workspace,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    plot_metrics: Sequence[str] = DEFAULT_PLOT_METRICS,
    grid_users: int = DEFAULT_GRID_USERS,
    grid_model: str = "",
    attention_users: int = DEFAULT_ATTENTION_USERS,
    failed_models: Mapping[str, str] | None = None,
) -> BenchmarkReport:
    """Build the report from ``evaluation_summary``/``evaluation_rows``/``recommendations`` under
    ``protocol`` and write ``benchmark.md``, ``benchmark.csv`` and the PNGs to ``reports/``.
    ``grid_model`` empty: the model with the best nDCG@20; ``attention_users`` 0: no ACF panel.
    ``failed_models`` (model -> why its step failed): left out (an older evaluation of theirs is not
    this run's) and named in a section of their own, with the models the last recommendations run
    could not recommend with (``recommendation_failures``). A model evaluated under several seeds
    shows mean ± std (:func:`~visrec_pipeline.reporting.benchmark.benchmark_table`)."""
    ws = ws.ensure()
    plot_metrics = list(plot_metrics)
    failed = dict(failed_models or {})
    with db.connect(ws.db_path) as conn:
        summary = results_store.evaluation_summary(conn, protocol)
        rows = results_store.evaluation_rows(conn, protocol, plot_metrics)
        summary = summary[~summary["model"].isin(list(failed))]
        rows = rows[~rows["model"].isin(list(failed))]
        warning = weights_warning(conn)
        # a model the recommendations step could not restore or score keeps its metrics, and is named
        # (one not evaluated either is named below as such)
        unrecommended = {
            m: why
            for m, why in results_store.recommendation_failures(conn).items()
            if m not in failed and m in set(summary["model"])
        }
        # the grids show the model with the best mean nDCG@20 over its seeds
        mean_summary = summary.groupby(["model", "metric"], as_index=False)["value"].mean()
        grids_md = (
            recommendation_grids_markdown(conn, ws, mean_summary, model=grid_model, n_users=grid_users)
            if grid_users > 0
            else ""  # no grids asked for: no image table needed
        )
    table = benchmark_table(summary)
    header = f"# Benchmark ({protocol} protocol, dataset `{ws.dataset}`)\n\n"
    if warning:
        header += warning + "\n\n"
    report_md = header + table_markdown(table) + "\n"
    note = noise_note(table)
    if note:
        report_md += "\n" + note + "\n"
    claims = claims_markdown(table)
    if claims:
        report_md += "\n" + claims
    if failed or unrecommended:
        report_md += "\n## Models that failed\n\n" + "".join(f"- `{m}`: {why}\n" for m, why in sorted(failed.items()))
        report_md += "".join(f"- `{m}`: recommendations: {why}\n" for m, why in sorted(unrecommended.items()))
    missing = [m for m in MODEL_SPECS if m not in set(table.index) | set(failed)]
    if missing:
        report_md += "\nNot evaluated in this workspace (no `evaluation_<model>` yet): " + ", ".join(f"`{m}`" for m in missing) + "\n"
    attention_md = ""
    if attention_users > 0 and "acf" in failed:
        report_md += "\n## ACF attention\n\nACF failed in this run: no attention panel.\n"
        attention_md = "ACF failed in this run: no attention panel."
    elif attention_users > 0:
        # after the connection above is closed: loading the model opens its own
        attention_note, attention_png = acf_attention_panel(ws, attention_users)
        if attention_png is not None:
            with atomic_path(ws.reports_dir / ACF_ATTENTION_FILE, suffix=".png") as tmp:
                tmp.write_bytes(attention_png)
            report_md += f"\n## ACF attention\n\n{attention_note}\n\n![ACF attention]({ACF_ATTENTION_FILE})\n"
            attention_md = attention_note + "\n\n" + png_markdown(attention_png, "ACF attention")
        else:
            report_md += f"\n## ACF attention\n\n{attention_note}\n"
            attention_md = attention_note
    plots_md = []
    for metric in plot_metrics:
        sub = rows[rows["metric"] == metric]
        if len(sub):
            png = metric_by_profile_size_png(sub, metric)
            name = f"{metric.replace('@', '_at_')}_by_profile_size.png"
            with atomic_path(ws.reports_dir / name, suffix=".png") as tmp:
                tmp.write_bytes(png)
            plots_md.append(png_markdown(png, f"{metric} by profile size"))
    path = ws.reports_dir / REPORT_FILE
    with atomic_path(path, suffix=".md") as tmp:
        tmp.write_text(report_md)
    with atomic_path(ws.reports_dir / TABLE_FILE, suffix=".csv") as tmp:
        table.to_csv(tmp)
    return BenchmarkReport(
        markdown=report_md,
        path=path,
        table=table,
        plots_markdown=plots_md,
        grids_markdown=grids_md,
        attention_markdown=attention_md,
    )
