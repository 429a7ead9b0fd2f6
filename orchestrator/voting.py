"""Voting rules: turn the specialists' probabilities into a consensus label or a *hard* row.

The maths are plain functions over arrays: ``probs`` has shape ``(n_specialists, n_rows, n_labels)``
and every rule returns a :class:`Votes` with one entry per row. A rule is chosen by name from the
task spec through :data:`RULES`; a row a rule cannot settle is hard (``label == -1``) and goes to
the controller.

A rule's threshold can also be *fitted* on reference rows, the rows the controller was asked about
up front (random gold rows, or a random audit sample), so that it follows the specialists as they
improve stage after stage:

- :func:`fit_route` (``voting.route: measured``, the default): the lowest threshold at which the
  rows the rule settles are shown, at ``voting.confidence_level``, to lose at most
  ``voting.max_loss`` accuracy against the controller on those same rows (or to reach
  ``voting.target_accuracy`` when one is set). The controller's own accuracy differs from one kind of
  row to another (the rows the specialists are sure of are the controller's easy rows too), so the
  comparison is paired, row by row, not against its average.
- :func:`calibrate` (``voting.route: threshold`` with ``voting.target_accuracy``): the lowest threshold
  at which the settled rows' point accuracy reaches the target, no bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Stack:
    """A learned aggregate (``voting.rule: stacked``): label ``l`` scores ``sum_s a[s] * log p_s(l) + b[l]``,
    turned into probabilities by a softmax: a conditional logit over the specialists' log-probabilities,
    one weight per specialist and one bias per label, so it fits on a few hundred rows however many
    labels there are. ``a`` equal and ``b`` zero is the normalised product of the specialists' distributions."""

    a: np.ndarray  # (n_specialists,)
    b: np.ndarray  # (n_labels,)

    def as_dict(self) -> dict:
        return {"a": [float(x) for x in self.a], "b": [float(x) for x in self.b]}

    @classmethod
    def from_dict(cls, d: dict) -> "Stack":
        return cls(np.asarray(d["a"], dtype=np.float64), np.asarray(d["b"], dtype=np.float64))


# Each source's distribution is mixed with this share of the uniform one before its log: one source's 0 cannot
# veto a label, and a source that is sure and wrong costs a bounded log-likelihood. Without it, a linear head
# that never saw a label (77 intents, 100 gold rows: most held-out rows have a label their fold never had) gives
# it ~1e-13, and the fit drops that source however accurate it is: on banking77 the stack fell to 0.33 with its
# best specialist at 0.44 alone; mixed, it reached 0.46.
SMOOTHING = 0.05


def _log_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return np.log((1.0 - SMOOTHING) * np.clip(probs, 0.0, 1.0) + SMOOTHING / probs.shape[-1])


def stack_probs(probs: np.ndarray, stack: Stack) -> np.ndarray:
    """The stacked distribution, shape (n_rows, n_labels)."""
    z = np.einsum("s,snl->nl", stack.a, _log_probs(np.asarray(probs, dtype=np.float64))) + stack.b
    z -= z.max(axis=1, keepdims=True)
    q = np.exp(z)
    return q / q.sum(axis=1, keepdims=True)


def fit_stack(probs: np.ndarray, y: np.ndarray, *, l2: float = 1.0) -> Stack:
    """The :class:`Stack` that maximises the likelihood of labels ``y`` (indices) on these rows, with an L2
    penalty ``l2`` on the label biases (a label seldom seen keeps a bias near 0 instead of -inf) and a
    small one on the weights, which are kept >= 0 (a source's probability never counts against its own
    label). L-BFGS-B on the exact gradient (scipy)."""
    from scipy.optimize import minimize

    probs = np.asarray(probs, dtype=np.float64)
    n_s, n, n_l = probs.shape
    x = _log_probs(probs)
    onehot = np.eye(n_l)[np.asarray(y, dtype=int)]

    def loss(theta):
        a, b = theta[:n_s], theta[n_s:]
        z = np.einsum("s,snl->nl", a, x) + b
        z -= z.max(axis=1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        q = np.exp(log_q)
        diff = (q - onehot) / n
        value = -(onehot * log_q).sum() / n + (l2 * (b @ b) + 1e-3 * (a @ a)) / n
        grad_a = np.einsum("nl,snl->s", diff, x) + 2e-3 * a / n
        grad_b = diff.sum(axis=0) + 2 * l2 * b / n
        return value, np.concatenate([grad_a, grad_b])

    start = np.concatenate([np.full(n_s, 1.0 / n_s), np.zeros(n_l)])
    bounds = [(0.0, None)] * n_s + [(None, None)] * n_l
    theta = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds).x
    return Stack(theta[:n_s], theta[n_s:])


def stacked(probs: np.ndarray, *, weights: np.ndarray | None = None, threshold: float = 0.0,
            stack: Stack | None = None) -> Votes:
    """Consensus when the stacked distribution's leading label reaches ``threshold``. Without a fitted
    ``stack`` (no reference rows yet): the product of the specialists' distributions, weighted."""
    probs, w = _check(probs, weights)
    if stack is None:
        stack = Stack(w, np.zeros(probs.shape[2]))
    q = stack_probs(probs, stack)
    leading = q.argmax(axis=1)
    support = q[np.arange(q.shape[0]), leading]
    return Votes(label=np.where(support >= threshold, leading, -1), confidence=support, leading=leading)


def cross_fitted(probs: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, Stack]:
    """Out-of-fold stacked probabilities of the rows (each row scored by a stack fitted without it, so
    a routing fitted on them is not flattered), and the stack fitted on all of them."""
    n = probs.shape[1]
    out = np.zeros(probs.shape[1:])
    order = np.random.default_rng(seed).permutation(n)
    for k in range(min(folds, n)):
        held = order[k::folds]
        train = np.setdiff1d(order, held)
        out[held] = stack_probs(probs[:, held], fit_stack(probs[:, train], y[train]))
    return out, fit_stack(probs, y)


def _sign_test(won: int, lost: int) -> float:
    """One-sided p-value that ``won`` of the ``won + lost`` rows where two rules disagree on who is right
    came out this way by chance (each equally likely)."""
    from scipy.stats import binomtest

    return float(binomtest(won, won + lost, 0.5, alternative="greater").pvalue) if won + lost else 1.0


def chosen_stack(probs: np.ndarray, y: np.ndarray, *, level: float = 0.95, folds: int = 5,
                 seed: int = 0) -> tuple[np.ndarray, Stack, dict]:
    """:func:`cross_fitted` over every specialist, kept only where it beats the best one alone out of fold.

    Each specialist alone (a stack of one: its temperature and the label biases) and all of them together
    are cross-fitted on the reference rows; the single one with the best out-of-fold accuracy (then
    log-likelihood) is the default, and the stack over all of them replaces it only when, on the rows where
    exactly one of the two is right, it wins more than chance allows at ``level`` (a sign test). The rows
    judge the specialists out of fold, which understates those cross-fitted on the rows themselves more than
    the others (a linear head with 77 intents and 100 gold rows: 0.44 out of fold, 0.59 on the other rows),
    so a fitted weighting is biased against them; one specialist alone is not weighted against anything.
    Returns the chosen stack's out-of-fold probabilities, the stack (one weight per specialist: 0 for those
    it leaves out) and what was compared, for the report."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    n_s, n = probs.shape[0], probs.shape[1]
    q_all, stack_all = cross_fitted(probs, y, folds=folds, seed=seed)
    if n_s == 1:
        return q_all, stack_all, {"sources": [0]}
    rows = np.arange(n)
    singles = []
    for s in range(n_s):
        q, st = cross_fitted(probs[s:s + 1], y, folds=folds, seed=seed)
        singles.append((float(np.mean(q.argmax(axis=1) == y)), float(np.mean(np.log(q[rows, y] + 1e-300))), s, q, st))
    acc, _, best, q_one, st_one = max(singles, key=lambda t: t[:2])
    right_all, right_one = q_all.argmax(axis=1) == y, q_one.argmax(axis=1) == y
    won, lost = int(np.sum(right_all & ~right_one)), int(np.sum(~right_all & right_one))
    p = _sign_test(won, lost)
    summary = {"best_single": best, "best_single_accuracy": acc, "all_accuracy": float(np.mean(right_all)),
               "won": won, "lost": lost, "p_value": p}
    if p < 1.0 - level:
        return q_all, stack_all, summary | {"sources": list(range(n_s))}
    a = np.zeros(n_s)
    a[best] = st_one.a[0]
    return q_one, Stack(a, st_one.b), summary | {"sources": [best]}


def controller_probs(answers, confidence, labels) -> np.ndarray:
    """The controller's answers as distributions, shape (n_rows, n_labels): its confidence (the answer's
    probability from logprobs, clipped to [1/n_labels, 1 - 1e-6]; an endpoint without logprobs counts as
    sure) on the label it gave, the rest spread evenly; uniform where it gave none (None or "")."""
    n_l = len(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.full((len(answers), n_l), 1.0 / n_l)
    for i, (a, c) in enumerate(zip(answers, confidence)):
        if not a or a not in index:
            continue
        p = min(max(1.0 if c is None or not np.isfinite(c) else float(c), 1.0 / n_l), 1.0 - 1e-6)
        out[i] = (1.0 - p) / max(n_l - 1, 1)
        out[i, index[a]] = p
    return out


@dataclass(frozen=True)
class Combination:
    """The controller and the specialists combined on the rows the controller answers (``voting.combine``):
    a :class:`Stack` over the specialists' log-probabilities and the controller's (last source), fitted on
    gold reference rows. Judged out of fold on those rows against the controller's own answers: it may
    overrule the controller only when the rows where it did were won (it right, the controller wrong) more
    often than lost. ``sources`` says what it uses: the controller alone (its answers recalibrated, a bias
    per label: an LLM's preference for some labels corrected) or the specialists too."""

    stack: Stack
    sources: str  # "controller" or "controller+specialists"
    rows: int  # gold reference rows the controller answered
    overruled: int  # out of fold, rows where the combination's label is not the controller's
    won: int
    lost: int
    accuracy: float  # out of fold, the combination's accuracy on those rows
    controller_accuracy: float
    # out of fold, on those rows: the combination's distribution (R, L), each row's from a stack fitted without it
    oof: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def applied(self) -> bool:
        return self.won > self.lost

    def as_dict(self) -> dict:
        return {"sources": self.sources, "rows": self.rows, "overruled": self.overruled, "won": self.won,
                "lost": self.lost, "accuracy": round(self.accuracy, 4),
                "controller_accuracy": round(self.controller_accuracy, 4), "applied": self.applied,
                "stack": self.stack.as_dict()}


def fit_combination(probs: np.ndarray, ctrl: np.ndarray, said: np.ndarray, y: np.ndarray, *,
                    folds: int = 5, seed: int = 0) -> Combination:
    """Fit the combination of the specialists' ``probs`` (S, R, L) and the controller's distributions
    ``ctrl`` (R, L) (:func:`controller_probs`) to gold labels ``y`` (R,), the controller's answers being
    ``said`` (R,) label indices, judged on out-of-fold predictions (:func:`cross_fitted`). Two nested
    models are tried, the controller recalibrated alone and with the specialists; the one that wins more
    rows than it loses out of fold, by the widest margin, is kept (a tie keeps the smaller one). The
    stack always has one weight per specialist and the controller's last (0 for unused specialists)."""
    probs = np.asarray(probs, dtype=np.float64)
    ctrl = np.asarray(ctrl, dtype=np.float64)
    y, said = np.asarray(y, dtype=int), np.asarray(said, dtype=int)
    n_s = probs.shape[0]
    best = None
    for sources, use in (("controller", ctrl[None]), ("controller+specialists", np.concatenate([probs, ctrl[None]]))):
        if sources != "controller" and n_s == 0:
            break
        q, stack = cross_fitted(use, y, folds=folds, seed=seed)
        mine = q.argmax(axis=1)
        won, lost = int(np.sum((mine == y) & (said != y))), int(np.sum((mine != y) & (said == y)))
        if use.shape[0] == 1:
            stack = Stack(np.concatenate([np.zeros(n_s), stack.a]), stack.b)
        fit = Combination(stack, sources, len(y), int(np.sum(mine != said)), won, lost,
                          float(np.mean(mine == y)) if len(y) else 0.0, float(np.mean(said == y)) if len(y) else 0.0,
                          oof=q)
        if best is None or fit.won - fit.lost > best.won - best.lost:
            best = fit
    return best


def combine_logits(probs: np.ndarray, stack: Stack) -> np.ndarray:
    """The specialists' part of a combination's logits, shape (n_rows, n_labels): add the controller's
    (:func:`combined_label`) once it has answered."""
    z = np.einsum("s,snl->nl", stack.a[:-1], _log_probs(np.asarray(probs, dtype=np.float64)))
    return z + stack.b


def combined_label(logits: np.ndarray, weight: float, ctrl: np.ndarray) -> tuple[int, float]:
    """The combination's label index and probability for one row: its specialists' ``logits`` (L,), the
    controller's weight in the stack and its distribution ``ctrl`` (L,)."""
    z = np.asarray(logits, dtype=np.float64) + weight * _log_probs(np.asarray(ctrl, dtype=np.float64))
    z -= z.max()
    q = np.exp(z) / np.exp(z).sum()
    k = int(q.argmax())
    return k, float(q[k])


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
        return {"kind": "calibrate", "threshold": self.threshold, "target_accuracy": self.target, "rows": self.rows,
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


def proportion_bound(hits, n, *, level: float = 0.95, side: str = "lower", method: str = "wilson") -> np.ndarray:
    """One-sided ``level`` confidence bound of a binomial proportion ``hits / n`` (arrays broadcast):
    Wilson's score bound or the exact Clopper-Pearson one. ``n == 0`` gives the trivial bound (0 or 1)."""
    from scipy import stats

    hits, n = np.broadcast_arrays(np.asarray(hits, dtype=np.float64), np.asarray(n, dtype=np.float64))
    lower = side == "lower"
    out = np.full(hits.shape, 0.0 if lower else 1.0)
    ok = n > 0
    h, m = hits[ok], n[ok]
    if method == "wilson":
        z = stats.norm.ppf(level)
        p = h / m
        centre = (p + z * z / (2 * m)) / (1 + z * z / m)
        half = z / (1 + z * z / m) * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m))
        out[ok] = np.clip(centre - half if lower else centre + half, 0.0, 1.0)
    elif method == "clopper_pearson":
        with np.errstate(invalid="ignore"):
            if lower:
                out[ok] = np.where(h > 0, stats.beta.ppf(1 - level, h, m - h + 1), 0.0)
            else:
                out[ok] = np.where(h < m, stats.beta.ppf(level, h + 1, m - h), 1.0)
    else:
        raise ConfigError(f"voting.bound {method!r} is unknown; choose wilson or clopper_pearson")
    return out


def paired_difference_bound(won, lost, n, *, level: float = 0.95) -> np.ndarray:
    """One-sided lower ``level`` bound of ``P(won) - P(lost)`` from ``n`` paired rows, ``won`` of them right
    only by the first rule and ``lost`` right only by the second (arrays broadcast): Tango's score bound for
    a difference of paired proportions (Stat Med 1998), found by bisection. It keeps its level with few
    discordant rows, where subtracting two separate bounds, each at ``level``, holds at nearer 99%."""
    from scipy import stats

    b, c, m = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (won, lost, n)))
    z = stats.norm.ppf(level)
    ok = m > 0
    b, c, m = b[ok], c[ok], m[ok]

    def score(d):  # decreasing in d; the restricted MLE of P(lost) under the difference d
        big_a, big_b, big_c = 2 * m, -b - c + (2 * m - b + c) * d, -c * d * (1 - d)
        q = (np.sqrt(np.maximum(big_b ** 2 - 4 * big_a * big_c, 0.0)) - big_b) / (2 * big_a)
        return (b - c - m * d) / np.sqrt(np.maximum(m * (2 * q + d * (1 - d)), 1e-12))

    lo, hi = np.full(m.shape, -1.0), (b - c) / m
    for _ in range(60):
        mid = (lo + hi) / 2
        above = score(mid) > z
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    out = np.full(ok.shape, -1.0)
    out[ok] = lo
    return out


@dataclass(frozen=True)
class Routing:
    """Where the specialists may settle rows, fitted on reference rows (:func:`fit_route`)."""

    threshold: float | None  # None: no threshold is shown good enough; every row goes to the controller
    reference: str  # what the rows' labels are: "gold" (human labels) or "audit" (the controller's answers)
    rows: int  # reference rows it rests on
    level: float
    max_loss: float | None  # the accuracy the settled rows may lose against the controller (None: a target)
    target: float | None  # voting.target_accuracy, when set: the settled rows' lower bound must reach it
    settled_share: float  # of the reference rows, the share the threshold settles
    accuracy: float | None  # the specialists' accuracy on the settled ones (against the reference labels)
    controller_accuracy: float | None  # the controller's on the same rows (gold only)
    controller_accuracy_all: float | None  # the controller's on every reference row (gold only)
    bound: float | None  # at the threshold: the lower bound of the difference, or of the accuracy with a target
    curve: list[dict]  # the same figures at thresholds spread over the reference rows, most confident first

    def as_dict(self) -> dict:
        return {"kind": "route", "threshold": self.threshold, "reference": self.reference, "rows": self.rows,
                "confidence_level": self.level, "max_loss": self.max_loss, "target_accuracy": self.target,
                "settled_share": self.settled_share, "accuracy": self.accuracy,
                "controller_accuracy": self.controller_accuracy,
                "controller_accuracy_all": self.controller_accuracy_all, "bound": self.bound, "curve": self.curve}


def fit_route(votes: Votes, right: np.ndarray, controller_right: np.ndarray | None = None, *,
              level: float = 0.95, max_loss: float = 0.02, target: float | None = None, method: str = "wilson",
              min_settled: int = 5, curve_points: int = 10) -> Routing:
    """The lowest threshold on ``votes.confidence`` whose settled rows are shown good enough.

    ``votes`` is the rule at threshold 0 on the reference rows; ``right[i]``: the specialists' leading
    label is row i's reference label. With gold, ``controller_right[i]``: the controller's answer is
    the gold label. Admitting the k most confident rows is accepted when, at ``level``:

    - with ``target``: the lower bound of the specialists' accuracy on them reaches it;
    - with gold: a lower bound of (specialists' accuracy - controller's accuracy) on those same rows
      reaches ``-max_loss``. Only rows where the two disagree tell them apart: the specialists *win* a
      row where only they are right and *lose* one where only the controller is; the bound is Tango's
      score bound of the paired difference (:func:`paired_difference_bound`), or with ``method``
      clopper_pearson the exact lower bound of the share won minus the exact upper bound of the share
      lost (more conservative than ``level`` says);
    - without gold (``controller_right`` None, the reference labels are the controller's): every
      disagreement may be the specialists' mistake (nothing is known to be won), so the bound is minus
      the upper bound of the disagreement rate.

    The largest such k (at least ``min_settled``, ties in confidence admitted together) wins."""
    right = np.asarray(right, dtype=bool)
    n = len(right)
    base = ~votes.hard
    conf = votes.confidence[base]
    order = np.argsort(-conf, kind="stable")
    conf, r = conf[order], right[base][order]
    c = None if controller_right is None else np.asarray(controller_right, dtype=bool)[base][order]
    k = np.arange(1, len(conf) + 1)
    hits = np.cumsum(r)
    if target is not None:
        bound = proportion_bound(hits, k, level=level, method=method)
        ok = bound >= target
    else:
        won = np.zeros(len(k)) if c is None else np.cumsum(r & ~c)
        lost = k - hits if c is None else np.cumsum(~r & c)
        if c is not None and method == "wilson":
            bound = paired_difference_bound(won, lost, k, level=level)
        else:  # without gold only a loss can be seen; clopper_pearson: two exact bounds, more conservative
            bound = (proportion_bound(won, k, level=level, method=method)
                     - proportion_bound(lost, k, level=level, side="upper", method=method))
        ok = bound >= -max_loss - 1e-12
    edge = np.ones(len(conf), dtype=bool)  # k is a threshold only where the next row is less confident
    edge[:-1] = conf[1:] != conf[:-1]
    ok &= edge & (k >= min_settled)
    ctrl_hits = None if c is None else np.cumsum(c)
    ctrl_all = None if controller_right is None else float(np.mean(controller_right)) if n else None

    def point(j: int) -> dict:  # the figures when the j+1 most confident rows are settled
        return {"threshold": round(float(conf[j]), 4), "settled_share": round((j + 1) / n, 4),
                "accuracy": round(float(hits[j] / (j + 1)), 4), "bound": round(float(bound[j]), 4),
                "controller_accuracy": None if ctrl_hits is None else round(float(ctrl_hits[j] / (j + 1)), 4)}

    picks = sorted({int(round(x)) for x in np.linspace(0, len(conf) - 1, min(curve_points, len(conf)))})
    curve = [point(j) for j in picks] if len(conf) else []
    loss = None if target is not None else max_loss
    if not ok.any():
        return Routing(None, "gold" if c is not None else "audit", n, level, loss, target, 0.0, None, None, ctrl_all,
                       None, curve)
    j = int(np.flatnonzero(ok)[-1])
    return Routing(float(conf[j]), "gold" if c is not None else "audit", n, level, loss, target, (j + 1) / n,
                   float(hits[j] / (j + 1)), None if ctrl_hits is None else float(ctrl_hits[j] / (j + 1)), ctrl_all,
                   float(bound[j]), curve)


RULES: dict[str, Callable[..., Votes]] = {
    "unanimity": unanimity,
    "majority": majority,
    "confidence_weighted": confidence_weighted,
    "stacked": stacked,
}


def get_rule(name: str) -> Callable[..., Votes]:
    try:
        return RULES[name]
    except KeyError:
        hint = " (auto is made a rule by VotingConfig.resolved before voting)" if name == "auto" else ""
        raise ConfigError(
            f"voting.rule {name!r} is unknown; choose one of {sorted(RULES)}{hint}"
        ) from None


def top_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row, highest first, shape (n_rows, k)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-scores, part, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def merged_shortlist(model, near, k: int) -> list[list[int]]:
    """Per row, the ``k`` label indices offered when a task has more labels than that: the model's top half
    (``model``: each row's indices ranked best first), then the labels nearest the text (``near``, ranked the same
    way) until there are ``k``, then the rest of the model's; either alone when the other is None. Measured for
    active mode (``orchestrator/active.py: shortlist``): on banking77 the true label is in the model's top 12 for
    42-95% of rows (50-400 rows trained on), in the 12 nearest by label similarity for 92%, in the two halves
    together for 92-97%. An endpoint answers only labels it is offered, so a row whose shortlist misses is wrong."""
    rows = len(model) if model is not None else len(near)
    out = []
    for i in range(rows):
        if model is None or near is None:
            row = list((model if near is None else near)[i])
        else:
            row = list(dict.fromkeys([*model[i][:(k + 1) // 2], *near[i], *model[i]]))
        out.append([int(j) for j in row[:k]])
    return out


def _combination(probs: np.ndarray, said: np.ndarray, check, asked: np.ndarray, gold: np.ndarray,
                 names: np.ndarray, *, hard: np.ndarray) -> tuple[Combination | None, np.ndarray]:
    """:func:`fit_combination` on the gold reference rows the controller answered and the routing leaves to it
    (``hard``: the rows it would decide; a row the specialists settle never reaches it), and which rows those
    were."""
    conf = np.array(check.controller_confidence if check.controller_confidence is not None
                    else [None] * len(asked), dtype=object)[asked]
    answered = np.array([bool(s) for s in said]) & np.asarray(hard, dtype=bool)
    if answered.sum() < 2:
        return None, answered
    index = {str(n): i for i, n in enumerate(names)}
    labels = [str(n) for n in names]
    ctrl = controller_probs(list(said[answered]), list(conf[answered]), labels)
    fit = fit_combination(probs[:, answered], ctrl, np.array([index[str(s)] for s in said[answered]]),
                          np.array([index[str(g)] for g in gold[answered]]))
    return fit, answered


def reference_decisions(ref: Votes, threshold: float | None, said: np.ndarray, names: np.ndarray,
                        combination: Combination | None, combined_rows: np.ndarray, rows) -> dict:
    """What the job decides on the gold reference rows themselves, every part out of fold: ``ref`` holds the
    rule's votes from out-of-fold probabilities (the stacked rule's own fitted without the row), settled where
    the routing's ``threshold`` settles them; on the rows it leaves to the controller, the combination's
    out-of-fold label where it pays (``combined_rows``: the rows it was fitted on), else the controller's
    answer ``said``. A gold row's label is never its gold label: what it says is what the run would have said
    without it. Lists aligned with the reference rows; ``rows`` are their input row numbers (None outside it)."""
    settled = ~gated(ref, threshold).hard
    out: dict = {"row": [None if r is None else int(r) for r in rows], "label": [], "decided_by": [], "confidence": []}
    fitted = np.cumsum(combined_rows) - 1  # a reference row's position among the combination's rows
    for j in range(len(said)):
        if settled[j]:
            label, who, p = str(names[ref.leading[j]]), "consensus", float(ref.confidence[j])
        elif combination is not None and combination.applied and combined_rows[j] and combination.oof is not None:
            q = combination.oof[fitted[j]]
            k = int(q.argmax())
            label, p = str(names[k]), float(q[k])
            who = "controller" if label == str(said[j]) else "combined"
        elif said[j]:
            label, who, p = str(said[j]), "controller", None
        else:  # the controller failed on it up front: the row stays as the run left it
            label, who, p = None, "unresolved", None
        out["label"].append(label)
        out["decided_by"].append(who)
        out["confidence"].append(p)
    return out


def _named_choice(chosen: dict, specialists: list[str]) -> dict:
    """:func:`chosen_stack`'s summary with specialist names for indices, rounded for the report."""
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in chosen.items()}
    out["sources"] = [specialists[i] for i in chosen["sources"]]
    if "best_single" in chosen:
        out["best_single"] = specialists[chosen["best_single"]]
    return out


def check_judge(voting, *, min_fit_rows: int = 1) -> Callable[..., dict]:
    """What the voting rule of ``voting`` (a :class:`VotingConfig`; unanimity when None) makes of the
    specialists on held-out check rows, as ``training/stage.evaluate`` asks: the share of hard rows and the
    accuracy of the consensus rows, under the threshold it fits first (``gate``: what the voters are given):

    - ``voting.route: measured`` and at least ``min_fit_rows`` check rows the controller answered
      (``check.controller``): :func:`fit_route` on those rows;
    - else, with ``voting.target_accuracy`` and at least ``min_fit_rows`` rows: :func:`calibrate`;
    - else the configured threshold, nothing fitted."""

    def judge(probs: np.ndarray, gold: np.ndarray, names: np.ndarray, specialists: list[str], check=None) -> dict:
        weights = None if voting is None or not voting.weights else [voting.weights.get(n, 1.0) for n in specialists]
        answers = getattr(check, "controller", None)
        asked = (np.array([a is not None for a in answers], dtype=bool) if answers is not None
                 else np.zeros(len(gold), dtype=bool))
        # the job resolves rule auto once (VotingConfig.resolved); a judge called on its own does the same here
        rule = get_rule("unanimity" if voting is None else voting.resolved(measured=bool(asked.any())).rule)
        route = voting is not None and voting.route == "measured" and asked.sum() >= min_fit_rows
        target = None if voting is None or probs.shape[1] < min_fit_rows else voting.target_accuracy
        out: dict = {}
        if route:
            said = np.array(answers, dtype=object)[asked]
            stack, chosen = None, None
            if rule is stacked:  # learned on the reference rows; routed on its out-of-fold answers there
                index = {str(n): i for i, n in enumerate(names)}
                q, stack, chosen = chosen_stack(probs[:, asked], np.array([index[str(g)] for g in gold[asked]]),
                                                level=voting.confidence_level)
                lead = q.argmax(axis=1)
                ref = Votes(label=lead, confidence=q[np.arange(len(q)), lead], leading=lead)
            else:
                ref = rule(probs[:, asked], weights=weights, threshold=0.0)
            controller_right = None if check.source == "audit" else said == gold[asked]
            fit = fit_route(ref, names[ref.leading] == gold[asked], controller_right, level=voting.confidence_level,
                            max_loss=voting.max_loss, target=voting.target_accuracy, method=voting.bound)
            extra = {} if stack is None else {"stack": stack}
            votes = gated(rule(probs, weights=weights, threshold=0.0, **extra), fit.threshold)
            out["gate"] = fit.as_dict() | ({} if stack is None else {"stack": stack.as_dict()})
            if chosen is not None:
                out["gate"]["stack_choice"] = _named_choice(chosen, specialists)
            combination, combined_rows = None, np.zeros(len(said), dtype=bool)
            if voting.combine == "auto" and controller_right is not None:
                # judged on the reference rows it would decide: those the gated rule leaves to the controller
                combination, combined_rows = _combination(probs[:, asked], said, check, asked, gold[asked], names,
                                                          hard=votes.hard[asked])
                out["gate"]["combine"] = None if combination is None else combination.as_dict()
            if controller_right is not None and check.rows is not None:
                out["reference_decisions"] = reference_decisions(
                    ref, fit.threshold, said, names, combination, combined_rows,
                    np.array(check.rows, dtype=object)[asked])
        elif target is not None:
            base = rule(probs, weights=weights, threshold=0.0)
            fit = calibrate(base, names[base.leading] == gold, target=target)
            votes = gated(base, fit.threshold)
            out["gate"] = fit.as_dict()
        else:
            threshold = {} if voting is None or voting.threshold is None else {"threshold": voting.threshold}
            votes = rule(probs, weights=weights, **threshold)
        easy = ~votes.hard
        agreed = names[votes.leading]
        out.update(hard_share=float(np.mean(votes.hard)),
                   consensus_accuracy=float(np.mean(agreed[easy] == gold[easy])) if easy.any() else None)
        return out

    return judge
