"""The fine-tuning loop without Ray, on a tiny BERT built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.registry import build_specialist, load_specialist
from labelwright.specialists.transformer_classifier import TransformerClassifierSpecialist
from labelwright.specialists.transformer_classifier import shard_indices, train_loop
from labelwright.training.finetune import fine_tune_transformer

LABELS = ["negative", "positive"]
TEXTS = ["great fun", "awful mess", "a joy to watch", "dull and bad", "lovely", "boring"] * 4
GOLD = ["positive", "negative", "positive", "negative", "positive", "negative"] * 4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(tiny_bert, labels=LABELS, **overrides) -> TransformerClassifierSpecialist:
    config = SpecialistConfig(name="tfm", kind="transformer_classifier", model=tiny_bert, max_length=16,
                              batch_size=8, **overrides)
    return build_specialist(config, labels)


def test_shard_indices_cover_everything_with_equal_counts():
    shards = [shard_indices(10, epoch=0, seed=1, rank=r, world_size=3) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(np.concatenate(shards)) == set(range(10))
    assert not np.array_equal(shard_indices(10, epoch=1, seed=1, rank=0, world_size=1),
                              shard_indices(10, epoch=0, seed=1, rank=0, world_size=1))


def test_one_epoch_reports_and_changes_version(tiny_bert):
    spec = make(tiny_bert)
    before = {k: v.clone() for k, v in spec.module.state_dict().items()}
    seen = []
    losses = train_loop(spec, TEXTS, np.array([LABELS.index(g) for g in GOLD]), epochs=1, lr=1e-3,
                        on_epoch=lambda epoch, loss: seen.append((epoch, loss)))
    assert len(losses) == 1 and np.isfinite(losses[0]) and seen == [(0, losses[0])]
    assert spec.version != "tfm-untrained"
    assert any(not torch.equal(before[k], v) for k, v in spec.module.state_dict().items())


def test_loop_learns_a_separable_toy_task(tiny_bert):
    spec = make(tiny_bert, epochs=15, lr=3e-3)
    spec.fit(TEXTS, GOLD)
    probs = spec.predict_proba(TEXTS)
    assert (np.asarray(LABELS)[probs.argmax(1)] == np.asarray(GOLD)).mean() == 1.0


def test_zero_weight_rows_do_not_train(tiny_bert):
    spec = make(tiny_bert)
    y = np.array([LABELS.index(g) for g in GOLD])
    before = {k: v.clone() for k, v in spec.module.state_dict().items()}
    train_loop(spec, TEXTS, y, np.zeros(len(y), np.float32), epochs=1, lr=1e-3)
    # AdamW still decays weights, but no gradient reaches the head bias (no decay on biases)
    assert torch.equal(before["head.bias"], spec.module.state_dict()["head.bias"])


def test_continue_from_checkpoint_with_a_new_label(tiny_bert, tmp_path):
    spec = make(tiny_bert, epochs=1)
    spec.fit(TEXTS, GOLD)
    spec.save(tmp_path / "c")
    grown = TransformerClassifierSpecialist.load(tmp_path / "c", labels=["negative", "neutral", "positive"])
    head, old = grown.module.head.state_dict(), spec.module.head.state_dict()
    assert torch.equal(head["weight"][0], old["weight"][0]) and torch.equal(head["weight"][2], old["weight"][1])
    assert grown.version != spec.version
    assert load_specialist(tmp_path / "c").version == spec.version


def test_fine_tune_validates_before_starting_ray(tiny_bert, tmp_path):
    linear = SpecialistConfig(name="lin", kind="tfidf_linear")
    with pytest.raises(SpecialistError, match="fit"):
        fine_tune_transformer(linear, TEXTS, GOLD, label_names=LABELS, output_dir=str(tmp_path / "o"),
                              storage_path=str(tmp_path / "s"))
    config = SpecialistConfig(name="tfm", kind="transformer_classifier", model=tiny_bert)
    with pytest.raises(SpecialistError, match="row 0: 'meh'"):
        fine_tune_transformer(config, ["x"], ["meh"], label_names=LABELS, output_dir=str(tmp_path / "o"),
                              storage_path=str(tmp_path / "s"))
