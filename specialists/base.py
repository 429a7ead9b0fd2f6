"""The specialist interface: a batch of texts in, one probability per task label out.

A specialist is a plain class usable without Ray; ``cluster/`` wraps it in a Serve deployment.
``SpecialistConfig`` is the boundary model (task spec, plan); ``Specialist`` is the logic.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from labelwright.specialists.errors import SpecialistError

MANIFEST = "specialist.json"
OUT_OF_FOLD = "out_of_fold.npz"  # in a checkpoint: the probabilities its cross-fitted rows got out of fold
KINDS = (
    "tfidf_linear", "embedding_linear", "transformer_classifier", "hf_classifier",
    "embedding_zero_shot", "nli_zero_shot", "lm_scorer",
)
# Kinds that use label_texts (label -> verbalisation) and template; the first two fill "{label}" in it.
ZERO_SHOT_KINDS = ("embedding_zero_shot", "nli_zero_shot", "lm_scorer")
TEMPLATE_KINDS = ("embedding_zero_shot", "nli_zero_shot")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Texts longer than this many characters per token of max_length are cut before tokenising, so a
# megabyte-long row costs no more than a normal one (the tokenizer truncates the rest anyway).
CHARS_PER_TOKEN_CAP = 16


class SpecialistConfig(BaseModel):
    """How to build and serve one specialist. ``None`` hyper-parameters mean the kind's measured default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    kind: Literal[
        "tfidf_linear", "embedding_linear", "transformer_classifier", "hf_classifier",
        "embedding_zero_shot", "nli_zero_shot", "lm_scorer",
    ]
    model: str = "minilm"
    label_map: dict[str, str] | None = None
    # Zero-shot kinds: task label -> how to say it ("a negative review"); default: the label name.
    label_texts: dict[str, str] | None = None
    # embedding_zero_shot / nli_zero_shot: the hypothesis around each label text, with "{label}";
    # lm_scorer: the task instruction of the prompt.
    template: str | None = None
    max_length: int = Field(128, ge=8, le=4096)
    batch_size: int = Field(32, ge=1)
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    l2: float | None = Field(None, ge=0)  # linear kinds: L2 strength on the mean loss
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.25, ge=0)
    torch_threads: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"specialist name {value!r} may use only letters, digits, '_' and '-'; rename it"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model is empty: use 'minilm', a local model directory or a hub id")
        return value

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling_sane(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        lo, hi = value.get("min_replicas"), value.get("max_replicas")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(
                f"autoscaling min_replicas ({lo}) is above max_replicas ({hi}); lower min_replicas"
            )
        return value

    @model_validator(mode="after")
    def _label_map_only_for_hf(self) -> "SpecialistConfig":
        if self.label_map is not None and self.kind != "hf_classifier":
            raise ValueError(
                f"label_map is only used by kind 'hf_classifier', not {self.kind!r}; remove it"
            )
        if self.l2 is not None and self.kind not in ("tfidf_linear", "embedding_linear"):
            raise ValueError(
                f"l2 is only used by the linear kinds, not {self.kind!r}; remove it"
            )
        return self

    @model_validator(mode="after")
    def _zero_shot_fields(self) -> "SpecialistConfig":
        for field in ("label_texts", "template"):
            if getattr(self, field) is not None and self.kind not in ZERO_SHOT_KINDS:
                raise ValueError(
                    f"{field} is only used by the zero-shot kinds {list(ZERO_SHOT_KINDS)}, not {self.kind!r}; "
                    "remove it"
                )
        if self.template is not None:
            if not self.template.strip():
                raise ValueError("template is empty: remove it to use the default, or write one")
            if self.kind in TEMPLATE_KINDS and "{label}" not in self.template:
                raise ValueError(
                    f"template {self.template!r} has no '{{label}}' for kind {self.kind!r}; "
                    "write where the label text goes, e.g. 'This text is about {label}.'"
                )
        empty = sorted(label for label, text in (self.label_texts or {}).items() if not text.strip())
        if empty:
            raise ValueError(f"label_texts gives empty texts for {empty}; give each a phrase or leave it out")
        if self.kind in ("nli_zero_shot", "lm_scorer") and self.model == "minilm":
            need = ("an NLI classifier such as 'cross-encoder/nli-deberta-v3-small' or a local directory"
                    if self.kind == "nli_zero_shot" else
                    "a causal LM: 'qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct' or a local directory")
            raise ValueError(f"model 'minilm' is a sentence encoder, which kind {self.kind!r} cannot use; "
                             f"set model to {need}")
        return self


class Specialist(ABC):
    """Texts in, probabilities over ``labels`` out. Subclasses set ``kind`` and ``version``."""

    kind: str = ""

    def __init__(self, config: SpecialistConfig, labels: Sequence[str]):
        labels = list(labels)
        if not labels:
            raise SpecialistError(f"specialist {config.name!r}: the task has no labels; give at least one")
        if len(set(labels)) != len(labels):
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            raise SpecialistError(f"specialist {config.name!r}: task labels repeat {dupes}; make them unique")
        unknown = sorted(set(config.label_texts or {}) - set(labels))
        if unknown:
            raise SpecialistError(
                f"specialist {config.name!r}: label_texts names {unknown}, which are not task labels; "
                f"use only task labels {labels}"
            )
        self.config = config
        self.name = config.name
        self.labels = labels
        self.version = f"{self._version_prefix}-untrained"

    # ---- the interface -------------------------------------------------------------------------
    @abstractmethod
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array (len(texts), len(labels)); rows sum to 1; columns in ``labels`` order."""

    _out_of_fold: tuple[np.ndarray, np.ndarray] | None = None
    _out_of_fold_index: dict[str, int] = {}

    @property
    def out_of_fold(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(text keys, probabilities) of the rows ``cross_fit`` held out: saved and loaded with the checkpoint."""
        return self._out_of_fold

    @out_of_fold.setter
    def out_of_fold(self, value: tuple[np.ndarray, np.ndarray] | None) -> None:
        # indexed once here, not on every batch a Serve replica answers
        self._out_of_fold = value
        self._out_of_fold_index = {} if value is None else dict(zip(value[0].tolist(), range(len(value[0]))))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """What callers get (Serve replicas, checks): ``predict_proba``, except that a text this specialist was
        cross-fitted on gets the probabilities of the fold model that never saw it. A row it trained on that
        way is still judged, and voted on, as if it had not."""
        return self._with_out_of_fold(texts, self.predict_proba(texts))

    #: The sentence encoder (``encoder_key``) whose embeddings ``predict_embedded`` returns; None: none.
    embeds: str | None = None

    def predict_embedded(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict``, and the sentence embeddings it was computed from where the kind has them (``embeds``
        names their encoder): the job finds the controller's demonstrations with them instead of encoding the
        text again."""
        return self.predict(texts), None

    def _with_out_of_fold(self, texts: Sequence[str], probs: np.ndarray) -> np.ndarray:
        if self._out_of_fold is None or not len(texts):
            return probs
        saved, where = self._out_of_fold[1], self._out_of_fold_index
        hits = [(i, where[k]) for i, k in enumerate(text_keys(self._clean_texts(texts)).tolist()) if k in where]
        if hits:
            probs = np.array(probs, dtype=np.float32)
            rows, found = zip(*hits)
            probs[list(rows)] = saved[list(found)]
        return probs

    # Kinds used as shipped set ``trainable = False`` and say in ``train_instead`` which kind learns instead.
    trainable: bool = True
    train_instead: str = ""

    def fit(self, texts: Sequence[str], labels: Sequence[str], *, sample_weight=None) -> None:
        hint = f"; {self.train_instead}" if self.train_instead else ""
        raise SpecialistError(f"specialist {self.name!r} of kind {self.kind!r} is used as shipped and cannot be "
                              f"trained{hint}")

    # Kinds whose fit takes seconds set this: a set of rows can then be trained on and still judged honestly,
    # each row scored by a model fitted without it (``cross_fit``).
    cross_fittable: bool = False
    other_row_weight: float | None = None  # after cross_fit: the scale it chose for the rows always trained on

    def cross_fit(self, texts: Sequence[str], labels: Sequence[str], *, folds, sample_weight=None) -> np.ndarray:
        """Fit on every row, and return each row's probabilities from a model fitted without the rows of its fold
        (``folds[i] >= 0``; NaN for rows always trained on, ``folds[i] < 0``), kept as ``out_of_fold`` for
        ``predict``. Only the ``cross_fittable`` kinds implement it."""
        raise SpecialistError(f"specialist {self.name!r} of kind {self.kind!r} cannot be cross-fitted; train it "
                              "with fit(), on rows it is not judged on")

    def _forget_out_of_fold(self) -> None:
        """After a plain ``fit``: the model saw every row, so no row has fold probabilities any more (kept, a
        later fit would have ``predict`` answer those texts from the fold models of an earlier cross-fit)."""
        self.out_of_fold, self.other_row_weight = None, None

    def _keep_out_of_fold(self, texts: Sequence[str], folds: np.ndarray, probs: np.ndarray) -> None:
        held = np.asarray(folds) >= 0
        keys = text_keys(self._clean_texts([t for t, h in zip(texts, held) if h]))
        self.out_of_fold = (keys, np.asarray(probs, dtype=np.float32)[held]) if held.any() else None

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write ``specialist.json`` plus the weights into ``directory``."""

    # ---- helpers for subclasses ------------------------------------------------------------------
    _version_prefix = "specialist"

    def _clean_texts(self, texts: Sequence[str]) -> list[str]:
        return clean_texts(texts, max_length=self.config.max_length, name=self.name)

    def _label_indices(self, texts: Sequence[str], labels: Sequence[str], sample_weight) -> tuple[np.ndarray, np.ndarray]:
        return encode_training_labels(texts, labels, sample_weight, task_labels=self.labels, name=self.name)

    def _manifest(self, **extra: Any) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "labels": self.labels,
            "version": self.version,
            "config": self.config.model_dump(mode="json"),
            "written_by": f"labelwright {package_version()}",
            **({"other_row_weight": self.other_row_weight} if self.other_row_weight is not None else {}),
            **extra,
        }

    def _write_manifest(self, directory: str | Path, **extra: Any) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).write_text(json.dumps(self._manifest(**extra), indent=2))
        if self.out_of_fold is not None:
            np.savez(directory / OUT_OF_FOLD, keys=self.out_of_fold[0], probs=self.out_of_fold[1])
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, labels={len(self.labels)})"


def package_version() -> str:
    """The installed labelwright's version (recorded in every checkpoint it writes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("labelwright")
    except PackageNotFoundError:
        return "unknown"


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, returned as float32 (rows sum to 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores - scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def verbalise_labels(labels: Sequence[str], label_texts: dict[str, str] | None) -> list[str]:
    """How each label is said to a zero-shot model: its ``label_texts`` entry, else its name with '_'/'-' as spaces."""
    label_texts = label_texts or {}
    return [label_texts.get(label) or " ".join(label.replace("_", " ").replace("-", " ").split()) or label
            for label in labels]


def fill_template(template: str, texts: Sequence[str]) -> list[str]:
    """``template`` with "{label}" replaced by each text (plain replacement: other braces stay as written)."""
    return [template.replace("{label}", text) for text in texts]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise SpecialistError(
            f"{path} not found: point at a directory written by Specialist.save() or fine_tune_transformer()"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecialistError(f"{path} is not valid JSON ({exc}); re-save the specialist") from exc
    missing = {"kind", "name", "labels", "version", "config"} - set(manifest)
    if missing:
        raise SpecialistError(f"{path} lacks {sorted(missing)}; re-save the specialist")
    return manifest


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """A stable key per text (its SHA-1), to find a row's out-of-fold probabilities again."""
    return np.array([hashlib.sha1(str(t).encode("utf-8", "surrogatepass")).hexdigest() for t in texts])


def read_out_of_fold(directory: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The out-of-fold probabilities a checkpoint keeps (``Specialist.out_of_fold``), or None."""
    path = Path(directory) / OUT_OF_FOLD
    if not path.is_file():
        return None
    saved = np.load(path)
    return saved["keys"], saved["probs"]


def digest(*parts: Any) -> str:
    """Short content hash used in versions: arrays by their bytes, everything else by repr."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:8]


def clean_texts(texts: Sequence[str], *, max_length: int, name: str) -> list[str]:
    """None/NaN -> "", non-strings -> str(); long texts cut to a bound that truncation would drop anyway."""
    if isinstance(texts, str):
        raise SpecialistError(
            f"specialist {name!r}: predict_proba/fit take a list of texts, not one string; wrap it in a list"
        )
    cap = max_length * CHARS_PER_TOKEN_CAP
    out = []
    for text in texts:
        if text is None or (isinstance(text, float) and np.isnan(text)):
            text = ""
        elif not isinstance(text, str):
            text = str(text)
        out.append(text[:cap])
    return out


def encode_training_labels(texts: Sequence[str], labels: Sequence[str], sample_weight, *,
                           task_labels: Sequence[str], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a training set once; return (label index per row, weight per row)."""
    if len(texts) != len(labels):
        raise SpecialistError(
            f"specialist {name!r}: {len(texts)} texts but {len(labels)} labels; give one label a text"
        )
    if len(texts) == 0:
        raise SpecialistError(f"specialist {name!r}: the training set is empty; give at least one row")
    index = {label: i for i, label in enumerate(task_labels)}
    bad = [(i, lab) for i, lab in enumerate(labels) if lab not in index]
    if bad:
        rows = ", ".join(f"row {i}: {lab!r}" for i, lab in bad[:5])
        raise SpecialistError(
            f"specialist {name!r}: {len(bad)} training labels are not task labels ({rows}); "
            f"use one of {list(task_labels)}"
        )
    y = np.array([index[lab] for lab in labels], dtype=np.int64)
    if sample_weight is None:
        return y, np.ones(len(y), dtype=np.float32)
    w = np.asarray(sample_weight, dtype=np.float32).reshape(-1)
    if len(w) != len(y):
        raise SpecialistError(
            f"specialist {name!r}: sample_weight has {len(w)} values for {len(y)} rows; give one a row"
        )
    bad_w = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if len(bad_w):
        raise SpecialistError(
            f"specialist {name!r}: sample_weight must be finite and >= 0 (rows {bad_w[:5].tolist()})"
        )
    if w.sum() <= 0:
        raise SpecialistError(f"specialist {name!r}: every sample_weight is 0; give some rows weight")
    return y, w
