"""fine_tune_transformer through a real Ray Train TorchTrainer (one CPU worker), on a tiny BERT built here."""

from __future__ import annotations

import json

import numpy as np

from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.registry import build_specialist, load_specialist
from labelwright.training.finetune import fine_tune_transformer

LABELS = ["negative", "positive"]
TEXTS = ["great fun", "awful mess", "a joy to watch", "dull and bad", "lovely", "boring"] * 4
GOLD = ["positive", "negative", "positive", "negative", "positive", "negative"] * 4


def test_fine_tune_on_ray_train_gives_a_loadable_checkpoint(ray_cluster, tiny_bert, tmp_path):
    config = SpecialistConfig(name="tfm", kind="transformer_classifier", model=tiny_bert, max_length=16,
                              batch_size=8, epochs=12, lr=3e-3, num_cpus=1)
    out = fine_tune_transformer(
        config, TEXTS, GOLD, label_names=LABELS, output_dir=str(tmp_path / "ckpt"), num_workers=1,
        use_gpu=False, storage_path=str(tmp_path / "ray_results"), seed=0,
    )
    assert out == str(tmp_path / "ckpt")
    spec = load_specialist(out)
    assert spec.kind == "transformer_classifier" and spec.labels == LABELS
    assert spec.version.startswith("tfm-") and spec.version != build_specialist(config, LABELS).version
    assert json.loads((tmp_path / "ckpt" / "specialist.json").read_text())["version"] == spec.version
    probs = spec.predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 2)
    assert (np.asarray(LABELS)[probs.argmax(1)] == np.asarray(GOLD)).mean() == 1.0
    # the run's per-epoch losses were reported to Ray Train
    runs = list((tmp_path / "ray_results").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("finetune-tfm-")
