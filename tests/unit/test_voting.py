import numpy as np
import pytest

from labelwright.orchestrator.errors import ConfigError
from labelwright.orchestrator.voting import (
    confidence_weighted, get_rule, majority, mean_probs, top_candidates, unanimity,
)


def P(*rows):
    """probs for 3 specialists x len(rows) rows from per-row lists of per-specialist distributions"""
    return np.array(rows, dtype=float).transpose(1, 0, 2)


AGREE = [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]]
SPLIT = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]
WEAK_AGREE = [[0.55, 0.45], [0.51, 0.49], [0.6, 0.4]]


def test_unanimity_settles_only_full_agreement():
    v = unanimity(P(AGREE, SPLIT))
    assert v.label.tolist() == [0, -1]
    assert v.hard.tolist() == [False, True]
    assert v.confidence[0] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    assert v.leading.tolist() == [0, 0]  # 0.6 mean vs 0.4 on the split row


def test_unanimity_threshold_makes_weak_agreement_hard():
    assert unanimity(P(WEAK_AGREE)).label.tolist() == [0]
    assert unanimity(P(WEAK_AGREE), threshold=0.6).label.tolist() == [-1]


def test_majority_needs_more_than_half_the_weight():
    v = majority(P(SPLIT))
    assert v.label.tolist() == [0]  # 2 of 3 vote label 0
    # give the dissenter most of the weight: now label 1 holds > half
    v = majority(P(SPLIT), weights=np.array([1, 5, 1]))
    assert v.label.tolist() == [1]
    # two specialists split 1-1: no majority
    two = np.array([[[0.9, 0.1]], [[0.1, 0.9]]])
    assert majority(two).label.tolist() == [-1]


def test_confidence_weighted_threshold():
    v = confidence_weighted(P(AGREE, SPLIT), threshold=0.7)
    assert v.label.tolist() == [0, -1]
    v = confidence_weighted(P(AGREE, SPLIT), threshold=0.5)
    assert v.label.tolist() == [0, 0]


def test_mean_probs_weighted_and_validation():
    probs = P(SPLIT)
    np.testing.assert_allclose(mean_probs(probs, np.array([1, 0, 0])), [[0.9, 0.1]])
    with pytest.raises(ValueError):
        mean_probs(probs, np.array([1, 1]))
    with pytest.raises(ValueError):
        mean_probs(probs, np.array([0, 0, 0]))


def test_rules_by_name():
    assert get_rule("majority") is majority
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        get_rule("plurality")


def test_top_candidates_order():
    scores = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.0, 0.1, 0.5]])
    assert top_candidates(scores, 2).tolist() == [[1, 2], [3, 0]]
    assert top_candidates(scores, 10).shape == (2, 4)
