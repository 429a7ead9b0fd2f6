import numpy as np
import pytest

from labelwright.specialists.errors import ConfigError
from labelwright.orchestrator.voting import (
    Votes, calibrate, confidence_weighted, gated, get_rule, majority, mean_probs, top_candidates, unanimity,
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


def votes_of(confidence, hard=None):
    confidence = np.asarray(confidence, dtype=float)
    hard = np.zeros(len(confidence), bool) if hard is None else np.asarray(hard)
    return Votes(label=np.where(hard, -1, 0), confidence=confidence, leading=np.zeros(len(confidence), int))


def test_calibrate_picks_the_lowest_threshold_that_reaches_the_target():
    # most confident first: right, right, right, wrong, right, wrong, wrong
    v = votes_of([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6])
    right = [True, True, True, False, True, False, False]
    fit = calibrate(v, right, target=0.8, min_settled=1)
    assert fit.threshold == 0.8 and fit.accuracy == pytest.approx(0.8) and fit.settled_share == pytest.approx(5 / 7)
    assert calibrate(v, right, target=0.75, min_settled=1).threshold == 0.8  # 4/7 and 4/6 miss; 4/5 does
    assert calibrate(v, right, target=1.0, min_settled=1).threshold == 0.9
    assert calibrate(v, right, target=0.5, min_settled=1).threshold == 0.6  # everything: 4/7 >= 0.5


def test_calibrate_keeps_ties_together_and_needs_enough_rows():
    v = votes_of([0.9, 0.9, 0.9, 0.5])
    fit = calibrate(v, [True, False, True, True], target=0.75, min_settled=1)
    assert fit.threshold == 0.5 and fit.accuracy == 0.75  # 0.9 admits three rows at once (2/3), 0.5 all four
    assert calibrate(votes_of([0.9, 0.8]), [True, True], target=0.9, min_settled=5).threshold is None


def test_calibrate_gives_none_when_no_threshold_reaches_the_target():
    fit = calibrate(votes_of([0.9, 0.8, 0.7]), [False, True, False], target=0.9, min_settled=1)
    assert fit.threshold is None and fit.settled_share == 0.0 and fit.accuracy is None
    assert fit.as_dict()["target_accuracy"] == 0.9 and fit.rows == 3


def test_calibrate_ignores_rows_the_rule_leaves_hard():
    v = votes_of([0.99, 0.6, 0.6], hard=[True, False, False])
    fit = calibrate(v, [False, True, True], target=1.0, min_settled=1)
    assert fit.threshold == 0.6 and fit.settled_share == pytest.approx(2 / 3)


def test_gated_applies_a_calibrated_threshold_on_top_of_the_rule():
    base = unanimity(P(AGREE, SPLIT, WEAK_AGREE), threshold=0.0)
    assert gated(base, 0.6).label.tolist() == [0, -1, -1]  # weak agreement (mean 0.553) is now hard
    assert gated(base, 0.0).label.tolist() == [0, -1, 0]
    assert gated(base, None).hard.all()
    assert gated(base, 0.6).leading.tolist() == base.leading.tolist()
