"""``benchmark_report``: the tutorial's table for every model, plots and image grids."""



import dagster as dg
import numpy as np
import pandas as pd

from visrec_pipeline import db
from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.defs.automation import follows_evaluations
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.recsys.registry import MODEL_SPECS
from visrec_pipeline.reporting.benchmark import benchmark_table, table_markdown
from visrec_pipeline.reporting.grids import png_markdown
from visrec_pipeline.reporting.plots import metric_by_profile_size_png


class BenchmarkReportConfig(dg.Config):
    protocol: str = "standard"
    plot_metrics: list[str] = ["auc", "ndcg@20", "recall@100"]
    grid_users: int = 3
    grid_model: str = ""  # empty: the model with the best nDCG@20
    attention_users: int = 3  # users in the ACF attention panel (0: no panel)


def _weights_warning(conn) -> str | None:
    if not db.table_exists(conn, "embedding_index"):
        return None
    tags = [r[0] for r in conn.execute("SELECT DISTINCT weights_tag FROM embedding_index").fetchall()]
    random_tags = [t for t in tags if t and not str(t).startswith("imagenet")]
    if random_tags:
        return (
            "**Warning:** visual features were extracted WITHOUT ImageNet weights "
            f"({', '.join(sorted(map(str, random_tags)))}); models using them are not comparable with published figures."
        )
    return None


@dg.asset(
    group_name="reports",
    deps=[dg.AssetKey(f"evaluation_{n}") for n in MODEL_SPECS] + [dg.AssetKey("recommendations")],
    code_version="1",
    automation_condition=follows_evaluations(),
    description="Every evaluated model side by side (the tutorial's table), metric-by-profile-size plots and "
    "image grids of consumed / recommended / ground-truth items. Also written to reports/benchmark.md.",
)
def benchmark_report(
    context: dg.AssetExecutionContext, config: BenchmarkReportConfig, settings: VisrecSettings, duckdb: VisrecDuckDB
) -> dg.MaterializeResult:
    ws = settings.workspace.ensure()
    with duckdb.get_connection() as conn:
        summary = conn.execute(
            "SELECT model, metric, value, train_seconds FROM evaluation_summary WHERE protocol = ?", [config.protocol]
        ).df()
        rows = conn.execute(
            "SELECT model, user_id, profile_size, metric, value FROM evaluation_rows WHERE protocol = ? AND metric IN "
            "(SELECT unnest(?::VARCHAR[]))",
            [config.protocol, config.plot_metrics],
        ).df()
        warning = _weights_warning(conn)
        grid_md = _recommendation_grids(conn, ws, summary, config)
    table = benchmark_table(summary)
    table_md = table_markdown(table)
    header = f"# Benchmark ({config.protocol} protocol, dataset `{ws.dataset}`)\n\n"
    if warning:
        header += warning + "\n\n"
    report_md = header + table_md + "\n"
    attention_md = ""
    if config.attention_users > 0:
        # after the connection above is closed: loading the model opens its own
        attention_note, attention_png = _acf_attention(settings, config.attention_users)
        if attention_png is not None:
            with atomic_path(ws.reports_dir / ACF_ATTENTION_FILE, suffix=".png") as tmp:
                tmp.write_bytes(attention_png)
            report_md += f"\n## ACF attention\n\n{attention_note}\n\n![ACF attention]({ACF_ATTENTION_FILE})\n"
            attention_md = attention_note + "\n\n" + png_markdown(attention_png, "ACF attention")
        else:
            report_md += f"\n## ACF attention\n\n{attention_note}\n"
            attention_md = attention_note
    plots_md = []
    for metric in config.plot_metrics:
        sub = rows[rows["metric"] == metric]
        if len(sub):
            png = metric_by_profile_size_png(sub, metric)
            name = f"{metric.replace('@', '_at_')}_by_profile_size.png"
            with atomic_path(ws.reports_dir / name, suffix=".png") as tmp:
                tmp.write_bytes(png)
            plots_md.append(png_markdown(png, f"{metric} by profile size"))
    with atomic_path(ws.reports_dir / "benchmark.md", suffix=".md") as tmp:
        tmp.write_text(report_md)
    with atomic_path(ws.reports_dir / "benchmark.csv", suffix=".csv") as tmp:
        table.to_csv(tmp)
    metadata = {
        "benchmark": dg.MetadataValue.md(report_md),
        "report_file": dg.MetadataValue.path(str(ws.reports_dir / "benchmark.md")),
        "models": len(table),
    }
    if plots_md:
        metadata["metric_by_profile_size"] = dg.MetadataValue.md("\n\n".join(plots_md))
    if grid_md:
        metadata["recommendation_grids"] = dg.MetadataValue.md(grid_md)
    if attention_md:
        metadata["acf_attention"] = dg.MetadataValue.md(attention_md)
    return dg.MaterializeResult(metadata=metadata)


ACF_ATTENTION_FILE = "acf_attention.png"


def _acf_attention(settings: VisrecSettings, n_users: int) -> tuple[str, bytes | None]:
    """(explanation, PNG) of ACF's attentions for a few holdout users; the PNG is None (and the
    explanation says why) when ACF has no trained checkpoint."""
    from PIL import Image

    from visrec_pipeline.defs.models import checkpoint_path, load_trained
    from visrec_pipeline.embeddings.backbones import get_backbone
    from visrec_pipeline.model_io import FEATURE_BACKBONE, item_image_paths
    from visrec_pipeline.reporting.attention import attention_panel_png, explain_rows

    if "acf" not in MODEL_SPECS or not checkpoint_path(settings, "acf").exists():
        return "ACF is not trained in this workspace: no attention panel.", None
    model, data, _inputs, _ckpt = load_trained(settings, "acf")
    holdout = data.holdout
    if holdout is None or len(holdout) == 0:
        return "No holdout rows: no ACF attention panel.", None
    ws = settings.workspace
    # candidates: the longest profiles (more items to rank by attention); users whose top-1 is a hit first
    sizes = holdout.profile.lengths()
    candidates = np.lexsort((np.arange(sizes.size), -sizes))[:64]
    rows = explain_rows(model, holdout, candidates, user_labels=[f"user {u}" for u in holdout.user_ids[candidates]])
    rows = sorted(rows, key=lambda r: not r.top_hit)[:n_users]
    if not rows:
        return "ACF had nothing to recommend to the sampled holdout users: no attention panel.", None
    with db.connect(ws.db_path) as conn:
        paths = item_image_paths(conn, ws, data.items)
    blank = Image.new("RGB", (256, 256), (200, 200, 200))

    def image_of(i: int):
        p = paths[i]
        return Image.open(p).convert("RGB") if p is not None else blank

    transforms = get_backbone(FEATURE_BACKBONE).transforms()
    # the CNN saw the centre crop of the resized thumbnail: the region grid covers that part only
    crop_fraction = float(transforms.crop_size[0]) / float(transforms.resize_size[0])
    png = attention_panel_png(
        rows, image_of, item_label=lambda i: str(int(data.items.ids[i])), crop_fraction=crop_fraction
    )
    note = (
        f"ACF's attentions for {len(rows)} holdout users. Each row: the top-1 recommendation (outlined: green "
        "when it is a held-out item, blue otherwise), then the user's profile items ranked by ACF's item-level "
        "attention `a` (in the caption; it sums to 1 over the most recent "
        f"{model.config.max_profile_len} profile items). The heat map on each *profile* thumbnail is ACF's "
        "component attention over the 7x7 ResNet-50 `layer4` regions of that profile image, scaled per image "
        "(red: the regions that shaped the user's vector most; `xk` in the caption: the hottest region weighs k "
        "times the uniform 1/49); the recommended item has no heat map, as ACF never attends over the "
        "candidate's regions."
    )
    return note, png


def _recommendation_grids(conn, ws, summary: pd.DataFrame, config: BenchmarkReportConfig) -> str:
    """Per sample user: last consumed items, the top-10 of one model (hits outlined), the ground truth."""
    from visrec_pipeline.reporting.grids import image_grid_png
    from PIL import Image

    if not db.table_exists(conn, "recommendations") or summary.empty:
        return ""
    model = config.grid_model
    if not model:
        nd = summary[summary["metric"] == "ndcg@20"]
        if nd.empty:
            return ""
        model = str(nd.sort_values("value", ascending=False)["model"].iloc[0])
    users = conn.execute(
        "SELECT user_id, profile, predict FROM split_holdout ORDER BY len(profile) DESC, user_id LIMIT 50"
    ).df()
    recs = conn.execute(
        "SELECT user_id, item_id FROM recommendations WHERE model = ? AND rank <= 10 ORDER BY user_id, rank", [model]
    ).df()
    paths = dict(conn.execute("SELECT item_id, path FROM item_images WHERE status = 'ok'").fetchall())
    # prefer users with a hit, so the grid shows what a success looks like
    hit_users = set(recs.merge(users.explode("predict"), left_on=["user_id", "item_id"], right_on=["user_id", "predict"])["user_id"])
    order = sorted(users.index, key=lambda r: (users.at[r, "user_id"] not in hit_users, r))
    out = [f"### Recommendations of `{model}` (hits outlined in green)"]
    blank = Image.new("RGB", (256, 256), (200, 200, 200))

    def img(item_id):
        p = paths.get(int(item_id))
        return Image.open(ws.root / p).convert("RGB") if p else blank

    for r in order[: config.grid_users]:
        user_id = int(users.at[r, "user_id"])
        profile = list(users.at[r, "profile"])[-8:]
        predict = set(int(x) for x in users.at[r, "predict"])
        rec_items = recs.loc[recs["user_id"] == user_id, "item_id"].astype(int).tolist()
        images = [img(i) for i in profile] + [img(i) for i in rec_items] + [img(i) for i in predict]
        captions = [f"consumed {i}" for i in profile] + [f"#{k + 1} {i}" for k, i in enumerate(rec_items)] + [
            f"truth {i}" for i in predict
        ]
        outline = [None] * len(profile) + [("green" if i in predict else None) for i in rec_items] + ["blue"] * len(predict)
        png = image_grid_png(images, captions=captions, cols=8, outline=outline)
        out.append(f"**user {user_id}**: {len(users.at[r, 'profile'])} consumed (last 8 shown), top 10, ground truth")
        out.append(png_markdown(png, f"user {user_id}"))
    return "\n\n".join(out)


defs = dg.Definitions(assets=[benchmark_report])
