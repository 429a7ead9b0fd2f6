import numpy as np
import pytest

from labelwright.training.reweight import lookahead_weights


def _blobs(n, centers, rng, noise=0.3):
    y = rng.integers(len(centers), size=n)
    x = centers[y] + rng.normal(size=(n, centers.shape[1])) * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_a_flipped_label_gets_a_weight_near_zero():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8) * 3
    X, y = _blobs(60, centers, rng)
    ref_X, ref_y = _blobs(15, centers, rng)
    flipped = y.copy()
    flipped[0] = (y[0] + 1) % 3  # a clear row of one class, labelled as another
    w = lookahead_weights(X, flipped, 3, ref_X=ref_X, ref_y=ref_y)
    assert w.shape == (60,) and (w >= 0).all()
    assert w.mean() == pytest.approx(1.0)
    assert w[0] < 0.05
    assert w[1:].min() > 0.3  # the clean rows all keep a real weight


def test_clean_labels_keep_weights_near_one():
    rng = np.random.default_rng(1)
    centers = np.eye(2, 8) * 3
    X, y = _blobs(40, centers, rng)
    ref_X, ref_y = _blobs(10, centers, rng)
    w = lookahead_weights(X, y, 2, ref_X=ref_X, ref_y=ref_y)
    assert 0.5 < w.min() and w.max() < 2.0


def test_reweighting_needs_reference_rows():
    with pytest.raises(ValueError, match="needs reference rows"):
        lookahead_weights(np.eye(2), np.array([0, 1]), 2, ref_X=np.zeros((0, 2)), ref_y=np.zeros(0, int))
    assert lookahead_weights(np.zeros((0, 2)), np.zeros(0, int), 2, ref_X=np.eye(2), ref_y=np.array([0, 1])).shape == (0,)
