"""Zero-shot by entailment: any NLI ``AutoModelForSequenceClassification`` (hub id or local path).

The standard single-label formulation: for each text (premise) and each task label, the hypothesis is
``config.template`` (default :data:`DEFAULT_TEMPLATE`) filled with the label's text (``label_texts``, else its
name); a label's probability is the softmax over the task's labels of the entailment logits. The
entailment output is found in ``config.id2label`` by name (a label starting with 'entail',
case-insensitive); the contradiction logit is not needed in this formulation. Not trainable; the checkpoint
holds a copy of the model and tokenizer, so it loads without the hub. Cost: one forward pass per
(text, label) pair.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import Specialist, SpecialistConfig, digest, fill_template, softmax_rows, verbalise_labels
from labelwright.specialists.encoder import length_order
from labelwright.specialists.hf_classifier import load_classifier, open_classifier, save_classifier
# The hypothesis template of the Hugging Face zero-shot pipeline, which NLI models are usually evaluated with.
DEFAULT_TEMPLATE = "This example is {label}."


def entailment_index(natives: Sequence[str], *, model: str) -> int:
    """Position of the entailment output among the model's native labels ('entail...', any case)."""
    hits = [i for i, native in enumerate(natives) if native.lower().startswith("entail")]
    if len(hits) != 1:
        problem = "has no entailment label" if not hits else f"has several entailment labels {[natives[i] for i in hits]}"
        raise SpecialistError(
            f"NLI model {model!r} {problem} (its labels are {list(natives)}); use an NLI model whose "
            "config.id2label names exactly one 'entailment' output, e.g. 'cross-encoder/nli-deberta-v3-small'"
        )
    return hits[0]


class NLIZeroShotSpecialist(Specialist):
    kind = "nli_zero_shot"
    _version_prefix = "nli"
    trainable = False
    train_instead = "use kind 'transformer_classifier' to fine-tune a classifier on labelled rows"

    def __init__(self, config: SpecialistConfig, labels: Sequence[str], *, device=None,
                 _model_source: str | None = None):
        super().__init__(config, labels)
        commit = open_classifier(self, _model_source or config.model, device)
        self.entailment = entailment_index(self.native_labels, model=config.model)
        phrases = verbalise_labels(self.labels, config.label_texts)
        self.hypotheses = fill_template(config.template or DEFAULT_TEMPLATE, phrases)
        self.version = f"nli-{digest(config.model, commit, self.native_labels, self.hypotheses)}"

    def predict_proba(self, texts) -> np.ndarray:
        texts = self._clean_texts(texts)
        k = len(self.labels)
        if not texts:
            return np.zeros((0, k), np.float32)
        logits = np.zeros((len(texts), k), np.float64)
        # (text, label) pairs, texts in length order so each batch pads little; batch_size counts pairs.
        pairs = [(i, j) for i in length_order(texts) for j in range(k)]
        with torch.inference_mode():
            for start in range(0, len(pairs), self.config.batch_size):
                chunk = pairs[start : start + self.config.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i, _ in chunk], [self.hypotheses[j] for _, j in chunk], padding=True,
                    truncation=True, max_length=self.config.max_length, return_tensors="pt",
                ).to(self.device)
                out = self.model(**batch).logits[:, self.entailment].double().cpu().numpy()
                rows, cols = zip(*chunk)
                logits[list(rows), list(cols)] = out
        return softmax_rows(logits)

    def save(self, directory) -> None:
        save_classifier(self, directory, hypotheses=self.hypotheses)

    @classmethod
    def load(cls, directory, *, device=None) -> "NLIZeroShotSpecialist":
        return load_classifier(cls, directory, device=device)
