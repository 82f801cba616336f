"""``benchmark_report``: the tutorial's table for every model, plots and image grids."""

import dagster as dg

from visrec_pipeline import step_memory
from visrec_pipeline.defs.after_failure import recording_step_memory
from visrec_pipeline.defs.automation import follows_evaluations
from visrec_pipeline.defs.resources import VisrecSettings
from visrec_pipeline.defs.temp_files import remove_leftover_temps
from visrec_pipeline.recsys.registry import MODEL_SPECS
from visrec_pipeline.pipeline import DEFAULT_PROTOCOL
from visrec_pipeline.reporting.benchmark_report import (
    DEFAULT_ATTENTION_USERS,
    DEFAULT_GRID_USERS,
    DEFAULT_PLOT_METRICS,
    write_benchmark_report,
)


class BenchmarkReportConfig(dg.Config):
    protocol: str = DEFAULT_PROTOCOL
    plot_metrics: list[str] = list(DEFAULT_PLOT_METRICS)
    grid_users: int = DEFAULT_GRID_USERS
    grid_model: str = ""  # empty: the model with the best nDCG@20
    attention_users: int = DEFAULT_ATTENTION_USERS  # users in the ACF attention panel (0: no panel)
    # model -> why its step failed: left out of the table and named (set by the run after a failed run)
    failed_models: dict[str, str] = {}


@dg.asset(
    group_name="reports",
    deps=[dg.AssetKey(f"evaluation_{n}") for n in MODEL_SPECS] + [dg.AssetKey("recommendations")],
    code_version="1",
    automation_condition=follows_evaluations(),
    description="Every evaluated model side by side (the tutorial's table; mean ± std over seeds when the models "
    "were trained with seeds > 1, adjacent models within noise marked), metric-by-profile-size plots and "
    "image grids of consumed / recommended / ground-truth items. Also written to reports/benchmark.md.",
)
def benchmark_report(
    context: dg.AssetExecutionContext, config: BenchmarkReportConfig, settings: VisrecSettings
) -> dg.MaterializeResult:
    remove_leftover_temps(context, settings.workspace.reports_dir)
    with recording_step_memory(context):  # a report step the OS kills still tells its peak memory
        report = write_benchmark_report(
            settings.workspace,
            protocol=config.protocol,
            plot_metrics=config.plot_metrics,
            grid_users=config.grid_users,
            grid_model=config.grid_model,
            attention_users=config.attention_users,
            failed_models=config.failed_models,
        )
    metadata = {
        "benchmark": dg.MetadataValue.md(report.markdown),
        "report_file": dg.MetadataValue.path(str(report.path)),
        "models": len(report.table),
        "peak_rss_mib": dg.MetadataValue.float(round(step_memory.peak_rss_bytes() / 2**20, 1)),
    }
    if config.failed_models:
        metadata["failed_models"] = dg.MetadataValue.json(config.failed_models)
    if report.plots_markdown:
        metadata["metric_by_profile_size"] = dg.MetadataValue.md("\n\n".join(report.plots_markdown))
    if report.grids_markdown:
        metadata["recommendation_grids"] = dg.MetadataValue.md(report.grids_markdown)
    if report.attention_markdown:
        metadata["acf_attention"] = dg.MetadataValue.md(report.attention_markdown)
    return dg.MaterializeResult(metadata=metadata)


defs = dg.Definitions(assets=[benchmark_report])
