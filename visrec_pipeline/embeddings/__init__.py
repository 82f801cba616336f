"""CNN image features: backbones, batched extraction, the sharded feature store, k-means clusters.

Public reader API (used by the models): :func:`load_pooled`, :func:`load_spatial`,
:func:`feature_dim`, :func:`spatial_shape`, :func:`feature_provenance`, :func:`snapshot`.
"""

from visrec_pipeline.embeddings.backbones import BACKBONES, BackboneSpec, get_backbone
from visrec_pipeline.embeddings.extract import extract_features, load_backbone
from visrec_pipeline.embeddings.kmeans import KMeansResult, kmeans
from visrec_pipeline.embeddings.store import (
    FeatureSnapshot,
    FeaturesNotFoundError,
    feature_dim,
    feature_provenance,
    load_pooled,
    load_spatial,
    snapshot,
    spatial_shape,
)
from visrec_pipeline.embeddings.weights import WeightsChoice, WeightsUnavailableError, build_model

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FeatureSnapshot",
    "FeaturesNotFoundError",
    "KMeansResult",
    "WeightsChoice",
    "WeightsUnavailableError",
    "build_model",
    "extract_features",
    "feature_dim",
    "feature_provenance",
    "get_backbone",
    "kmeans",
    "load_backbone",
    "load_pooled",
    "load_spatial",
    "snapshot",
    "spatial_shape",
]
