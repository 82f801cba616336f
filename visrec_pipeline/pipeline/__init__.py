"""The model path as plain library calls on a :class:`~visrec_pipeline.paths.Workspace` (no dagster).

Train, evaluate, load and recommend with the registered models; the Dagster assets in
``visrec_pipeline.defs.models`` are one call each into this package, and a notebook,
benchmark or script can make the same calls::

    from visrec_pipeline.paths import Workspace
    from visrec_pipeline.pipeline import evaluate_model, train_model

    ws = Workspace.from_env()
    trained = train_model(ws, "bpr_mf", {"epochs": 5})
    evaluation = evaluate_model(ws, "bpr_mf")
"""

from visrec_pipeline.pipeline.evaluation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_KS,
    DEFAULT_PROTOCOL,
    ModelEvaluation,
    cold_items,
    evaluate_model,
)
from visrec_pipeline.pipeline.provenance import TrainingProvenance, feature_provenance, read_training_provenance
from visrec_pipeline.pipeline.staleness import StaleCheckpointError, VersionChange
from visrec_pipeline.pipeline.recommendations import (
    NoRecommendationsError,
    RecommendationsRun,
    recommend_all,
    recommend_each,
    recommendations_of,
)
from visrec_pipeline.pipeline.seeds import seed_checkpoint_path, train_seeds, trained_seeds
from visrec_pipeline.pipeline.trained import LoadedModel, checkpoint_path, load_scoring_data, load_trained
from visrec_pipeline.pipeline.training import TrainedModel, train_model

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_KS",
    "DEFAULT_PROTOCOL",
    "LoadedModel",
    "ModelEvaluation",
    "NoRecommendationsError",
    "RecommendationsRun",
    "StaleCheckpointError",
    "TrainedModel",
    "TrainingProvenance",
    "VersionChange",
    "checkpoint_path",
    "cold_items",
    "evaluate_model",
    "feature_provenance",
    "load_scoring_data",
    "load_trained",
    "read_training_provenance",
    "seed_checkpoint_path",
    "recommend_all",
    "recommend_each",
    "recommendations_of",
    "train_model",
    "train_seeds",
    "trained_seeds",
]
