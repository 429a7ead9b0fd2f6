import numpy as np
import pytest

from labelwright.training.stage import balanced_weights


def test_balanced_weights_equalise_label_totals():
    labels = ["pos"] * 6 + ["neg"] * 2
    w = balanced_weights(labels)
    assert w[:6].sum() == pytest.approx(w[6:].sum())
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(balanced_weights(["a", "b"]), [1.0, 1.0])
