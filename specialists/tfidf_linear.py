"""TF-IDF features (character 2-5-grams within words) + multinomial logistic regression, both scikit-learn's.

No pretrained weights at all, so its errors differ most from the transformer-based specialists. A
checkpoint holds the vectorizer's vocabulary and idf (JSON and arrays) and the head's weights; loading it
runs no pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from labelwright.specialists.base import Specialist, SpecialistConfig, digest, package_version, read_manifest
from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.linear_head import cross_fit_head, fit_linear_head, predict_linear_head

# Measured on movie_sentiment and yahoo_topics at 100 and 300 seed rows (train -> dev, 3 draws each):
# char 2-5-grams matched word 1-2 + char 2-5 (within 0.01) and fit 2-3x faster; word 1-2-grams alone
# were 3-10 points worse. l2 1e-4 was within 0.01 of 1e-5 (less extreme probabilities); 1e-2 lost 5-20.
DEFAULT_L2 = 1e-4
VECTORIZER = dict(analyzer="char_wb", ngram_range=(2, 5), lowercase=True, sublinear_tf=True, smooth_idf=True,
                  norm="l2", max_features=50_000)
# The n-grams are taken within words, punctuation left out ("film," and "film" are one word): with
# punctuation kept, scikit-learn's char_wb lost 1-3 points at 100-300 rows (benchmarks/linear_heads.py).
_WORD = re.compile(r"(?u)\b\w+\b")


def words_only(text: str) -> str:
    """The text's words, lowercased, one space apart: what the vectorizer's n-grams are cut from."""
    return " ".join(_WORD.findall(text.lower()))
VECTORIZER_FILE = "tfidf.json"  # vocabulary and settings; labelwright 0.1 wrote its own vectorizer.json
OLD_VECTORIZER_FILE = "vectorizer.json"


def new_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(dtype=np.float32, preprocessor=words_only, **VECTORIZER)


class TfidfLinearSpecialist(Specialist):
    kind = "tfidf_linear"
    _version_prefix = "tfidf"
    cross_fittable = True  # a fold's vectorizer and head are fitted anew in well under a second

    def __init__(self, config: SpecialistConfig, labels: Sequence[str]):
        super().__init__(config, labels)
        self.vectorizer = None
        self.W: np.ndarray | None = None
        self.b: np.ndarray | None = None

    @property
    def l2(self) -> float:
        return DEFAULT_L2 if self.config.l2 is None else self.config.l2

    def fit(self, texts, labels, *, sample_weight=None) -> None:
        y, w = self._label_indices(texts, labels, sample_weight)
        texts = self._clean_texts(texts)
        vectorizer = new_vectorizer()
        X = vectorizer.fit_transform(texts)
        self.W, self.b = fit_linear_head(X, y, len(self.labels), sample_weight=w, l2=self.l2)
        self.vectorizer = vectorizer
        self.version = f"tfidf-{digest(self.W, self.b, len(vectorizer.vocabulary_))}"
        self._forget_out_of_fold()

    def cross_fit(self, texts, labels, *, folds, sample_weight=None) -> np.ndarray:
        """``Specialist.cross_fit``: the vectorizer is fitted once on every text (no label goes into it), the
        head per fold; the weight of the rows always trained on is chosen out of fold (``cross_fit_head``)."""
        y, w = self._label_indices(texts, labels, sample_weight)
        vectorizer = new_vectorizer()
        X = vectorizer.fit_transform(self._clean_texts(texts))
        self.W, self.b, out, self.other_row_weight = cross_fit_head(X, y, w, folds, len(self.labels), l2=self.l2)
        self.vectorizer = vectorizer
        self.version = f"tfidf-{digest(self.W, self.b, len(vectorizer.vocabulary_))}"
        self._keep_out_of_fold(texts, folds, out)
        return out

    def predict_proba(self, texts) -> np.ndarray:
        if self.W is None:
            raise SpecialistError(
                f"specialist {self.name!r} (tfidf_linear) is not trained: call fit() on a seed set or load a saved one"
            )
        texts = self._clean_texts(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), np.float32)
        return predict_linear_head(self.vectorizer.transform(texts), self.W, self.b)

    def save(self, directory) -> None:
        if self.W is None:
            raise SpecialistError(f"specialist {self.name!r} is not trained; fit() it before save()")
        directory = self._write_manifest(directory)
        np.savez(directory / "linear.npz", W=self.W, b=self.b, idf=self.vectorizer.idf_)
        vocabulary = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        (directory / VECTORIZER_FILE).write_text(json.dumps({"settings": VECTORIZER, "vocabulary": vocabulary}))

    @classmethod
    def load(cls, directory) -> "TfidfLinearSpecialist":
        directory = Path(directory)
        manifest = read_manifest(directory)
        if not (directory / VECTORIZER_FILE).is_file() and (directory / OLD_VECTORIZER_FILE).is_file():
            raise SpecialistError(
                f"specialist checkpoint {directory} was written by {manifest.get('written_by', 'labelwright 0.1')} "
                f"with its own TF-IDF vectorizer; labelwright {package_version()} uses scikit-learn's and cannot "
                "read it. Train it again: run the job with --fresh, or delete that checkpoint folder"
            )
        spec = cls(SpecialistConfig(**manifest["config"]), manifest["labels"])
        arrays = np.load(directory / "linear.npz")
        spec.W, spec.b = arrays["W"], arrays["b"]
        saved = json.loads((directory / VECTORIZER_FILE).read_text())
        vectorizer = new_vectorizer()
        vectorizer.set_params(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()})
        vectorizer.vocabulary_ = saved["vocabulary"]
        vectorizer.idf_ = arrays["idf"]
        spec.vectorizer = vectorizer
        spec.version = manifest["version"]
        return spec
