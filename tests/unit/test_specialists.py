"""Specialists on small real data (movie_sentiment train -> dev) and on tiny models the tests build."""

from __future__ import annotations

import json

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.encoder import Encoder, resolve_model
from labelwright.specialists.hf_classifier import build_label_matrix, map_native_probs
from labelwright.specialists.registry import build_specialist, load_specialist
from labelwright.specialists.linear_head import fit_linear_head, predict_linear_head

LABELS = ["negative", "positive"]
ODD_TEXTS = ["", None, "word " * 20_000, "\u00e9\u00e8 \U0001f600 \t\n"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def movie(datasets_dir):
    train = pd.read_csv(datasets_dir / "movie_sentiment" / "train.csv").sample(300, random_state=0)
    dev = pd.read_csv(datasets_dir / "movie_sentiment" / "dev.csv").head(200)
    return train.text.tolist(), train.label.tolist(), dev.text.tolist(), dev.label.to_numpy()


def accuracy(probs: np.ndarray, gold: np.ndarray, labels=LABELS) -> float:
    return float((np.asarray(labels)[probs.argmax(1)] == gold).mean())


def assert_valid_probs(probs: np.ndarray, n: int, k: int) -> None:
    assert probs.dtype == np.float32 and probs.shape == (n, k)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def save_tiny_bert(directory, *, id2label=None, seed=0):
    """A 2-layer BERT (random weights) with the bundled MiniLM tokenizer, saved with save_pretrained."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    kwargs = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(seed)
    if id2label is None:
        model = BertModel(BertConfig(**kwargs))
    else:
        config = BertConfig(**kwargs, id2label=dict(enumerate(id2label)),
                            label2id={v: k for k, v in enumerate(id2label)})
        model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


# ---- config ----------------------------------------------------------------------------------------
def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="name"):
        SpecialistConfig(name="has space", kind="tfidf_linear")
    with pytest.raises(ValidationError, match="label_map"):
        SpecialistConfig(name="a", kind="tfidf_linear", label_map={"x": "y"})
    with pytest.raises(ValidationError, match="epoch"):
        SpecialistConfig(name="a", kind="tfidf_linear", epoch=3)
    with pytest.raises(ValidationError, match="max_replicas"):
        SpecialistConfig(name="a", kind="tfidf_linear", autoscaling={"min_replicas": 3, "max_replicas": 1})
    assert SpecialistConfig(name="ok-1_a", kind="hf_classifier", label_map={"POS": "positive"}).label_map


def test_resolve_model(tmp_path):
    assert (tmp_path.__class__(resolve_model("minilm")) / "config.json").is_file()
    assert resolve_model("org/some-model") == "org/some-model"
    with pytest.raises(SpecialistError, match="does not exist"):
        resolve_model("./no/such/model")
    with pytest.raises(SpecialistError, match="config.json"):
        resolve_model(str(tmp_path))


# ---- the linear maths -------------------------------------------------------------------------------
def test_logistic_regression_weights_and_unseen_class():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    W, b = fit_linear_head(X, y, 3, l2=1e-3)
    probs = predict_linear_head(X, W, b)
    assert_valid_probs(probs, 80, 3)
    assert (probs.argmax(1) == y).mean() > 0.95
    assert probs[:, 2].max() < 0.05  # class 2 was never seen
    # zero weight is the same as leaving the row out
    w = np.r_[np.ones(50), np.zeros(30)].astype(np.float32)
    W1, b1 = fit_linear_head(X, y, 3, sample_weight=w, l2=1e-2)
    W2, b2 = fit_linear_head(X[:50], y[:50], 3, l2=1e-2)
    np.testing.assert_allclose(predict_linear_head(X, W1, b1), predict_linear_head(X, W2, b2), atol=1e-3)


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_head_minimises_the_weighted_mean_loss_plus_l2(classes):
    """scikit-learn's C is set so that its optimum is ours: the gradient of mean weighted cross-entropy +
    l2/2 |W|^2 vanishes there (for two classes, at the centred two-column form of its one vector)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 4))
    y = rng.integers(0, classes, 120)
    X[np.arange(120), y] += 1.0
    w = rng.uniform(0.2, 3.0, 120)
    l2 = 0.05
    W, b = fit_linear_head(X, y, classes, sample_weight=w, l2=l2)
    W = W.astype(np.float64) - W.mean(1, keepdims=True)  # same softmax; the penalty's minimiser among them
    p = predict_linear_head(X, W, b).astype(np.float64)
    onehot = np.eye(classes)[y]
    grad = X.T @ ((p - onehot) * (w / w.sum())[:, None]) + l2 * W
    assert np.abs(grad).max() < 1e-4


# ---- tfidf_linear ---------------------------------------------------------------------------------
def test_tfidf_linear_learns_saves_and_versions(movie, tmp_path):
    texts, labels, dev_texts, dev_gold = movie
    spec = build_specialist(SpecialistConfig(name="tfidf", kind="tfidf_linear"), LABELS)
    assert spec.trainable and spec.version == "tfidf-untrained"
    with pytest.raises(SpecialistError, match="not trained"):
        spec.predict_proba(["x"])
    spec.fit(texts, labels)
    probs = spec.predict_proba(dev_texts)
    assert_valid_probs(probs, len(dev_texts), 2)
    assert accuracy(probs, dev_gold) > 0.58  # chance is 0.5; measured ~0.64 at 300 rows
    assert_valid_probs(spec.predict_proba(ODD_TEXTS), len(ODD_TEXTS), 2)
    assert spec.predict_proba([]).shape == (0, 2)

    spec.save(tmp_path / "s")
    again = load_specialist(tmp_path / "s")
    assert type(again) is type(spec) and again.version == spec.version and again.labels == LABELS
    np.testing.assert_array_equal(again.predict_proba(dev_texts[:50]), probs[:50])

    first = spec.version
    spec.fit(texts[:150], labels[:150])
    assert spec.version != first and spec.version.startswith("tfidf-")


def test_a_tfidf_checkpoint_of_the_hand_written_vectorizer_is_refused_with_what_to_do(movie, tmp_path):
    texts, labels, _, _ = movie
    spec = build_specialist(SpecialistConfig(name="tfidf", kind="tfidf_linear"), LABELS)
    spec.fit(texts[:60], labels[:60])
    spec.save(tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "specialist.json").read_text())
    manifest.pop("written_by")  # labelwright 0.1 recorded no version
    (tmp_path / "old" / "specialist.json").write_text(json.dumps(manifest))
    (tmp_path / "old" / "tfidf.json").rename(tmp_path / "old" / "vectorizer.json")
    with pytest.raises(SpecialistError, match="written by labelwright 0.1.*--fresh"):
        load_specialist(tmp_path / "old")


def test_tfidf_sample_weight_changes_the_fit(movie):
    texts, labels, dev_texts, _ = movie
    weights = [5.0 if lab == "positive" else 0.2 for lab in labels]
    plain = build_specialist(SpecialistConfig(name="a", kind="tfidf_linear"), LABELS)
    weighted = build_specialist(SpecialistConfig(name="b", kind="tfidf_linear"), LABELS)
    plain.fit(texts, labels)
    weighted.fit(texts, labels, sample_weight=weights)
    assert weighted.predict_proba(dev_texts)[:, 1].mean() > plain.predict_proba(dev_texts)[:, 1].mean() + 0.1


def test_unseen_label_and_single_class(movie):
    texts, labels, dev_texts, _ = movie
    spec = build_specialist(SpecialistConfig(name="a", kind="tfidf_linear"), ["negative", "neutral", "positive"])
    spec.fit(texts, labels)
    probs = spec.predict_proba(dev_texts)
    assert_valid_probs(probs, len(dev_texts), 3)
    assert probs[:, 1].max() < 0.05

    only_pos = [t for t, lab in zip(texts, labels) if lab == "positive"][:40]
    single = build_specialist(SpecialistConfig(name="b", kind="tfidf_linear"), LABELS)
    with pytest.warns(RuntimeWarning, match="only 1 class"):
        single.fit(only_pos, ["positive"] * len(only_pos))
    probs = single.predict_proba(dev_texts[:10])
    assert_valid_probs(probs, 10, 2)
    assert (probs.argmax(1) == 1).all() and probs[:, 1].max() < 0.99


def test_fit_rejects_bad_training_sets():
    spec = build_specialist(SpecialistConfig(name="a", kind="tfidf_linear"), LABELS)
    with pytest.raises(SpecialistError, match="row 1: 'neutral'"):
        spec.fit(["a", "b"], ["positive", "neutral"])
    with pytest.raises(SpecialistError, match="sample_weight"):
        spec.fit(["a", "b"], ["positive", "negative"], sample_weight=[1.0, -1.0])
    with pytest.raises(SpecialistError, match="2 texts but 1 labels"):
        spec.fit(["a", "b"], ["positive"])
    with pytest.raises(SpecialistError, match="repeat"):
        build_specialist(SpecialistConfig(name="a", kind="tfidf_linear"), ["x", "x"])


# ---- embedding_linear -----------------------------------------------------------------------------
def test_embedding_linear_learns_and_round_trips(movie, tmp_path):
    texts, labels, dev_texts, dev_gold = movie
    config = SpecialistConfig(name="emb", kind="embedding_linear", max_length=64)
    spec = build_specialist(config, LABELS)
    spec.fit(texts[:120], labels[:120])
    probs = spec.predict_proba(dev_texts[:80])
    assert_valid_probs(probs, 80, 2)
    assert accuracy(probs, dev_gold[:80]) > 0.65
    assert_valid_probs(spec.predict_proba(ODD_TEXTS), len(ODD_TEXTS), 2)
    spec.save(tmp_path / "e")
    again = load_specialist(tmp_path / "e")
    again._encoder = spec.encoder  # same weights; skips a second load
    assert again.version == spec.version != "emb-untrained"
    np.testing.assert_allclose(again.predict_proba(dev_texts[:20]), probs[:20], atol=1e-6)


def test_the_probe_hands_over_the_embeddings_it_voted_with(movie, tmp_path):
    """Asked for the embeddings of the encoder it uses, the probe's replica returns them with its probabilities
    (the same vectors the controller's demonstration encoder computes; out-of-fold probabilities kept); asked for
    another encoder's, only probabilities."""
    from labelwright.specialists.deployment import SpecialistReplica
    from labelwright.specialists.encoder import Encoder, encoder_key

    texts, labels, dev_texts, _ = movie
    spec = build_specialist(SpecialistConfig(name="probe", kind="embedding_linear"), LABELS)
    folds = np.array([i % 3 for i in range(30)] + [-1] * 30)
    spec.cross_fit(texts[:60], labels[:60], folds=folds)
    spec.save(tmp_path / "probe")
    replica = SpecialistReplica()
    replica.reconfigure({"checkpoint": str(tmp_path / "probe")})
    asked = texts[:3] + dev_texts[:5]  # three it was cross-fitted on, five it never saw
    plain = replica.predict(asked)
    both = replica.predict(asked, embeddings_of=encoder_key("minilm", 128))
    assert "embeddings" not in plain and spec.embeds == encoder_key("minilm", 128)
    np.testing.assert_allclose(both["probs"], plain["probs"], atol=1e-6)
    np.testing.assert_allclose(both["probs"][:3], spec.out_of_fold[1][:3], atol=1e-6)  # not the in-sample fit
    np.testing.assert_allclose(both["embeddings"], Encoder("minilm").encode(asked), atol=1e-5)
    assert "embeddings" not in replica.predict(asked, embeddings_of=encoder_key("minilm", 256))


def test_encoder_embeddings_are_normalised():
    enc = Encoder(max_length=32, batch_size=4)
    emb = enc.encode(["a good film", "", "a bad film", "a good movie"])
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[3] > emb[0] @ emb[2] - 0.2  # sanity, not a benchmark


def save_tiny_causal_lm(directory, *, layers=6, seed=0):
    """A Qwen2-style causal LM (random weights, ``layers`` layers) with the bundled MiniLM tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         architectures=["Qwen2ForCausalLM"])
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_causal_lm_embeds_the_state_at_the_prompts_end_whatever_the_padding(tmp_path):
    """A causal LM's embedding is its state after 5/6 of its layers (the rest are not kept) at the last token of
    the prompt: the same alone as in a padded batch; a text past max_length is cut, never the prompt's end."""
    from labelwright.specialists.encoder import LM_PROMPT

    enc = Encoder(save_tiny_causal_lm(tmp_path / "lm"), max_length=16, batch_size=3)
    assert enc.causal and not enc.normalised and enc.layer == 5 and len(enc.model.layers) == 5
    texts = ["a good film", "a much longer text about a very bad film indeed", "", "word " * 500]
    together = enc.encode(texts)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert together.shape == (4, 32) and np.isfinite(together).all()
    ids = enc._batch(["word " * 500])["input_ids"][0].tolist()
    end = enc.tokenizer(LM_PROMPT.format(text="word"), add_special_tokens=True)["input_ids"][-6:]
    assert ids[-6:] == end  # the prompt's last tokens survive the cut
    np.testing.assert_allclose(enc.encode(["word " * 500 + "bad"]), together[3:], atol=1e-5)  # cut past 16 tokens


def test_smollm2_is_cut_at_its_measured_depth_and_other_lms_at_the_default():
    """The bundled SmolLM2-135M keeps 18 of its 30 layers (the depth measured best for it); a model without a
    measured depth keeps 5/6 (the tiny LM above: 5 of 6)."""
    from labelwright.specialists.encoder import LM_LAYER_SHARES

    enc = Encoder("smollm2-135m-instruct", batch_size=4)
    assert LM_LAYER_SHARES["smollm2-135m-instruct"] == 3 / 5
    assert enc.causal and enc.layer == 18 and len(enc.model.layers) == 18 and enc.dim == 576
    vectors = enc.encode(["a wonderful film", "a dreadful film"])
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all() and not np.allclose(vectors[0], vectors[1])


def test_a_shared_encoder_embeds_a_text_once_while_it_remembers_and_forgets_the_least_recent_first(tmp_path):
    """One encoder per model and cut in a process; with ``remember_embeddings`` it embeds only texts it has not
    seen (a text twice in one call once), gives the same vectors as embedding them afresh, keeps within its bytes
    (least recently used out first), and forgets everything when switched off."""
    from labelwright.specialists.encoder import remember_embeddings, shared_encoder

    model = save_tiny_causal_lm(tmp_path / "lm")
    enc = shared_encoder(model, max_length=16, batch_size=2)
    assert shared_encoder(model, max_length=16) is enc and shared_encoder(model, max_length=8) is not enc
    embedded: list[str] = []
    plain = enc._encode
    enc._encode = lambda texts: (embedded.extend(texts), plain(texts))[1]
    texts = ["a good film", "a bad film", "a good film", "dull", ""]
    try:
        first = enc.encode(texts)
        assert embedded == texts  # not remembering: every text, every time
        remember_embeddings(3 * enc.dim * 4)  # room for three rows
        embedded.clear()
        np.testing.assert_allclose(enc.encode(texts), first, atol=1e-5)
        assert sorted(embedded) == sorted(set(texts))  # each distinct text once
        embedded.clear()
        # kept: the last three used ("a good film" again after "a bad film"); then "a good film" is the least recent
        again = enc.encode(["dull", "", "new"])
        assert embedded == ["new"] and len(enc._memo) == 3
        np.testing.assert_allclose(again[:2], first[[3, 4]], atol=1e-5)
        enc.encode(["a good film"])
        assert embedded == ["new", "a good film"]
    finally:
        remember_embeddings(0)
    assert not enc._memo and enc.memo_bytes == 0


def test_a_head_fitted_on_standardised_features_predicts_from_the_raw_ones():
    """A causal LM's states have a few huge columns: the head standardises them, so the small informative column
    is learned (normalised as a sentence encoder's rows, the huge column drowns it), and the checkpoint stays W, b."""
    from labelwright.specialists.embedding_linear import EmbeddingLinearSpecialist

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    X = np.column_stack([rng.normal(300, 50, 200), rng.normal(0, 1, (200, 6)), 0.05 * (2 * y - 1)
                         + rng.normal(0, 0.01, 200)]).astype(np.float32)

    class StateEncoder:
        normalised = False

        def encode(self, texts):
            return X[[int(t) for t in texts]]

    spec = EmbeddingLinearSpecialist(SpecialistConfig(name="lm", kind="embedding_linear"), LABELS,
                                     encoder=StateEncoder())
    texts = [str(i) for i in range(200)]
    spec.fit(texts[:120], [LABELS[v] for v in y[:120]])
    assert accuracy(spec.predict_proba(texts[120:]), np.asarray(LABELS)[y[120:]]) > 0.95
    assert spec.W.shape == (8, 2) and spec.l2 == 1e-4
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)  # as a sentence encoder's are, without standardising
    raw = predict_linear_head(unit[120:], *fit_linear_head(unit[:120], y[:120], 2, l2=1e-3))
    assert accuracy(raw, np.asarray(LABELS)[y[120:]]) < 0.75  # what standardising buys
    oof = spec.cross_fit(texts[:120], [LABELS[v] for v in y[:120]], folds=np.arange(120) % 4)
    assert accuracy(oof, np.asarray(LABELS)[y[:120]]) > 0.95


# ---- transformer_classifier (tiny model built here) ------------------------------------------------
def test_transformer_classifier_round_trip_and_version(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "tiny")
    config = SpecialistConfig(name="tfm", kind="transformer_classifier", model=model_dir, epochs=1,
                              max_length=32, batch_size=8)
    spec = build_specialist(config, LABELS)
    untrained = spec.version
    texts = ["great fun", "awful mess", "a joy", "dull and bad"] * 4
    spec.fit(texts, ["positive", "negative", "positive", "negative"] * 4)
    assert spec.version != untrained and spec.version.startswith("tfm-")
    probs = spec.predict_proba(texts + ODD_TEXTS)
    assert_valid_probs(probs, len(texts) + len(ODD_TEXTS), 2)
    spec.save(tmp_path / "saved")
    shutil.rmtree(model_dir)  # the checkpoint must not depend on the original model directory
    again = load_specialist(tmp_path / "saved")
    assert again.version == spec.version
    np.testing.assert_allclose(again.predict_proba(texts), probs[: len(texts)], atol=1e-6)


# ---- hf_classifier ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("hf") / "clf", id2label=["NEG", "POS", "NEU", "MIXED"])


def test_hf_classifier_label_map_validation(tiny_classifier):
    config = SpecialistConfig(name="hf", kind="hf_classifier", model=tiny_classifier,
                              label_map={"NEG": "negative", "NOPE": "positive"})
    with pytest.raises(SpecialistError, match=r"NOPE.*\['NEG', 'POS', 'NEU', 'MIXED'\]"):
        build_specialist(config, LABELS)
    config = SpecialistConfig(name="hf", kind="hf_classifier", model=tiny_classifier,
                              label_map={"NEG": "negative", "POS": "upbeat"})
    with pytest.raises(SpecialistError, match="upbeat"):
        build_specialist(config, LABELS)


def test_hf_classifier_maps_sums_and_renormalises(tiny_classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = SpecialistConfig(name="hf", kind="hf_classifier", model=tiny_classifier, max_length=32,
                              label_map={"NEG": "negative", "MIXED": "negative", "POS": "positive"})
    labels = ["negative", "positive", "neutral"]
    with pytest.warns(RuntimeWarning, match="neutral"):
        spec = build_specialist(config, labels)
    assert not spec.trainable
    with pytest.raises(SpecialistError, match="cannot be trained"):
        spec.fit(["a"], ["positive"])
    texts = ["a fine film", "terrible", "", "so-so"]
    probs = spec.predict_proba(texts)
    assert_valid_probs(probs, 4, 3)

    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        native = torch.softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits.double(), -1).numpy()
    kept = np.stack([native[:, 0] + native[:, 3], native[:, 1], np.zeros(4)], 1)  # NEU dropped
    np.testing.assert_allclose(probs, kept / kept.sum(1, keepdims=True), atol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spec.save(tmp_path / "h")
        again = load_specialist(tmp_path / "h")
    assert again.version == spec.version
    np.testing.assert_allclose(again.predict_proba(texts), probs, atol=1e-6)


def test_hf_without_label_map_matches_names_and_fails_clearly():
    matrix = build_label_matrix(["NEGATIVE", "POSITIVE"], LABELS, None, name="x")
    np.testing.assert_array_equal(matrix, np.eye(2))
    with pytest.raises(SpecialistError, match="set label_map"):
        build_label_matrix(["LABEL_0", "LABEL_1"], LABELS, None, name="x")
    # all the mass on an unmapped native: uniform over the covered task labels
    out = map_native_probs(np.array([[0.0, 0.0, 1.0]]), np.array([[1, 0], [0, 1], [0, 0]], np.float32))
    np.testing.assert_allclose(out, [[0.5, 0.5]])
