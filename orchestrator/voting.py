"""Voting rules: turn the specialists' probabilities into a consensus label or a *hard* row.

The maths are plain functions over arrays: ``probs`` has shape ``(n_specialists, n_rows, n_labels)``
and every rule returns a :class:`Votes` with one entry per row. A rule is chosen by name from the
task spec through :data:`RULES`; a row a rule cannot settle is hard (``label == -1``) and goes to
the controller.

A rule's threshold can also be *calibrated* (:func:`calibrate`, ``voting.target_accuracy``): on
held-out labelled rows, the lowest threshold at which the rows the rule settles reach a target
accuracy. As the specialists improve stage after stage, the same target admits more rows, so the
share sent to the controller can fall; a fixed agreement rule cannot see that they got better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from labelwright.specialists.errors import ConfigError


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


def gated(votes: Votes, threshold: float | None) -> Votes:
    """The rule's votes (taken at threshold 0) with a calibrated threshold applied: rows whose
    support is below it become hard; ``None`` (no threshold reached the target) makes every row hard."""
    if threshold is None:
        ok = np.zeros(len(votes.label), dtype=bool)
    else:
        ok = ~votes.hard & (votes.confidence >= threshold)
    return Votes(label=np.where(ok, votes.label, -1), confidence=votes.confidence, leading=votes.leading)


@dataclass(frozen=True)
class Calibration:
    threshold: float | None  # None: no threshold reaches the target on these rows; every row is hard
    target: float
    rows: int  # held-out rows it was fitted on
    settled_share: float  # of those rows, the share the threshold settles
    accuracy: float | None  # accuracy of the settled ones

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "target_accuracy": self.target, "rows": self.rows,
                "settled_share": self.settled_share, "accuracy": self.accuracy}


def calibrate(votes: Votes, correct: np.ndarray, *, target: float, min_settled: int = 5) -> Calibration:
    """The lowest threshold on ``votes.confidence`` at which the rows the rule settles are right at
    least ``target`` of the time, among thresholds that still settle ``min_settled`` rows.

    ``votes`` is the rule applied at threshold 0 to held-out rows; ``correct[i]`` says whether row
    i's leading label is its reference label (gold, or the controller's answer). In-sample on the
    held-out rows, so the fitted accuracy is optimistic by the noise of a few hundred rows.
    """
    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    base = ~votes.hard
    conf = votes.confidence[base]
    right = correct[base]
    order = np.argsort(-conf, kind="stable")  # most confident first
    conf, right = conf[order], right[order]
    hits = np.cumsum(right)
    best = None
    # admitting the k most confident rows means threshold conf[k-1]; ties admit together
    for k in range(len(conf), min_settled - 1, -1):
        if k < len(conf) and conf[k] == conf[k - 1]:
            continue
        if hits[k - 1] / k >= target:
            best = k
            break
    if best is None:
        return Calibration(None, target, n, 0.0, None)
    return Calibration(float(conf[best - 1]), target, n, best / n if n else 0.0, float(hits[best - 1] / best))


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


def check_judge(voting, *, min_fit_rows: int = 1) -> Callable[..., dict]:
    """What the voting rule of ``voting`` (a :class:`VotingConfig`; unanimity when None) makes of the
    specialists on held-out check rows, as ``training/stage.evaluate`` asks: the share of hard rows and the
    accuracy of the consensus rows. With ``voting.target_accuracy`` and at least ``min_fit_rows`` rows, the
    rule's threshold is calibrated on these rows first (``gate``: what the voters are given) and the shares
    are those under it; with fewer, the configured threshold."""

    def judge(probs: np.ndarray, gold: np.ndarray, names: np.ndarray, specialists: list[str]) -> dict:
        rule = get_rule(voting.rule if voting is not None else "unanimity")
        weights = None if voting is None or not voting.weights else [voting.weights.get(n, 1.0) for n in specialists]
        target = None if voting is None or probs.shape[1] < min_fit_rows else voting.target_accuracy
        out: dict = {}
        if target is None:
            threshold = {} if voting is None or voting.threshold is None else {"threshold": voting.threshold}
            votes = rule(probs, weights=weights, **threshold)
        else:
            base = rule(probs, weights=weights, threshold=0.0)
            fit = calibrate(base, names[base.leading] == gold, target=target)
            votes = gated(base, fit.threshold)
            out["gate"] = fit.as_dict()
        easy = ~votes.hard
        agreed = names[votes.leading]
        out.update(hard_share=float(np.mean(votes.hard)),
                   consensus_accuracy=float(np.mean(agreed[easy] == gold[easy])) if easy.any() else None)
        return out

    return judge
