"""A causal LM used as a zero-shot classifier by the log-probability of each label's answer.

The prompt is the controller's (``specialists/prompts.py``): the instruction (``config.template``, else
``prompts.DEFAULT_INSTRUCTION``), the task's labels with their ``label_texts`` as descriptions, and the fenced
text; the answer is the same ``{"label": "<label>"}`` the embedded LLM scores. A label's probability is
p(answer is that label | answer is one of the task's labels), from one pass over the prompt and one
batched pass over the labels' tokens (``LocalLLMEngine.label_logprobs``, the computation behind the embedded
LLM's ``choose``), so its best label is the one ``choose`` picks.

``config.model`` names an embedded model (``qwen2.5-coder-0.5b-instruct``, ``smollm2-135m-instruct``), a local
Hugging Face directory or a hub id, loaded by ``specialists/local_model.py`` (it needs a chat template). The
checkpoint is the manifest alone: ``load`` resolves ``config.model`` again (bundled models come from their
packages and the local cache, so a local directory must stay where it is). Slow on CPU: one prompt pass
per text, measured ~1.2 s a row for the 135M model and ~3.6 s for the 0.5B one (one thread on a busy
2-core machine); a GPU is used when there is one. Not trainable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.prompts import DEFAULT_INSTRUCTION, build_messages
from labelwright.specialists.base import Specialist, SpecialistConfig, digest, read_manifest, softmax_rows
from labelwright.specialists.encoder import pick_device
from labelwright.specialists.llm_engine import LocalLLMEngine
from labelwright.specialists.local_model import load_local_model

ANSWER_FIELD = "label"  # the answer {"label": ...} that prompts.system_message asks for
# The text in the prompt is cut to about max_length tokens (English BPE averages ~4 characters a token).
CHARS_PER_TOKEN = 4


class LMScorerSpecialist(Specialist):
    kind = "lm_scorer"
    _version_prefix = "lm"
    trainable = False
    train_instead = "use kind 'transformer_classifier' to fine-tune a classifier on labelled rows"

    def __init__(self, config: SpecialistConfig, labels: Sequence[str], *, device=None, engine=None):
        """``engine``: a ``LocalLLMEngine`` already holding the model (tests); else ``config.model`` is loaded."""
        super().__init__(config, labels)
        if engine is None:
            model, tokenizer = load_local_model(config.model)
            if getattr(tokenizer, "chat_template", None) is None:
                raise SpecialistError(
                    f"specialist {self.name!r}: model {config.model!r} has no chat template; lm_scorer needs an "
                    "instruct (chat) model such as 'qwen2.5-coder-0.5b-instruct'"
                )
            engine = LocalLLMEngine(model.to(pick_device(device)), tokenizer, model_name=config.model)
        self.engine = engine
        self.instruction = config.template or DEFAULT_INSTRUCTION
        self.max_text_chars = config.max_length * CHARS_PER_TOKEN
        commit = getattr(engine.model.config, "_commit_hash", None) or ""
        self.version = "lm-" + digest(config.model, commit, self.instruction, self.labels, config.label_texts,
                                      self.max_text_chars)

    def messages(self, text: str) -> list[dict[str, str]]:
        """The chat messages this specialist scores ``text`` with (the controller's zero-shot prompt)."""
        messages, _ = build_messages(text, instruction=self.instruction, labels=self.labels,
                                     descriptions=self.config.label_texts, max_text_chars=self.max_text_chars)
        return messages

    def predict_proba(self, texts) -> np.ndarray:
        texts = self._clean_texts(texts)
        out = np.zeros((len(texts), len(self.labels)), np.float64)
        for i, text in enumerate(texts):
            out[i] = self.engine.label_logprobs(self.messages(text), ANSWER_FIELD, self.labels)
        return softmax_rows(out)

    def save(self, directory) -> None:
        self._write_manifest(directory)

    @classmethod
    def load(cls, directory, *, device=None) -> "LMScorerSpecialist":
        manifest = read_manifest(Path(directory))
        spec = cls(SpecialistConfig(**manifest["config"]), manifest["labels"], device=device)
        spec.version = manifest["version"]
        return spec
