"""visual_clusters' incremental path: new items join the last fit's centroids; a refit when too many are new."""

from __future__ import annotations

import numpy as np

from visrec_pipeline.embeddings.kmeans import ClusterState, assign, kmeans


def _blobs(rng: np.random.Generator, n_per: int, centres: np.ndarray) -> np.ndarray:
    return np.concatenate([c + 0.05 * rng.standard_normal((n_per, centres.shape[1])) for c in centres]).astype(np.float32)


def test_new_items_join_the_nearest_centroid_and_old_labels_stay(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8, dtype=np.float32) * 3
    x = _blobs(rng, 40, centres)
    fit = kmeans(x, 3, seed=0)
    ids = np.arange(100, 100 + len(x))
    state = ClusterState(fit.centroids, ids, 3, 0, "random:seed=0")
    path = tmp_path / "clusters" / "resnet50.npz"
    path.parent.mkdir()
    state.save(path)
    loaded = ClusterState.load(path)
    assert loaded is not None and loaded.k == 3 and loaded.weights_tag == "random:seed=0"
    np.testing.assert_array_equal(loaded.fitted_ids, ids)

    # every old item keeps its label: converged labels are the argmin over the final centroids
    np.testing.assert_array_equal(assign(x, loaded.centroids), fit.labels)
    new = _blobs(rng, 2, centres)  # 6 new items, two per blob
    labels = assign(new, loaded.centroids)
    blob_label = fit.labels[::40]
    np.testing.assert_array_equal(labels, np.repeat(blob_label, 2))

    grown = np.concatenate([ids, np.arange(900, 906)])
    assert loaded.can_extend(grown, k=3, seed=0, weights_tag="random:seed=0", refit_share=0.1)
    assert not loaded.can_extend(grown, k=3, seed=0, weights_tag="random:seed=0", refit_share=0.0)
    assert not loaded.can_extend(grown, k=4, seed=0, weights_tag="random:seed=0", refit_share=0.1)
    assert not loaded.can_extend(grown, k=3, seed=1, weights_tag="random:seed=0", refit_share=0.1)
    assert not loaded.can_extend(grown, k=3, seed=0, weights_tag="imagenet:IMAGENET1K_V2", refit_share=0.1)
    doubled = np.concatenate([ids, np.arange(1000, 1000 + len(ids))])
    assert not loaded.can_extend(doubled, k=3, seed=0, weights_tag="random:seed=0", refit_share=0.1)


def test_an_unreadable_state_file_means_refit(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not an npz")
    assert ClusterState.load(path) is None
    assert ClusterState.load(tmp_path / "absent.npz") is None
