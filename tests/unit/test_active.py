import numpy as np
import pytest

from labelwright.orchestrator.active import ActiveSettings, ActiveState, cohen_kappa, run_active

LABELS = ["a", "b", "c"]


def _pool(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(3, size=n)
    X = np.eye(3, 12)[y] * 2 + rng.normal(size=(n, 12)) * 0.7
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


class Oracle:
    """An annotator right on every row but the ones listed; counts what it was asked."""

    def __init__(self, y, wrong=(), fail_after=None, calls_per_row=1):
        self.y, self.wrong, self.fail_after, self.cpr = y, set(wrong), fail_after, calls_per_row
        self.asked: list[int] = []

    def __call__(self, pos, probs):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.asked += [int(p) for p in pos]
        return [(LABELS[(self.y[p] + (1 if p in self.wrong else 0)) % 3], self.cpr, {}) for p in pos]


def test_cohen_kappa_matches_the_worked_example():
    # Two raters, 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = np.array([1] * 25 + [0] * 25)
    b = np.array([1] * 20 + [0] * 5 + [1] * 10 + [0] * 15)
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0


@pytest.mark.parametrize("strategy", ["random", "entropy", "kmeans", "kcenter", "hybrid", "margin"])
def test_the_budget_is_spent_exactly_and_no_row_is_bought_twice(strategy):
    X, y = _pool()
    oracle = Oracle(y)
    state = ActiveState()
    probs, weights = run_active(X, LABELS, ask=oracle, max_calls=45, settings=ActiveSettings(acquisition=strategy,
                                rounds=4), state=state, log=lambda m: None)
    assert state.spent == 45 == len(oracle.asked) == len(set(oracle.asked))
    assert sorted(state.pos) == sorted(oracle.asked)
    assert probs.shape == (300, 3)
    assert (probs.argmax(1) == y).mean() > 0.9  # separable blobs: a few dozen right labels teach it
    assert set(weights) == set(state.pos) and set(weights.values()) == {1.0}
    assert [r["round"] for r in state.rounds if "asked" in r and not r.get("final_top_up")] == [1, 2, 3, 4]


def test_rows_that_cost_two_calls_never_overshoot_by_more_than_a_batch():
    X, y = _pool()
    state = ActiveState()
    oracle = Oracle(y, calls_per_row=2)
    run_active(X, LABELS, ask=oracle, max_calls=40, settings=ActiveSettings(batch_per_round=5), state=state,
               log=lambda m: None)
    assert 40 <= state.spent < 40 + 2 * 5


def test_a_killed_run_goes_on_without_buying_a_row_twice(tmp_path):
    X, y = _pool()
    path = tmp_path / "active.json"
    first = Oracle(y, fail_after=20)
    with pytest.raises(KeyboardInterrupt):
        run_active(X, LABELS, ask=first, max_calls=60, settings=ActiveSettings(rounds=6), state=ActiveState(),
                   save=lambda s: s.save(path), log=lambda m: None)
    saved = ActiveState.load(path)
    assert saved.spent == 20 and saved.batch == 10 and not saved.done
    second = Oracle(y)
    state = ActiveState.load(path)
    run_active(X, LABELS, ask=second, max_calls=60, settings=ActiveSettings(rounds=6), state=state,
               save=lambda s: s.save(path), log=lambda m: None)
    assert not set(second.asked) & set(first.asked)
    assert state.spent == 60 and len(set(state.pos)) == 60
    assert ActiveState.load(path).pos == state.pos


def test_stable_predictions_stop_the_rounds_and_the_rest_buys_the_least_confident_rows():
    X, y = _pool()
    state = ActiveState()
    run_active(X, LABELS, ask=Oracle(y), max_calls=60, settings=ActiveSettings(batch_per_round=10, stop_kappa=0.5),
               state=state, log=lambda m: None)
    stop = next(r for r in state.rounds if "stopped" in r)
    assert stop["stopped"] == "predictions stable" and stop["kappa"] >= 0.5
    top_up = state.rounds[-1]
    assert top_up.get("final_top_up") and top_up["asked"] == 60 - stop["round"] * 10
    assert state.spent == 60


def test_reweighting_gives_the_wrong_answers_less_weight():
    X, y = _pool(400, seed=2)
    wrong = set(range(0, 400, 7))
    state = ActiveState()
    _, weights = run_active(X, LABELS, ask=Oracle(y, wrong=wrong), max_calls=80,
                            settings=ActiveSettings(acquisition="random", rounds=2, reweight=True), state=state,
                            reference=(X[-30:], y[-30:]), log=lambda m: None)
    bad = [w for p, w in weights.items() if p in wrong]
    good = [w for p, w in weights.items() if p not in wrong]
    assert bad and np.mean(bad) < 0.2 * np.mean(good)


def test_the_shortlist_takes_the_models_top_half_then_the_nearest_labels():
    from labelwright.orchestrator.active import shortlist

    labels = list("abcdef")
    probs = np.array([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02]])
    similarity = np.array([[0.0, 0.9, 0.0, 0.8, 0.7, 0.0]])
    assert shortlist(probs, similarity, labels, 4) == [["a", "b", "d", "e"]]  # b twice counts once
    assert shortlist(probs, None, labels, 3) == [["a", "b", "c"]]
    assert shortlist(None, similarity, labels, 2) == [["b", "d"]]
    assert sorted(shortlist(probs, similarity, labels, 6)[0]) == labels  # every label once


def test_every_round_scores_the_check_rows_and_the_curve_is_drawn(tmp_path):
    from labelwright.orchestrator.report import plot_rounds

    X, y = _pool()
    state = ActiveState()
    run_active(X[:250], LABELS, ask=Oracle(y), max_calls=40, settings=ActiveSettings(rounds=4), state=state,
               check=(X[250:], y[250:]), gold=[LABELS[v] for v in y[:250]], log=lambda m: None)
    fitted = [r for r in state.rounds if "asked" in r and not r.get("final_top_up")]
    assert fitted[0]["check_accuracy"] is None  # nothing bought before the first round: no model yet
    assert all(r["check_accuracy"] is not None for r in fitted[1:])
    assert state.rounds[-1]["stopped"] == "budget spent" and state.rounds[-1]["check_accuracy"] > 0.9
    png = plot_rounds(state.rounds, tmp_path / "rounds.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
