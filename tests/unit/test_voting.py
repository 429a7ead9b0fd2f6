import numpy as np
import pytest

from labelwright.specialists.errors import ConfigError
from labelwright.orchestrator.voting import (
    Stack,
    chosen_stack,
    combine_logits,
    combined_label,
    controller_probs,
    cross_fitted,
    fit_combination,
    fit_route,
    fit_stack,
    paired_difference_bound,
    proportion_bound,
    stack_probs,
    stacked,
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


# ---- routing by measured correctness -------------------------------------------------------------

def _reference(n, spec_acc, ctrl_acc, *, seed=0):
    """n reference rows with confidence spread over [0.5, 1]: the specialists are right with probability
    spec_acc(confidence), the controller with ctrl_acc(confidence), independently."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 1.0, n)
    votes = Votes(label=np.zeros(n, dtype=int), confidence=conf, leading=np.zeros(n, dtype=int))
    return votes, rng.random(n) < spec_acc(conf), rng.random(n) < ctrl_acc(conf)


@pytest.mark.parametrize("method", ["wilson", "clopper_pearson"])
def test_proportion_bound_is_scipys_one_sided_interval(method):
    from scipy import stats

    scipy_method = "wilson" if method == "wilson" else "exact"
    for hits, n in [(0, 10), (3, 10), (10, 10), (45, 50), (120, 400)]:
        low = stats.binomtest(hits, n, alternative="greater").proportion_ci(0.95, method=scipy_method).low
        high = stats.binomtest(hits, n, alternative="less").proportion_ci(0.9, method=scipy_method).high
        assert proportion_bound(hits, n, method=method) == pytest.approx(low, abs=1e-9)
        assert proportion_bound(hits, n, level=0.9, side="upper", method=method) == pytest.approx(high, abs=1e-9)
    assert proportion_bound(0, 0) == 0.0 and proportion_bound(0, 0, side="upper") == 1.0
    with pytest.raises(ConfigError, match="wilson or clopper_pearson"):
        proportion_bound(1, 2, method="normal")


@pytest.mark.parametrize("n,p_won,p_lost", [(60, 0.08, 0.06), (150, 0.1, 0.05), (400, 0.2, 0.15)])
def test_the_paired_difference_bound_holds_at_its_level_and_no_more(n, p_won, p_lost):
    # Rows where only the specialists are right (won), only the controller (lost), or neither or both.
    cells = np.random.default_rng(n).multinomial(n, [p_won, p_lost, 1 - p_won - p_lost], size=4000)
    bound = paired_difference_bound(cells[:, 0], cells[:, 1], n, level=0.95)
    assert 0.93 <= np.mean(bound <= p_won - p_lost) <= 0.97
    # two separate 95% bounds, subtracted, hold ~99% of the time: a wider bound than the level asks for
    separate = proportion_bound(cells[:, 0], n) - proportion_bound(cells[:, 1], n, side="upper")
    assert np.mean(separate <= p_won - p_lost) > 0.98 and (separate <= bound + 1e-9).mean() > 0.95
    assert (bound <= (cells[:, 0] - cells[:, 1]) / n + 1e-9).all()  # never above the observed difference
    assert paired_difference_bound(0, 0, 0) == -1.0 and -0.03 < paired_difference_bound(0, 0, 200) < 0


def test_specialists_worse_than_the_controller_everywhere_settle_nothing():
    votes, right, ctrl = _reference(400, lambda c: 0.6 + 0.3 * (c - 0.5), lambda c: np.full_like(c, 0.95))
    fit = fit_route(votes, right, ctrl)
    assert fit.threshold is None and fit.settled_share == 0.0 and fit.reference == "gold"
    assert fit.curve and all(p["accuracy"] < p["controller_accuracy"] for p in fit.curve[2:])


def test_specialists_better_on_their_confident_rows_settle_those_and_only_those():
    # The specialists are nearly always right above 0.8 and a coin below; the controller is 85% everywhere.
    votes, right, ctrl = _reference(600, lambda c: np.where(c > 0.8, 0.99, 0.5), lambda c: np.full_like(c, 0.85))
    fit = fit_route(votes, right, ctrl, max_loss=0.0)
    assert fit.threshold is not None and 0.7 < fit.threshold < 0.85
    assert fit.accuracy >= fit.controller_accuracy and fit.bound >= 0.0
    assert fit.controller_accuracy_all == pytest.approx(ctrl.mean())
    gated_rows = votes.confidence >= fit.threshold
    assert fit.settled_share == pytest.approx(gated_rows.mean())


def test_the_bound_tightens_with_more_reference_rows():
    # Specialists a little better than the controller on their top half: a few rows cannot show it, many can.
    spec, ctrl = (lambda c: np.where(c > 0.75, 0.97, 0.6)), (lambda c: np.full_like(c, 0.9))
    shares = [np.mean([fit_route(*_reference(n, spec, ctrl, seed=s), max_loss=0.0).settled_share for s in range(5)])
              for n in (40, 400, 4000)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > 0.4


def test_identical_answers_settle_everything_once_the_rows_bound_the_loss_within_the_margin():
    votes, right, _ = _reference(200, lambda c: np.full_like(c, 0.9), lambda c: np.full_like(c, 0.9))
    fit = fit_route(votes, right, right.copy(), max_loss=0.02)  # no disagreement on any row
    assert fit.settled_share == 1.0 and -0.02 <= fit.bound < 0  # 200 rows bound a loss rate to 1.3%
    assert fit_route(votes, right, right.copy(), max_loss=0.0).threshold is None  # no sample shows it is 0
    few = _reference(60, lambda c: np.full_like(c, 0.9), lambda c: c, seed=1)
    assert fit_route(few[0], few[1], few[1].copy(), max_loss=0.02).threshold is None  # 60 rows cannot


def test_without_gold_every_disagreement_counts_against_the_specialists():
    # Audit: the reference labels are the controller's; 'right' is agreement with it.
    votes, agree, _ = _reference(500, lambda c: np.where(c > 0.8, 1.0, 0.7), lambda c: c)
    fit = fit_route(votes, agree, None, max_loss=0.02)
    assert fit.reference == "audit" and fit.controller_accuracy is None
    assert fit.threshold is not None and fit.threshold > 0.78  # only where they always agree
    assert fit.bound >= -0.02
    assert fit_route(votes, agree, None, max_loss=0.0).threshold is None  # no disagreement rate is shown to be 0


def test_a_target_accuracy_replaces_the_comparison_with_the_controller():
    votes, right, ctrl = _reference(500, lambda c: c, lambda c: np.full_like(c, 0.99))
    fit = fit_route(votes, right, ctrl, target=0.85)
    assert fit.threshold is not None and fit.max_loss is None and fit.target == 0.85
    assert proportion_bound(round(fit.accuracy * fit.settled_share * 500), round(fit.settled_share * 500)) >= 0.85 - 1e-3
    assert fit_route(votes, right, np.ones(500, dtype=bool)).threshold is None  # against a perfect controller


def test_routing_ignores_rows_the_rule_leaves_hard_and_keeps_ties_together():
    conf = np.array([0.9, 0.9, 0.9, 0.8, 0.7, 0.6])
    votes = Votes(label=np.array([0, 0, 0, 0, -1, 0]), confidence=conf, leading=np.zeros(6, dtype=int))
    right = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    ctrl = np.ones(6, dtype=bool)  # the controller is always right: row 5 is lost
    fit = fit_route(votes, right, ctrl, min_settled=2, level=0.6, max_loss=0.1)
    assert fit.threshold == 0.8 and fit.settled_share == pytest.approx(4 / 6)  # row 4 is hard, row 5 lost
    assert fit_route(votes, right, ctrl, min_settled=5, level=0.6, max_loss=0.1).threshold is None
    # a threshold between the three rows at 0.9 would split a tie: k=1 and k=2 are never candidates
    assert fit_route(votes, right, ctrl, min_settled=1, level=0.6, max_loss=0.1).threshold == 0.8


# ---- the stacked rule ---------------------------------------------------------------------------------

def _stacked_data(n, *, seed=0):
    rng = np.random.default_rng(seed)
    true = Stack(np.array([1.5, 0.3, 0.0]), np.array([0.5, 0.0, -0.5, 0.0]))
    probs = rng.dirichlet(np.full(4, 0.7), size=(3, n))
    q = stack_probs(probs, true)
    y = np.array([rng.choice(4, p=row) for row in q])
    return probs, y, true


def test_the_stacked_rule_recovers_known_weights():
    probs, y, true = _stacked_data(3000)
    fit = fit_stack(probs, y)
    np.testing.assert_allclose(fit.a, true.a, atol=0.1)  # a strong, a weak and a useless specialist
    np.testing.assert_allclose(fit.b - fit.b.mean(), true.b - true.b.mean(), atol=0.1)
    assert Stack.from_dict(fit.as_dict()).a.tolist() == fit.a.tolist()


def test_stacked_without_a_fit_is_the_weighted_product_of_the_distributions():
    probs = P([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    votes = stacked(probs, threshold=0.55)
    # of the distributions each mixed with 5% of the uniform one (voting.SMOOTHING)
    prod = np.prod(0.95 * probs + 0.05 / 2, axis=0)
    w = stack_probs(probs, Stack(np.full(3, 1 / 3), np.zeros(2)))
    geo = prod ** (1 / 3) / (prod ** (1 / 3)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w, geo)
    np.testing.assert_allclose(votes.confidence, geo.max(axis=1))
    assert votes.leading.tolist() == [0, 0] and votes.label.tolist() == [0, -1]  # the second row is a tie


def test_cross_fitted_scores_each_row_without_it():
    probs, y, _ = _stacked_data(400, seed=1)
    q, full = cross_fitted(probs, y, folds=4)
    assert q.shape == (400, 4) and np.allclose(q.sum(axis=1), 1)
    assert not np.allclose(q, stack_probs(probs, full))  # out of fold differs from in sample
    in_sample = np.mean(np.log(stack_probs(probs, full)[np.arange(400), y]))
    out_of_fold = np.mean(np.log(q[np.arange(400), y]))
    assert out_of_fold < in_sample  # the in-sample fit flatters itself


def _specialist_knowing(y, n_labels, rng, known, *, sharpness=3.0):
    """Distributions sharp on the right label for rows whose label is in ``known``, uninformative elsewhere."""
    logits = rng.normal(0, 0.3, size=(len(y), n_labels))
    hit = np.isin(y, known)
    logits[np.flatnonzero(hit), y[hit]] += sharpness
    q = np.exp(logits)
    return q / q.sum(axis=1, keepdims=True)


def test_the_stack_is_kept_only_where_it_beats_the_best_specialist_alone():
    rng = np.random.default_rng(3)
    n, n_l = 300, 4
    y = rng.integers(0, n_l, size=n)
    # complementary: each knows half the labels; together they know them all, alone half
    halves = np.stack([_specialist_knowing(y, n_l, rng, [0, 1]), _specialist_knowing(y, n_l, rng, [2, 3])])
    q, stack, choice = chosen_stack(halves, y)
    assert choice["sources"] == [0, 1] and choice["won"] > choice["lost"] and choice["p_value"] < 0.05
    assert q.shape == (n, n_l) and np.mean(q.argmax(axis=1) == y) > 0.9 and (stack.a > 0).all()
    # one knows every label, the others nothing: the stack over all cannot beat it, so it is used alone
    strong = np.stack([_specialist_knowing(y, n_l, rng, []), _specialist_knowing(y, n_l, rng, [0, 1, 2, 3]),
                       _specialist_knowing(y, n_l, rng, [])])
    q, stack, choice = chosen_stack(strong, y)
    assert choice["sources"] == [1] and choice["best_single"] == 1 and choice["p_value"] >= 0.05
    assert stack.a[0] == stack.a[2] == 0 and stack.a[1] > 0
    np.testing.assert_allclose(stacked(strong, stack=stack).confidence, stack_probs(strong[1:2], Stack(stack.a[1:2], stack.b)).max(axis=1))
    # a single specialist is its own stack
    assert chosen_stack(strong[1:2], y)[2] == {"sources": [0]}


# ---- the controller combined with the specialists -----------------------------------------------------

def _noisy_controller(y, acc, n_labels, rng):
    """Answers right with probability ``acc``, else a random other label (the errors know nothing of the row)."""
    wrong = (y + rng.integers(1, n_labels, size=len(y))) % n_labels
    return np.where(rng.random(len(y)) < acc, y, wrong)


def _calibrated_specialist(y, n_labels, rng, *, sharpness):
    """Distributions whose confidence is calibrated: a row's leading label is right as often as it says."""
    logits = rng.normal(0, 1, size=(len(y), n_labels))
    logits[np.arange(len(y)), y] += rng.gamma(2.0, sharpness, size=len(y))
    q = np.exp(logits)
    return q / q.sum(axis=1, keepdims=True)


def test_controller_probs_put_the_confidence_on_the_answer():
    q = controller_probs(["b", None, "a", "", "c"], [0.7, None, None, 0.9, 0.1], ["a", "b", "c"])
    np.testing.assert_allclose(q[0], [0.15, 0.7, 0.15])
    np.testing.assert_allclose(q[1], [1 / 3] * 3)  # not answered: uniform
    assert q[2, 0] > 0.999 and np.isclose(q[2].sum(), 1)  # no logprobs: counted as sure
    np.testing.assert_allclose(q[3], [1 / 3] * 3)
    np.testing.assert_allclose(q[4], [1 / 3] * 3)  # a confidence below 1/L is clipped up to it


def test_a_specialist_sure_where_a_noisy_controller_errs_wins_rows_from_it():
    rng = np.random.default_rng(0)
    n, n_l = 600, 3
    y = rng.integers(0, n_l, size=n)
    said = _noisy_controller(y, 0.8, n_l, rng)
    spec = _calibrated_specialist(y, n_l, rng, sharpness=2.0)[None]
    ctrl = controller_probs([str(s) for s in said], [None] * n, [str(i) for i in range(n_l)])
    fit = fit_combination(spec, ctrl, said, y)
    assert fit.applied and fit.won > fit.lost and fit.accuracy > fit.controller_accuracy
    assert fit.controller_accuracy == pytest.approx(np.mean(said == y))
    assert fit.stack.a.shape == (2,) and fit.as_dict()["applied"] is True
    # combined_label is the fitted stack over the specialists and the controller, one row at a time
    z = combine_logits(spec, fit.stack)
    full = stack_probs(np.concatenate([spec, ctrl[None]]), fit.stack)
    for i in range(5):
        k, p = combined_label(z[i], fit.stack.a[-1], ctrl[i])
        assert k == full[i].argmax() and p == pytest.approx(full[i].max())


def test_a_specialist_that_knows_nothing_never_overrules_the_controller():
    rng = np.random.default_rng(1)
    n, n_l = 400, 2
    y = rng.integers(0, n_l, size=n)
    said = _noisy_controller(y, 0.85, n_l, rng)
    noise = rng.dirichlet(np.ones(n_l), size=(1, n))  # unrelated to the truth
    ctrl = controller_probs([str(s) for s in said], [None] * n, ["0", "1"])
    fit = fit_combination(noise, ctrl, said, y)
    assert not fit.applied and fit.won <= fit.lost
    assert fit.accuracy <= fit.controller_accuracy


def test_a_controller_that_favours_one_label_is_recalibrated_without_the_specialists():
    """An LLM that says "0" for most rows it is unsure of: the label bias alone, fitted on gold rows, wins
    rows back; specialists that know nothing add nothing, so the smaller model is kept."""
    rng = np.random.default_rng(2)
    n = 400
    y = rng.integers(0, 2, size=n)
    said, conf = y.copy(), rng.uniform(0.8, 1.0, size=n)
    doubt = rng.random(n) < np.where(y == 1, 0.3, 0.1)  # unsure rows, most of them truly "1" ...
    said[doubt], conf[doubt] = 0, rng.uniform(0.5, 0.65, size=doubt.sum())  # ... answered "0"
    ctrl = controller_probs([str(s) for s in said], list(conf), ["0", "1"])
    noise = rng.dirichlet(np.ones(2), size=(2, n))
    fit = fit_combination(noise, ctrl, said, y)
    assert fit.sources == "controller" and fit.applied and fit.accuracy > fit.controller_accuracy
    assert fit.stack.a[:2].tolist() == [0.0, 0.0] and fit.stack.b[0] < fit.stack.b[1]


def test_a_label_a_source_gives_nothing_costs_a_bounded_log_likelihood():
    """A linear head gives ~1e-13 to a label it never trained on: mixed with 5% of the uniform distribution
    (voting.SMOOTHING), that costs log(0.05 / n_labels) in the stack, not -30, so a source that is often right
    is not dropped for the rows whose label it never saw (banking77 with 100 gold rows: the stack fell to
    0.33 out of fold against 0.44 for its best source alone; mixed, 0.46). Weights stay >= 0."""
    from labelwright.orchestrator.voting import SMOOTHING, _log_probs

    p = np.array([[1.0 - 1e-13, 1e-13, 0.0, 0.0]])
    lp = _log_probs(p)
    np.testing.assert_allclose(lp[0, 1:], np.log(SMOOTHING / 4), rtol=1e-6)
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    anti = np.eye(3)[(y + 1) % 3] * 0.9 + 0.1 / 3  # a source that always names a wrong label
    probs = np.stack([np.eye(3)[y] * 0.6 + 0.4 / 3, anti])
    assert (fit_stack(probs, y).a >= 0).all()  # it gets weight 0, never a negative one


def test_reference_rows_are_decided_out_of_fold_like_the_rows_around_them():
    """Settled rows take the rule's out-of-fold label; the rows left to the controller take the combination's
    out-of-fold label where it pays, else the controller's answer; a row the controller failed on stays so."""
    from labelwright.orchestrator.voting import Combination, Stack, Votes, reference_decisions

    names = np.array(["a", "b"], dtype=object)
    ref = Votes(label=np.array([0, 1, 1, 0, 0]), confidence=np.array([0.95, 0.9, 0.6, 0.55, 0.6]),
                leading=np.array([0, 1, 1, 0, 0]))
    said = np.array(["b", "b", "a", "a", ""], dtype=object)
    combined_rows = np.array([False, False, True, True, False])
    oof = np.array([[0.2, 0.8], [0.7, 0.3]])  # rows 2 and 3, each from a stack fitted without it
    fit = Combination(Stack(np.ones(2), np.zeros(2)), "controller", 2, 1, 2, 1, 0.5, 0.5, oof=oof)
    got = reference_decisions(ref, 0.85, said, names, fit, combined_rows, [10, 11, 12, 13, 14])
    assert got["row"] == [10, 11, 12, 13, 14]
    assert got["label"] == ["a", "b", "b", "a", None]
    assert got["decided_by"] == ["consensus", "consensus", "combined", "controller", "unresolved"]
    assert got["confidence"][:4] == [0.95, 0.9, 0.8, 0.7]
    # a combination that does not pay (won <= lost) leaves the controller's answers; no threshold settles nothing
    lost = Combination(Stack(np.ones(2), np.zeros(2)), "controller", 2, 1, 1, 1, 0.5, 0.5, oof=oof)
    got = reference_decisions(ref, None, said, names, lost, combined_rows, [10, 11, 12, 13, 14])
    assert got["label"] == ["b", "b", "a", "a", None] and set(got["decided_by"]) == {"controller", "unresolved"}
