"""Candidate annotation: answers as sets, the distribution refinery, training on sets (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labelwright.orchestrator.candidates import candidate_sets
from labelwright.orchestrator.controller import Controller, ControllerConfig
from labelwright.specialists import prompts
from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.registry import build_specialist
from labelwright.specialists.transformer_classifier import train_loop
from labelwright.training.distill import Refinery, candidate_mask, refine_targets
from tests.fake_openai import FakeOpenAI, candidate_oracle, script

LABELS = ["positive", "negative", "neutral"]
NONE = Refinery(delta=0.0)  # no sharpening: the other rules alone


# ------------------------------------------------------------------ parsing the controller's sets


@pytest.mark.parametrize("content, expected", [
    ('{"labels": ["negative", "neutral"]}', ["negative", "neutral"]),
    ('```json\n{"labels": ["Neutral"]}\n```', ["neutral"]),
    ('["positive", "positive", "negative"]', ["positive", "negative"]),  # a label twice counts once
    ('{"label": "negative"}', ["negative"]),  # a single-label answer is a set of one
    ("neutral", ["neutral"]),
])
def test_valid_candidate_answers(content, expected):
    assert prompts.parse_candidates(content, LABELS, max_candidates=2) == (expected, None)


@pytest.mark.parametrize("content, problem", [
    ('{"labels": []}', "empty"),
    ('{"labels": ["positive", "sarcastic"]}', "'sarcastic' is not one of the allowed labels"),
    ('{"labels": ["positive", "negative", "neutral"]}', "at most 2"),
    ('{"labels": [3]}', "not one of the allowed labels"),
    ("", "empty"),
    ("I would say it is mixed", "not the JSON object"),
])
def test_invalid_candidate_answers_say_why(content, problem):
    labels, why = prompts.parse_candidates(content, LABELS, max_candidates=2)
    assert labels is None and problem in why


def test_candidates_prompt_and_schema():
    messages, _ = prompts.build_messages("meh", instruction="", labels=LABELS, demonstrations=[("great", "positive")],
                                         max_candidates=2)
    assert "If you are unsure, include the other potential choices" in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"labels": ["positive"]}  # demonstrations answer as sets
    fmt = prompts.response_format("json_schema", LABELS, max_candidates=2)
    prop = fmt["json_schema"]["schema"]["properties"]["labels"]
    assert prop["items"]["enum"] == LABELS and prop["minItems"] == 1 and prop["maxItems"] == 2


# ------------------------------------------------------------------ the controller in candidates mode


def _controller(url, tmp_path, **extra) -> Controller:
    settings = {"base_url": url, "model": "fake", "backoff_s": 0.001, "max_retries": 0, "cache": True,
                "cache_path": str(tmp_path / "c.sqlite"), "mode": "candidates", "max_candidates": 2, **extra}
    cfg = ControllerConfig(**settings)
    return Controller(cfg, labels=LABELS)


def test_controller_answers_sets_first_label_first_and_caches_them(tmp_path):
    sets = {"meh": ["neutral", "negative"], "great": ["positive"]}
    with FakeOpenAI(candidate_oracle(sets)) as fake:
        ctrl = _controller(fake.base_url, tmp_path)
        answers = ctrl.label_many(["meh", "great"])
        assert [(a.label, a.candidates) for a in answers] == [("neutral", ["neutral", "negative"]),
                                                              ("positive", ["positive"])]
        schema = fake.requests[0]["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["labels"]["maxItems"] == 2
        again = ctrl.label("meh")
        assert again.cached and again.candidates == ["neutral", "negative"] and fake.chat_calls == 2
        ctrl.close()


@pytest.mark.parametrize("bad", [[], ["positive", "sarcastic"], ["positive", "negative", "neutral"]])
def test_a_bad_set_gets_one_repair_round_then_is_unresolved(tmp_path, bad):
    first = script(candidate_oracle({"meh": bad}), candidate_oracle({"meh": ["neutral"]}))
    with FakeOpenAI(first) as fake:
        ctrl = _controller(fake.base_url, tmp_path, cache=False)
        answer = ctrl.label("meh")
        assert answer.candidates == ["neutral"] and answer.calls == 2
        assert "1 to 2 different labels" in fake.requests[1]["messages"][-1]["content"]
        ctrl.close()
    with FakeOpenAI(candidate_oracle({"meh": bad})) as fake:
        ctrl = _controller(fake.base_url, tmp_path, cache=False)
        answer = ctrl.label("meh")
        assert answer.label is None and answer.candidates is None and "after one repair round" in answer.reason
        ctrl.close()


# ------------------------------------------------------------------ the refinery, by hand


def test_targets_are_the_prediction_renormalised_over_the_set():
    probs = np.array([[0.5, 0.3, 0.2]])
    targets, keep = refine_targets(probs, np.array([[True, True, False]]), NONE)
    assert keep.tolist() == [True]
    assert targets[0] == pytest.approx([0.625, 0.375, 0.0])


def test_an_out_of_set_prediction_is_filtered_unless_above_tau():
    mask = np.array([[True, True, False], [True, True, False]])
    probs = np.array([[0.2, 0.1, 0.7],      # predicted outside its set, not sure: left out
                      [0.01, 0.01, 0.98]])  # predicted outside, above tau 0.95: the set was wrong
    targets, keep = refine_targets(probs, mask, NONE)
    assert keep.tolist() == [False, True]
    assert targets[1].tolist() == [0.0, 0.0, 1.0]


def test_the_smallest_loss_share_of_each_predicted_class_is_sharpened():
    mask = np.ones((4, 2), bool)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    targets, keep = refine_targets(probs, mask, Refinery(delta=0.5, gamma=0.5))
    assert keep.all()
    # class 0 is predicted for rows 0-2: floor(0.5 * 3) = 1 row, the one with the smallest loss (row 0), is
    # sharpened to q^2 renormalised; class 1 has one row, floor(0.5) = 0: none
    assert targets[0] == pytest.approx([0.81 / 0.82, 0.01 / 0.82])
    assert targets[1] == pytest.approx([0.6, 0.4]) and targets[2] == pytest.approx([0.8, 0.2])
    assert targets[3] == pytest.approx([0.3, 0.7])


def test_a_set_of_one_stays_one_hot():
    targets, keep = refine_targets(np.array([[0.6, 0.4]]), np.array([[True, False]]), Refinery())
    assert keep.all() and targets[0].tolist() == [1.0, 0.0]


def test_candidate_mask_names_the_bad_row():
    assert candidate_mask([["a"], ["b", "a"]], ["a", "b"]).tolist() == [[True, False], [True, True]]
    with pytest.raises(SpecialistError, match="row 1 has an empty candidate set"):
        candidate_mask([["a"], []], ["a", "b"])
    with pytest.raises(SpecialistError, match="row 0 has candidate 'c'"):
        candidate_mask([["c"]], ["a", "b"])


def test_candidate_sets_read_back_from_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame({"candidates": [["a", "b"], None, ["c"]]}).to_parquet(tmp_path / "x.parquet")
    assert candidate_sets(pd.read_parquet(tmp_path / "x.parquet")["candidates"]) == [["a", "b"], [], ["c"]]


# ------------------------------------------------------------------ training on sets


def test_training_on_sets_learns_the_label_the_sets_share(tiny_bert):
    """Each text's set holds its true label and a decoy that changes from row to row; with the refinery the
    student learns the label the sets agree on."""
    torch.set_num_threads(1)
    texts = ["great fun", "awful mess", "a joy to watch", "dull and bad", "lovely", "boring"] * 4
    gold = [0, 1, 0, 1, 0, 1] * 4
    mask = np.zeros((len(texts), 3), bool)
    mask[np.arange(len(texts)), gold] = True
    mask[np.arange(len(texts)), 2] = np.arange(len(texts)) % 2 == 0  # the decoy in half the sets
    config = SpecialistConfig(name="student", kind="transformer_classifier", model=tiny_bert, max_length=16,
                              batch_size=8, epochs=15, lr=3e-3)
    spec = build_specialist(config, LABELS)
    refined = []

    def refine(probs, m):
        refined.append(probs.copy())
        return refine_targets(probs, m, Refinery())

    losses = train_loop(spec, texts, mask.argmax(1), epochs=15, lr=3e-3, candidate_mask=mask, refine=refine)
    assert len(losses) == 15 and len(refined) == 14 and np.isfinite(losses).all()
    probs = spec.predict_proba(texts)
    restricted = np.where(mask, probs, -1).argmax(1)
    assert (restricted == np.array(gold)).mean() == 1.0


def test_a_mask_of_the_wrong_shape_is_refused(tiny_bert):
    config = SpecialistConfig(name="student", kind="transformer_classifier", model=tiny_bert, max_length=16)
    spec = build_specialist(config, LABELS)
    with pytest.raises(SpecialistError, match="candidate_mask must be rows x labels"):
        train_loop(spec, ["a", "b"], np.zeros(2, int), epochs=1, candidate_mask=np.zeros((2, 3), bool))


def test_the_student_decides_only_where_gold_reference_rows_show_it_beats_the_first_candidate():
    from labelwright.orchestrator.candidates import _where_the_student_decides

    sets = [["a", "b"], ["b", "a"], ["a", "b"], ["a", "b", "c"], ["c", "a"]]
    gold = np.array(["b", "b", "a", None, "c"], dtype=object)
    ref = np.array([True, True, True, False, False])
    no_gold = np.full(5, None)
    multi = np.arange(5)
    # on the three reference rows: row 0 won (b, the first was a), row 1 tied (both right), row 2 lost
    decide, why = _where_the_student_decides(multi, sets, ["b", "b", "b", "c", "a"], gold, ref, 3)
    assert why["reference_rows"] == 3 and (why["won"], why["lost"]) == (1, 1) and not why["used"]
    assert not decide.any()
    decide, why = _where_the_student_decides(multi, sets, ["b", "b", "a", "c", "a"], gold, ref, 3)
    assert why["used"] and decide.all() and (why["won"], why["lost"]) == (1, 0)
    # no gold: only sets that leave a label out (a set of all three says nothing to choose within)
    decide, why = _where_the_student_decides(multi, sets, ["b"] * 5, no_gold, ref, 3)
    assert why["reference_rows"] == 0 and decide.tolist() == [True, True, True, False, True]
    decide, _ = _where_the_student_decides(multi[:3], sets, ["b"] * 3, no_gold, ref, 2)
    assert not decide.any()  # binary: every set of two holds every label
