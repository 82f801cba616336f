"""Issue 14, case 4: a model is not evaluated (or asked for recommendations) against a newer split
than it was trained on; the refusal names what changed and what to do."""

from __future__ import annotations

import pytest

from test_pipeline_use_cases import BPR_CONFIG, N_USERS, ws  # noqa: F401  (the small trained workspace)
from visrec_pipeline import db
from visrec_pipeline.ingest import build_catalog, build_interactions, build_split, ingest_batch
from visrec_pipeline.pipeline import checkpoint_path, evaluate_model, load_trained, recommend_all, train_model


def test_a_refresh_makes_old_checkpoints_refused_until_the_models_retrain(ws, tmp_path):  # noqa: F811
    evaluate_model(ws, "bpr_mf")  # current: fine
    trained_on = load_trained(ws, "bpr_mf").checkpoint["data_versions"]

    # a later batch: every user consumes one more catalogue item (the catalogue stays, the split moves)
    later = tmp_path / "later.csv"
    later.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{100 + u},{10 + (u + 7) % 12},{9000 + u}\n" for u in range(N_USERS))
    )
    with db.connect(ws.db_path) as conn:
        ingest_batch(conn, "later", later)
        build_interactions(conn)
        build_catalog(conn, None)
        build_split(conn)

    for name, use in (
        ("bpr_mf", lambda: evaluate_model(ws, "bpr_mf")),
        ("most_popular", lambda: recommend_all(ws, ["most_popular", "bpr_mf"], 3)),
    ):
        with pytest.raises(Exception, match="trained on other data") as refused:
            use()
        message = str(refused.value)
        assert str(checkpoint_path(ws, name)) in message and f"re-materialize model_{name}" in message
        assert "table split_train" in message and "table split_holdout" in message
        assert "item_catalog" not in message  # only what changed is named
    assert f"trained on {trained_on['split_train']}, now " in message

    # retrained on the current split, both work again
    train_model(ws, "bpr_mf", BPR_CONFIG)
    train_model(ws, "most_popular")
    assert evaluate_model(ws, "bpr_mf").n_rows == N_USERS
    assert set(recommend_all(ws, ["most_popular", "bpr_mf"], 3)["model"]) == {"most_popular", "bpr_mf"}
