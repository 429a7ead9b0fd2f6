"""Frozen sentence embeddings (``Encoder``) + multinomial logistic regression.

Training touches only the linear head, so it fits a seed set in seconds; the encoder weights come
from ``config.model`` and are not saved (only the head is), and the version covers both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import Specialist, SpecialistConfig, digest, read_manifest
from labelwright.specialists.encoder import Encoder, encoder_key, shared_encoder
from labelwright.specialists.linear_head import (
    cross_fit_head, fit_linear_head, predict_linear_head, standardise, unstandardised,
)

# Measured on movie_sentiment and yahoo_topics at 100 and 300 seed rows (train -> dev, 3 draws each):
# 1e-3 was best or within 0.015 of best in all four cells; 1e-2 lost 11 points on yahoo at 300 rows.
DEFAULT_L2 = 1e-3
# On a causal LM's standardised states (Encoder.normalised False), same rows as encoder.py's layer choice:
# 1e-4 was within 0.03 of the best of 1e-2..1e-5 on movie_sentiment, banking77 and yahoo_topics; 1e-3 lost
# 0.07 on banking77 at 400 rows.
DEFAULT_L2_LM = 1e-4


class EmbeddingLinearSpecialist(Specialist):
    kind = "embedding_linear"
    _version_prefix = "emb"
    cross_fittable = True

    def __init__(self, config: SpecialistConfig, labels: Sequence[str], *, encoder: Encoder | None = None):
        super().__init__(config, labels)
        self._encoder = encoder
        self.W: np.ndarray | None = None
        self.b: np.ndarray | None = None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = shared_encoder(self.config.model, max_length=self.config.max_length,
                                           batch_size=self.config.batch_size)
        return self._encoder

    @property
    def l2(self) -> float:
        if self.config.l2 is not None:
            return self.config.l2
        return DEFAULT_L2 if self.encoder.normalised else DEFAULT_L2_LM

    def fit(self, texts, labels, *, sample_weight=None) -> None:
        y, w = self._label_indices(texts, labels, sample_weight)
        X = self.encoder.encode(self._clean_texts(texts))
        self.fit_embeddings(X, y, sample_weight=w)

    def fit_embeddings(self, X: np.ndarray, y: np.ndarray, *, sample_weight=None) -> None:
        """Fit the head on precomputed embeddings (label indices ``y``), e.g. ones cached for k-NN."""
        X, stats = self._standardised(X)
        self.W, self.b = self._raw(*fit_linear_head(X, y, len(self.labels), sample_weight=sample_weight, l2=self.l2),
                                   stats)
        self.version = f"emb-{digest(self.W, self.b, self.config.model)}"
        self._forget_out_of_fold()

    def _standardised(self, X: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """The features the head is fitted on: an LM's states standardised (``linear_head.standardise``)."""
        if self.encoder.normalised:
            return X, None
        Z, mean, scale = standardise(X)
        return Z, (mean, scale)

    @staticmethod
    def _raw(W: np.ndarray, b: np.ndarray, stats: tuple | None) -> tuple[np.ndarray, np.ndarray]:
        return (W, b) if stats is None else unstandardised(W, b, *stats)

    def cross_fit(self, texts, labels, *, folds, sample_weight=None) -> np.ndarray:
        """``Specialist.cross_fit``, every text encoded once; the weight of the rows always trained on is chosen
        out of fold (``cross_fit_head``)."""
        y, w = self._label_indices(texts, labels, sample_weight)
        X, stats = self._standardised(self.encoder.encode(self._clean_texts(texts)))
        W, b, out, self.other_row_weight = cross_fit_head(X, y, w, folds, len(self.labels), l2=self.l2)
        self.W, self.b = self._raw(W, b, stats)
        self.version = f"emb-{digest(self.W, self.b, self.config.model)}"
        self._keep_out_of_fold(texts, folds, out)
        return out

    @property
    def embeds(self) -> str:
        return encoder_key(self.config.model, self.config.max_length)

    def predict_proba(self, texts) -> np.ndarray:
        return self._scores(texts)[0]

    def predict_embedded(self, texts) -> tuple[np.ndarray, np.ndarray]:
        probs, X = self._scores(texts)
        return self._with_out_of_fold(texts, probs), X

    def _scores(self, texts) -> tuple[np.ndarray, np.ndarray]:
        if self.W is None:
            raise SpecialistError(
                f"specialist {self.name!r} (embedding_linear) is not trained: call fit() on a seed set or load a saved one"
            )
        texts = self._clean_texts(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros((0, 0), np.float32)
        X = self.encoder.encode(texts)
        return predict_linear_head(X, self.W, self.b), X

    def save(self, directory) -> None:
        if self.W is None:
            raise SpecialistError(f"specialist {self.name!r} is not trained; fit() it before save()")
        directory = self._write_manifest(directory)
        np.savez(directory / "linear.npz", W=self.W, b=self.b)

    @classmethod
    def load(cls, directory) -> "EmbeddingLinearSpecialist":
        directory = Path(directory)
        manifest = read_manifest(directory)
        spec = cls(SpecialistConfig(**manifest["config"]), manifest["labels"])
        arrays = np.load(directory / "linear.npz")
        spec.W, spec.b = arrays["W"], arrays["b"]
        spec.version = manifest["version"]
        return spec
