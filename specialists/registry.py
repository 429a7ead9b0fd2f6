"""Kind name -> specialist class; build an untrained one from config, or load a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from labelwright.specialists.errors import SpecialistError
from labelwright.specialists.base import KINDS, Specialist, SpecialistConfig, read_manifest, read_out_of_fold


def _classes() -> dict[str, type[Specialist]]:
    from labelwright.specialists.embedding_linear import EmbeddingLinearSpecialist
    from labelwright.specialists.embedding_zero_shot import EmbeddingZeroShotSpecialist
    from labelwright.specialists.hf_classifier import HFClassifierSpecialist
    from labelwright.specialists.lm_scorer import LMScorerSpecialist
    from labelwright.specialists.nli_zero_shot import NLIZeroShotSpecialist
    from labelwright.specialists.tfidf_linear import TfidfLinearSpecialist
    from labelwright.specialists.transformer_classifier import TransformerClassifierSpecialist

    return {cls.kind: cls for cls in (
        TfidfLinearSpecialist, EmbeddingLinearSpecialist, TransformerClassifierSpecialist, HFClassifierSpecialist,
        EmbeddingZeroShotSpecialist, NLIZeroShotSpecialist, LMScorerSpecialist,
    )}


def specialist_class(kind: str) -> type[Specialist]:
    classes = _classes()
    if kind not in classes:
        raise SpecialistError(f"unknown specialist kind {kind!r}; use one of {list(KINDS)}")
    return classes[kind]


def build_specialist(config: SpecialistConfig, labels: Sequence[str]) -> Specialist:
    """An untrained specialist (ready to predict for the kinds that are not trainable)."""
    return specialist_class(config.kind)(config, list(labels))


def load_specialist(directory: str | Path) -> Specialist:
    """Open a directory written by ``Specialist.save()`` or ``fine_tune_transformer()`` (with the out-of-fold
    probabilities of the rows it was cross-fitted on, where it keeps some)."""
    manifest = read_manifest(directory)
    specialist = specialist_class(manifest["kind"]).load(directory)
    specialist.out_of_fold = read_out_of_fold(directory)
    return specialist
