"""Seeds (issue 15): a model trained under N seeds is evaluated under each, the report shows mean ± std
and marks adjacent models whose difference is within noise; with one seed it looks as before."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from test_pipeline_use_cases import BPR_CONFIG, N_USERS, ws  # noqa: F401  (the small trained workspace)
from visrec_pipeline import db
from visrec_pipeline.pipeline import (
    evaluate_model,
    load_trained,
    seed_checkpoint_path,
    train_model,
    train_seeds,
    trained_seeds,
)
from visrec_pipeline.pipeline import results_store
from visrec_pipeline.pipeline.seeds import manifest_path, with_seed
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.registry import make_config
from visrec_pipeline.reporting.benchmark import NEXT_COLUMN, WITHIN_NOISE, benchmark_table, within_noise
from visrec_pipeline.reporting.benchmark_report import write_benchmark_report


def _seed_rows(ws, model):  # noqa: F811
    with db.connect(ws.db_path, read_only=True) as conn:
        return conn.execute(
            "SELECT seed, value FROM evaluation_summary WHERE model = ? AND protocol = 'standard' AND metric = 'auc' "
            "ORDER BY seed",
            [model],
        ).fetchall()


def test_with_seed_moves_the_seed_the_config_names_or_its_default():
    assert make_config("bpr_mf", with_seed("bpr_mf", {"epochs": 1}, 2)).train.seed == 2
    assert make_config("bpr_mf", with_seed("bpr_mf", {"train": {"seed": 5, "epochs": 1}}, 2)).train.seed == 7
    assert make_config("bpr_mf", with_seed("bpr_mf", {"seed": 3, "epochs": 1}, 1)).train.seed == 4  # flat key
    assert make_config("random", with_seed("random", {}, 3)).seed == 3
    assert with_seed("bpr_mf", {"epochs": 1}, 2)["epochs"] == 1  # the rest of the config is kept


def test_two_seeds_give_two_rows_per_model_and_the_report_shows_mean_and_spread(ws):  # noqa: F811
    for name, config in (("bpr_mf", BPR_CONFIG), ("most_popular", {})):
        trained = train_seeds(ws, name, config, 2)
        assert [t.checkpoint for t in trained] == [seed_checkpoint_path(ws, name, k) for k in (0, 1)]
        assert trained_seeds(ws, name) == [(0, trained[0].checkpoint), (1, trained[1].checkpoint)]
    # seed 1 trained with the config's seed + 1; seed 0 is the model's own checkpoint, as given
    assert load_trained(ws, "bpr_mf").checkpoint["config"] == BPR_CONFIG
    seed_1 = load_trained(ws, "bpr_mf", path=seed_checkpoint_path(ws, "bpr_mf", 1))
    assert seed_1.model.config.train.seed == 1

    evaluation = evaluate_model(ws, "bpr_mf")
    evaluate_model(ws, "most_popular")
    assert sorted(evaluation.seed_means) == [0, 1]
    # each seed's stored means are that checkpoint's metrics
    direct = evaluate(seed_1.model.score, seed_1.data.holdout, len(seed_1.data.items))
    rows = _seed_rows(ws, "bpr_mf")
    assert [s for s, _ in rows] == [0, 1] and rows[1][1] == pytest.approx(direct.means["auc"])
    assert rows[0][1] != rows[1][1]  # one epoch from other initial weights: the seeds differ
    assert [s for s, _ in _seed_rows(ws, "most_popular")] == [0, 1]
    with db.connect(ws.db_path, read_only=True) as conn:
        (per_row,) = conn.execute("SELECT count(*) FROM evaluation_rows WHERE model = 'bpr_mf' AND metric = 'auc'").fetchone()
    assert per_row == N_USERS  # per-row metrics: seed 0 only

    report = write_benchmark_report(ws, grid_users=0, attention_users=0)
    table = report.table
    assert table.loc["bpr_mf", "seeds"] == 2
    aucs = [v for _, v in rows]
    assert table.loc["bpr_mf", "AUC"] == pytest.approx(sum(aucs) / 2)
    assert table.loc["bpr_mf", "AUC std"] == pytest.approx(abs(aucs[0] - aucs[1]) / math.sqrt(2))
    assert table.loc["most_popular", "AUC std"] == 0.0  # deterministic: the same metrics under every seed
    line = next(ln for ln in report.markdown.splitlines() if ln.startswith("| bpr_mf"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert " ± " in cells[1] and cells[-2] == "2"  # AUC as mean ± std; n
    assert "mean ± sample standard deviation" in report.markdown

    # back to one seed: the extra seed's files go, and the report looks as it did before seeds
    for name, config in (("bpr_mf", BPR_CONFIG), ("most_popular", {})):
        train_seeds(ws, name, config, 1)
        assert not seed_checkpoint_path(ws, name, 1).exists() and not manifest_path(ws, name).exists()
        evaluate_model(ws, name)
    assert [s for s, _ in _seed_rows(ws, "bpr_mf")] == [0]
    report = write_benchmark_report(ws, grid_users=0, attention_users=0)
    assert "seeds" not in report.table and "±" not in report.markdown and NEXT_COLUMN not in report.markdown


def test_extra_seeds_of_an_older_training_are_not_mixed_in(ws):  # noqa: F811
    train_seeds(ws, "bpr_mf", BPR_CONFIG, 2)
    assert len(trained_seeds(ws, "bpr_mf")) == 2
    train_model(ws, "bpr_mf", {**BPR_CONFIG, "factors": 4})  # seed 0 retrained by another path
    assert trained_seeds(ws, "bpr_mf") == [(0, seed_checkpoint_path(ws, "bpr_mf", 0))]
    assert sorted(evaluate_model(ws, "bpr_mf").seed_means) == [0]


def test_within_noise_is_two_standard_errors_of_the_difference():
    # se = sqrt(.01^2/3 + .01^2/3) = .008165; 2 se = .01633
    assert within_noise(0.80, 0.01, 3, 0.79, 0.01, 3) is True
    assert within_noise(0.80, 0.01, 3, 0.78, 0.01, 3) is False
    assert within_noise(0.80, 0.01, 3, 0.80, 0.0, 1) is None  # one seed: no spread to judge by
    assert within_noise(0.5, 0.0, 2, 0.5, 0.0, 2) is True  # identical deterministic models


def test_the_report_table_marks_adjacent_models_within_noise():
    values = {"a": [0.89, 0.90, 0.91], "b": [0.885, 0.895, 0.905], "c": [0.69, 0.70, 0.71]}
    summary = pd.DataFrame(
        [(m, s, "auc", v, 1.0) for m, vs in values.items() for s, v in enumerate(vs)],
        columns=["model", "seed", "metric", "value", "train_seconds"],
    )
    table = benchmark_table(summary)
    assert list(table.index) == ["a", "b", "c"]
    assert table["AUC"].tolist() == pytest.approx([0.90, 0.895, 0.70])
    assert table["AUC std"].tolist() == pytest.approx([0.01, 0.01, 0.01])
    # a-b: |.005| <= 2 * .008165; b-c: .195 is not; c has no next row
    assert table[NEXT_COLUMN].tolist() == [WITHIN_NOISE, "distinct", ""]


def test_an_evaluation_summary_without_seed_column_is_read_and_migrated_in_place(tmp_path):
    with db.connect(tmp_path / "old.duckdb") as conn:
        conn.execute(  # the table as written before seeds were evaluated
            "CREATE TABLE evaluation_summary (model VARCHAR NOT NULL, protocol VARCHAR NOT NULL, metric VARCHAR NOT NULL, "
            "value DOUBLE, n_rows BIGINT, train_seconds DOUBLE, evaluated_at TIMESTAMP)"
        )
        conn.execute("INSERT INTO evaluation_summary VALUES ('old', 'standard', 'auc', 0.7, 5, 1.0, now())")
        assert results_store.evaluation_summary(conn, "standard")[["model", "seed"]].values.tolist() == [["old", 0]]
        for _ in range(2):  # idempotent
            db.run_sql(conn, "evaluation_tables")
        columns = [r[0] for r in conn.execute("DESCRIBE evaluation_summary").fetchall()]
        assert columns.count("seed") == 1
        assert conn.execute("SELECT model, seed, value FROM evaluation_summary").fetchall() == [("old", 0, 0.7)]


def test_the_model_asset_config_takes_seeds_and_passes_the_rest_to_the_model():
    from visrec_pipeline.defs.models import _to_model_config, model_asset_config_class
    from visrec_pipeline.recsys.registry import MODEL_SPECS

    spec = MODEL_SPECS["bpr_mf"]
    cls = model_asset_config_class(spec)
    assert cls().seeds == 1  # the default: the report looks as it did before seeds
    values = _to_model_config(spec, cls(seeds=3, factors=8))
    assert "seeds" not in values and make_config("bpr_mf", values).factors == 8
    with pytest.raises(Exception, match="greater than or equal to 1"):
        cls(seeds=0)
