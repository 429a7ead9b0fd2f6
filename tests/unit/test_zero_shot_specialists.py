"""The specialist kinds that need no training: sentence similarity (bundled MiniLM), NLI entailment and LM
label scoring (tiny random models built here), and the config fields they add."""

from __future__ import annotations

import copy
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import SpecialistConfig, verbalise_labels
from labelwright.specialists.embedding_zero_shot import EmbeddingZeroShotSpecialist
from labelwright.specialists.encoder import Encoder
from labelwright.specialists.nli_zero_shot import entailment_index
from labelwright.specialists.registry import build_specialist, load_specialist
from tests.unit.test_embedded_llm import tiny_engine  # noqa: F401  (module-scoped fixture: a tiny Llama)
from tests.unit.test_specialists import ODD_TEXTS, assert_valid_probs, save_tiny_bert

LABELS = ["negative", "positive"]
TEXTS = ["a wonderful, moving film", "a dull and awful mess", "the plot is thin"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_round_trip(spec, directory, texts, probs):
    spec.save(directory)
    again = load_specialist(directory)
    assert type(again) is type(spec) and again.labels == spec.labels and again.version == spec.version
    assert not again.trainable
    np.testing.assert_allclose(again.predict_proba(texts), probs, atol=1e-6)
    return again


# ---- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, match",
    [
        ({"kind": "tfidf_linear", "label_texts": {"a": "x"}}, "label_texts is only used by the zero-shot kinds"),
        ({"kind": "hf_classifier", "template": "{label}"}, "template is only used by the zero-shot kinds"),
        ({"kind": "embedding_zero_shot", "template": "It is about it."}, r"no '\{label\}'"),
        ({"kind": "nli_zero_shot", "model": "some/nli", "template": "Yes."}, r"no '\{label\}'"),
        ({"kind": "lm_scorer", "model": "m/x", "template": "  "}, "template is empty"),
        ({"kind": "embedding_zero_shot", "label_texts": {"a": " "}}, r"empty texts for \['a'\]"),
        ({"kind": "embedding_zero_shot", "label_map": {"a": "b"}}, "label_map is only used"),
        ({"kind": "nli_zero_shot"}, "sentence encoder.*NLI classifier"),
        ({"kind": "lm_scorer"}, "sentence encoder.*causal LM"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ValidationError, match=match):
        SpecialistConfig(name="z", **fields)


def test_config_accepts_zero_shot_fields_and_label_texts_must_be_task_labels():
    # lm_scorer's template is an instruction, so it needs no "{label}".
    assert SpecialistConfig(name="z", kind="lm_scorer", model="m/x", template="Sentiment of a review.").template
    config = SpecialistConfig(name="z", kind="embedding_zero_shot", label_texts={"positive": "good", "upbeat": "x"})
    with pytest.raises(SpecialistError, match=r"\['upbeat'\].*\['negative', 'positive'\]"):
        build_specialist(config, LABELS)


def test_verbalise_uses_label_texts_else_the_name():
    assert verbalise_labels(["very_negative", "so-so", "x"], {"x": "an X"}) == ["very negative", "so so", "an X"]


# ---- embedding_zero_shot --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    return Encoder("minilm", max_length=64, batch_size=32)


def test_embedding_zero_shot_probs_order_and_round_trip(encoder, tmp_path):
    config = SpecialistConfig(name="ezs", kind="embedding_zero_shot", max_length=64,
                              label_texts={"negative": "a negative review", "positive": "a positive review"})
    spec = EmbeddingZeroShotSpecialist(config, LABELS, encoder=encoder)
    assert spec.hypotheses == ["This text is about a negative review.", "This text is about a positive review."]
    assert not spec.trainable and spec.version.startswith("embzs-")
    with pytest.raises(SpecialistError, match="embedding_linear"):
        spec.fit(TEXTS, ["positive", "negative", "negative"])
    probs = spec.predict_proba(TEXTS + ODD_TEXTS)
    assert_valid_probs(probs, len(TEXTS) + len(ODD_TEXTS), 2)
    assert probs[0, 1] > probs[0, 0] and probs[1, 0] > probs[1, 1]
    assert spec.predict_proba([]).shape == (0, 2)

    flipped = EmbeddingZeroShotSpecialist(config, LABELS[::-1], encoder=encoder)
    np.testing.assert_allclose(flipped.predict_proba(TEXTS), probs[: len(TEXTS), ::-1], atol=1e-6)
    other = SpecialistConfig(name="ezs", kind="embedding_zero_shot", template="{label}")
    assert EmbeddingZeroShotSpecialist(other, LABELS, encoder=encoder).version != spec.version

    again = assert_round_trip(spec, tmp_path / "ezs", TEXTS, probs[: len(TEXTS)])
    assert os.listdir(tmp_path / "ezs") == ["specialist.json"]  # the encoder is re-read from config.model
    assert again.hypotheses == spec.hypotheses


def test_embedding_zero_shot_beats_chance_on_movie_sentiment(encoder, datasets_dir):
    df = pd.read_csv(datasets_dir / "movie_sentiment" / "test.csv").head(200)
    config = SpecialistConfig(name="ezs", kind="embedding_zero_shot", max_length=64,
                              label_texts={"negative": "a negative review", "positive": "a positive review"})
    probs = EmbeddingZeroShotSpecialist(config, LABELS, encoder=encoder).predict_proba(df.text.tolist())
    accuracy = float((np.asarray(LABELS)[probs.argmax(1)] == df.label.to_numpy()).mean())
    assert accuracy > 0.58  # chance is 0.5; measured 0.650 (max_length 128 and 64 alike)


# ---- nli_zero_shot --------------------------------------------------------------------------------
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def nli_config(model, **extra):
    return SpecialistConfig(name="nli", kind="nli_zero_shot", model=model, max_length=32, batch_size=4, **extra)


def test_nli_zero_shot_is_softmax_of_entailment_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = save_tiny_bert(tmp_path / "nli", id2label=NLI_LABELS)
    labels = ["negative", "positive", "so_so"]
    spec = build_specialist(nli_config(model_dir, label_texts={"negative": "bad"}, template="It is {label}."), labels)
    assert spec.hypotheses == ["It is bad.", "It is positive.", "It is so so."]
    assert not spec.trainable and spec.version.startswith("nli-")
    with pytest.raises(SpecialistError, match="transformer_classifier"):
        spec.fit(TEXTS, ["positive"] * 3)
    probs = spec.predict_proba(TEXTS + ODD_TEXTS)  # batch_size 4 pairs: batches split a text's labels
    assert_valid_probs(probs, len(TEXTS) + len(ODD_TEXTS), 3)
    assert spec.predict_proba([]).shape == (0, 3)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            batch = tok([text] * 3, spec.hypotheses, padding=True, truncation=True, max_length=32, return_tensors="pt")
            entail = model(**batch).logits[:, 0].double()
            np.testing.assert_allclose(probs[i], torch.softmax(entail, 0).numpy(), atol=1e-5)

    flipped = build_specialist(nli_config(model_dir, label_texts={"negative": "bad"}, template="It is {label}."),
                               labels[::-1])
    np.testing.assert_allclose(flipped.predict_proba(TEXTS), probs[: len(TEXTS), ::-1], atol=1e-5)

    spec.save(tmp_path / "saved")
    shutil.rmtree(model_dir)  # the checkpoint must not depend on the original model directory
    again = load_specialist(tmp_path / "saved")
    assert again.version == spec.version and again.hypotheses == spec.hypotheses
    np.testing.assert_allclose(again.predict_proba(TEXTS), probs[: len(TEXTS)], atol=1e-6)


def test_nli_zero_shot_needs_an_entailment_label(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "sent", id2label=["NEG", "POS"])
    with pytest.raises(SpecialistError, match=r"sent' has no entailment label \(its labels are \['NEG', 'POS'\]\)"):
        build_specialist(nli_config(model_dir), LABELS)
    assert entailment_index(["not_entailment", "ENTAILMENT"], model="m") == 1
    assert entailment_index(["entailment", "not_entailment"], model="m") == 0
    with pytest.raises(SpecialistError, match="several entailment labels"):
        entailment_index(["entailment", "Entails"], model="m")


# ---- lm_scorer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_engine, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("lm") / "tiny-llama"
    tiny_engine.model.save_pretrained(directory)
    tiny_engine.tokenizer.save_pretrained(directory)
    return str(directory)


def lm_config(model, **extra):
    return SpecialistConfig(name="lm", kind="lm_scorer", model=model, max_length=32, **extra)


def test_lm_scorer_probs_follow_choose_and_round_trip(tiny_lm_dir, tiny_engine, tmp_path):  # noqa: F811
    labels = ["positive", "negative", "Sports"]
    config = lm_config(tiny_lm_dir, label_texts={"positive": "liked it"}, template="Sentiment of a review.")
    spec = build_specialist(config, labels)
    assert not spec.trainable and spec.version.startswith("lm-")
    with pytest.raises(SpecialistError, match="transformer_classifier"):
        spec.fit(TEXTS, ["positive"] * 3)
    system = spec.messages("x")[0]["content"]
    assert system.startswith("Sentiment of a review.") and "- positive: liked it" in system
    probs = spec.predict_proba(TEXTS + ODD_TEXTS)
    assert_valid_probs(probs, len(TEXTS) + len(ODD_TEXTS), 3)
    assert spec.predict_proba([]).shape == (0, 3)
    for i, text in enumerate(TEXTS):
        messages = spec.messages(text)
        # Columns in task-label order, each exp of the engine's constrained log-prob of that label.
        expected = [math.exp(lp) for lp in tiny_engine.label_logprobs(messages, "label", labels)]
        np.testing.assert_allclose(probs[i], expected, atol=1e-5)
        assert labels[int(probs[i].argmax())] == tiny_engine.choose(messages, "label", labels).label

    again = assert_round_trip(spec, tmp_path / "lm", TEXTS, probs[: len(TEXTS)])
    assert os.listdir(tmp_path / "lm") == ["specialist.json"]  # the model is re-resolved from config.model
    assert again.instruction == "Sentiment of a review."


def test_lm_scorer_default_instruction_and_chat_template_required(tiny_engine, tmp_path):  # noqa: F811
    from labelwright.specialists.prompts import DEFAULT_INSTRUCTION
    from labelwright.specialists.lm_scorer import LMScorerSpecialist

    tokenizer = copy.deepcopy(tiny_engine.tokenizer)
    tokenizer.chat_template = None
    plain = tmp_path / "plain"
    tiny_engine.model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    with pytest.raises(SpecialistError, match="no chat template"):
        build_specialist(lm_config(str(plain)), LABELS)
    # An engine can be handed in (no loading); without a template the instruction is the controller's default.
    scorer = LMScorerSpecialist(lm_config("unused/hub-id"), LABELS, engine=tiny_engine)
    assert scorer.messages("x")[0]["content"].startswith(DEFAULT_INSTRUCTION)
