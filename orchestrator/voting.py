"""Voting rules: turn the specialists' probabilities into a consensus label or a *hard* row.

The maths are plain functions over arrays: ``probs`` has shape ``(n_specialists, n_rows, n_labels)``
and every rule returns a :class:`Votes` with one entry per row. A rule is chosen by name from the
task spec through :data:`RULES`; a row a rule cannot settle is hard (``label == -1``) and goes to
the controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from labelwright.orchestrator.errors import ConfigError


@dataclass(frozen=True)
class Votes:
    label: np.ndarray  # (n_rows,) int: index of the consensus label, -1 for a hard row
    confidence: np.ndarray  # (n_rows,) float: support for the leading label, in [0, 1]
    leading: np.ndarray  # (n_rows,) int: the label with most weighted probability, hard rows too

    @property
    def hard(self) -> np.ndarray:
        return self.label < 0


def _check(probs: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (specialists, rows, labels), got {probs.shape}")
    n_specialists = probs.shape[0]
    if weights is None:
        weights = np.ones(n_specialists)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n_specialists,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be {n_specialists} non-negative numbers with a positive sum")
    return probs, weights / weights.sum()


def mean_probs(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the specialists' distributions, shape (n_rows, n_labels)."""
    probs, weights = _check(probs, weights)
    return np.einsum("s,snl->nl", weights, probs)


def unanimity(probs: np.ndarray, *, weights: np.ndarray | None = None, threshold: float = 0.0) -> Votes:
    """Consensus only when every specialist's top label is the same (the AutoAnnotator rule).

    ``threshold`` additionally asks that the agreed label's mean probability reaches it.
    """
    probs, w = _check(probs, weights)
    tops = probs.argmax(axis=2)  # (S, N)
    avg = np.einsum("s,snl->nl", w, probs)
    leading = avg.argmax(axis=1)
    agree = np.all(tops == tops[0], axis=0)
    support = avg[np.arange(avg.shape[0]), tops[0]]
    ok = agree & (support >= threshold)
    label = np.where(ok, tops[0], -1)
    confidence = np.where(agree, support, avg.max(axis=1))
    return Votes(label=label, confidence=confidence, leading=np.where(agree, tops[0], leading))


def majority(probs: np.ndarray, *, weights: np.ndarray | None = None, threshold: float = 0.0) -> Votes:
    """Consensus when specialists holding more than half of the weight share a top label.

    ``threshold`` additionally asks that the winning label's mean probability reaches it.
    """
    probs, w = _check(probs, weights)
    n_labels = probs.shape[2]
    tops = probs.argmax(axis=2)  # (S, N)
    onehot = np.eye(n_labels)[tops]  # (S, N, L)
    vote_share = np.einsum("s,snl->nl", w, onehot)
    avg = np.einsum("s,snl->nl", w, probs)
    winner = vote_share.argmax(axis=1)
    rows = np.arange(avg.shape[0])
    ok = (vote_share[rows, winner] > 0.5 + 1e-9) & (avg[rows, winner] >= threshold)
    return Votes(label=np.where(ok, winner, -1), confidence=avg[rows, winner], leading=winner)


def confidence_weighted(
    probs: np.ndarray, *, weights: np.ndarray | None = None, threshold: float = 0.7
) -> Votes:
    """Consensus when the weighted mean probability of the leading label reaches ``threshold``."""
    avg = mean_probs(probs, weights)
    leading = avg.argmax(axis=1)
    support = avg[np.arange(avg.shape[0]), leading]
    return Votes(label=np.where(support >= threshold, leading, -1), confidence=support, leading=leading)


RULES: dict[str, Callable[..., Votes]] = {
    "unanimity": unanimity,
    "majority": majority,
    "confidence_weighted": confidence_weighted,
}


def get_rule(name: str) -> Callable[..., Votes]:
    try:
        return RULES[name]
    except KeyError:
        raise ConfigError(
            f"voting.rule {name!r} is unknown; choose one of {sorted(RULES)}"
        ) from None


def top_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row, highest first, shape (n_rows, k)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-scores, part, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
