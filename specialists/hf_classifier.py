"""Any ``AutoModelForSequenceClassification`` (hub id or local path), its native labels mapped to the task's.

``label_map`` maps native label -> task label. Several natives may map to one task label (their
probabilities are summed); natives left out are dropped and the rest renormalised; a task label
nothing maps to gets probability 0 (with a warning). Without a ``label_map``, natives whose name
equals a task label (case-insensitive) map to it. Not trainable here: it is used as shipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import Specialist, SpecialistConfig, digest, read_manifest
from labelwright.specialists.encoder import length_order, load_pretrained, pick_device

MODEL_DIR = "model"


def native_labels(model_config) -> list[str]:
    """The model's labels in output order, from ``config.id2label``."""
    id2label = getattr(model_config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(int(k) for k in id2label)]


def build_label_matrix(natives: Sequence[str], task_labels: Sequence[str], label_map: dict[str, str] | None,
                       *, name: str) -> np.ndarray:
    """(n_natives, n_task) 0/1 matrix; ``native_probs @ M`` sums natives into task labels."""
    natives, task_labels = list(natives), list(task_labels)
    if label_map is None:
        lowered = {t.lower(): t for t in task_labels}
        label_map = {n: lowered[n.lower()] for n in natives if n.lower() in lowered}
        if not label_map:
            raise SpecialistError(
                f"specialist {name!r}: none of the model's native labels {natives} is a task label "
                f"{task_labels}; set label_map (native label -> task label)"
            )
    unknown = sorted(set(label_map) - set(natives))
    if unknown:
        raise SpecialistError(
            f"specialist {name!r}: label_map names native labels {unknown} that the model does not have; "
            f"its native labels are {natives}"
        )
    not_task = sorted({t for t in label_map.values() if t not in task_labels})
    if not_task:
        raise SpecialistError(
            f"specialist {name!r}: label_map maps to {not_task}, which are not task labels; use one of {task_labels}"
        )
    matrix = np.zeros((len(natives), len(task_labels)), np.float32)
    for native, task in label_map.items():
        matrix[natives.index(native), task_labels.index(task)] = 1.0
    orphans = [t for j, t in enumerate(task_labels) if not matrix[:, j].any()]
    if orphans:
        warnings.warn(
            f"specialist {name!r}: no native label maps to task labels {orphans}; they get probability 0 "
            f"from this specialist (add entries to label_map to cover them)",
            RuntimeWarning,
            stacklevel=3,
        )
    return matrix


def map_native_probs(native_probs: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Sum natives into task labels, drop unmapped natives, renormalise; a row whose mass was all in
    unmapped natives becomes uniform over the covered task labels."""
    mapped = native_probs.astype(np.float64) @ matrix
    total = mapped.sum(axis=1, keepdims=True)
    covered = matrix.any(axis=0).astype(np.float64)
    empty = total[:, 0] <= 1e-12
    if empty.any():
        mapped[empty] = covered
        total[empty] = covered.sum()
    return (mapped / total).astype(np.float32)


class HFClassifierSpecialist(Specialist):
    kind = "hf_classifier"
    _version_prefix = "hf"
    trainable = False
    train_instead = "use kind 'transformer_classifier' with the same model to fine-tune it"

    def __init__(self, config: SpecialistConfig, labels: Sequence[str], *, device=None,
                 _model_source: str | None = None):
        super().__init__(config, labels)
        commit = open_classifier(self, _model_source or config.model, device)
        self.matrix = build_label_matrix(self.native_labels, self.labels, config.label_map, name=self.name)
        self.version = f"hf-{digest(config.model, commit, self.native_labels, self.matrix)}"

    def predict_proba(self, texts) -> np.ndarray:
        texts = self._clean_texts(texts)
        out = np.zeros((len(texts), len(self.native_labels)), np.float32)
        order = length_order(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True,
                    max_length=self.config.max_length, return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits
                out[idx] = torch.softmax(logits.double(), dim=-1).float().cpu().numpy()
        return map_native_probs(out, self.matrix)

    def save(self, directory) -> None:
        save_classifier(self, directory)

    @classmethod
    def load(cls, directory, *, device=None) -> "HFClassifierSpecialist":
        return load_classifier(cls, directory, device=device)


# Shared with the NLI zero-shot kind, which also runs a shipped sequence classifier.
def open_classifier(specialist: Specialist, source: str, device) -> str:
    """Load tokenizer and model from ``source`` onto the specialist (``tokenizer``, ``model``,
    ``native_labels``, ``device``); returns the model's commit (or path) for its version."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    specialist.tokenizer = load_pretrained(AutoTokenizer, source)
    specialist.model = load_pretrained(AutoModelForSequenceClassification, source)
    specialist.native_labels = native_labels(specialist.model.config)
    specialist.device = pick_device(device)
    specialist.model.to(specialist.device).eval()
    cfg = specialist.model.config
    return getattr(cfg, "_commit_hash", None) or getattr(cfg, "_name_or_path", "")


def save_classifier(specialist: Specialist, directory, **extra) -> None:
    """Manifest plus a copy of the model, so the checkpoint loads without the hub."""
    directory = specialist._write_manifest(directory, model_dir=MODEL_DIR, native_labels=specialist.native_labels,
                                           **extra)
    specialist.model.save_pretrained(directory / MODEL_DIR)
    specialist.tokenizer.save_pretrained(directory / MODEL_DIR)


def load_classifier(cls, directory, *, device=None):
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = cls(SpecialistConfig(**manifest["config"]), manifest["labels"], device=device,
               _model_source=str(directory / MODEL_DIR))
    spec.version = manifest["version"]
    return spec
