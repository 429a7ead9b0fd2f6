"""Learning to reweight (Ren et al. 2018) for the linear head over frozen embeddings.

LLM labels are noisy. Each row's weight comes from a one-step look-ahead: how much a small gradient step on
that row alone would lower the loss on a trusted reference set (gold rows, or the controller's answers on a
random audit). For the head ``softmax(x W + b)`` both gradients have a closed form (``x (p - y)^T`` and
``p - y``), so the look-ahead of every row of a mini-batch is one product: ``x_i^T G_W r_i + g_b^T r_i``,
with ``r_i = p_i - y_i`` and ``(G_W, g_b)`` the reference rows' mean gradient. A row whose step would *raise*
the reference loss (a label the reference contradicts) gets weight 0 (clamped), the rest are normalised to
sum to one within the batch, and the head takes that weighted step (plain SGD, as in the paper). A row's
weight is the sum of the weights it got over the epochs, scaled so that the rows of each label average 1
(see ``per_label``).

Plain numpy; the caller refits its head with these weights (``fit_linear_head(..., sample_weight=w)``).
"""

from __future__ import annotations

import numpy as np

from labelwright.specialists.base import softmax_rows


def _one_hot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(y), k), np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def lookahead_weights(X: np.ndarray, y: np.ndarray, n_classes: int, *, ref_X: np.ndarray, ref_y: np.ndarray,
                      epochs: int = 10, batch_size: int = 32, lr: float = 0.5, l2: float = 1e-3,
                      seed: int = 0, per_label: bool = True) -> np.ndarray:
    """Per-row weights (n,), >= 0, mean 1 over the rows of each label (``per_label``; else over all rows).

    ``per_label``: the weights only rank the rows of one label against each other, and each label keeps its
    total. Measured (``python benchmarks/active.py --noise-check``: random rows, 15% of their labels wrong, 100
    gold reference rows, 100 / 200 / 400 rows bought of 2,000): normalised over all rows the weights lost 2.6 to
    3.8 points on yahoo_topics and 20 to 30 on banking77 against no weights (movie_sentiment: -0.1 to +1.0),
    because a label the reference has few or no rows of gets little or no weight (77 intents, 100 reference
    rows); normalised per label they gained 2.9 to 4.2 points on yahoo_topics, 0.5 to 2.5 on banking77 and 0.0
    to 0.5 on movie_sentiment. A label none of whose rows helps the reference keeps 1.

    ``X`` (n, d) and ``ref_X`` (m, d): embeddings (L2-normalised rows suit ``lr`` 0.5); ``y``, ``ref_y``: label
    indices. The head starts at zero and is trained by the reweighted steps while the weights are gathered."""
    X = np.asarray(X, np.float64)
    ref_X = np.asarray(ref_X, np.float64)
    y, ref_y = np.asarray(y, np.int64), np.asarray(ref_y, np.int64)
    n = len(y)
    if n == 0:
        return np.zeros(0, np.float64)
    if len(ref_y) == 0:
        raise ValueError("learning to reweight needs reference rows (gold rows or an audit sample); got none")
    W = np.zeros((X.shape[1], n_classes))
    b = np.zeros(n_classes)
    Y, ref_Y = _one_hot(y, n_classes), _one_hot(ref_y, n_classes)
    total = np.zeros(n)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(n), max(1, int(np.ceil(n / batch_size)))):
            ref_r = softmax_rows(ref_X @ W + b).astype(np.float64) - ref_Y
            G_W, g_b = ref_X.T @ ref_r / len(ref_y), ref_r.mean(0)
            xb = X[batch]
            r = softmax_rows(xb @ W + b).astype(np.float64) - Y[batch]
            # d(reference loss after a step of size lr * eps_i on row i) / d(eps_i) at 0 = -lr * <grad_ref, grad_i>
            align = np.einsum("nd,dk,nk->n", xb, G_W, r) + r @ g_b
            w = np.maximum(align, 0.0)
            if w.sum() <= 0:
                continue  # no row of this batch helps the reference: the paper skips the step
            w = w / w.sum()
            total[batch] += w * len(batch)
            W -= lr * (xb.T @ (w[:, None] * r) + l2 * W)
            b -= lr * (w @ r)
    if not per_label:
        return total * n / total.sum() if total.sum() > 0 else np.ones(n)
    out = np.ones(n)
    for c in np.unique(y):
        rows = y == c
        if total[rows].sum() > 0:
            out[rows] = total[rows] / total[rows].mean()
    return out
