"""Seed selection: a small, diverse set of rows for the controller to label first.

There are no ready task classifiers offline and users bring their own label sets, so the
specialists start from a seed set: k-means over sentence embeddings, then the row nearest each
centroid. Plain functions over arrays.
"""

from __future__ import annotations

import numpy as np

from labelwright.orchestrator.voting import top_candidates


def kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ then Lloyd iterations on rows of ``x``. Returns (centroids (k, d), assignment (n,))."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(n)]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        j = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centroids[i] = x[j]
        d2 = np.minimum(d2, ((x - centroids[i]) ** 2).sum(1))
    assign = np.zeros(n, dtype=np.int64)
    x_sq = (x**2).sum(1, keepdims=True)
    for _ in range(iters):
        dist = x_sq - 2 * x @ centroids.T + (centroids**2).sum(1)
        new = dist.argmin(1)
        if _ > 0 and np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centroids[c] = members.mean(0)
    return centroids, assign


def diverse_sample(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` distinct rows of ``x``: the row nearest each k-means centroid."""
    x = np.asarray(x, dtype=np.float32)
    k = min(k, x.shape[0])
    centroids, _ = kmeans(x, k, seed=seed)
    dist = (x**2).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids**2).sum(1)
    chosen: list[int] = []
    taken = np.zeros(x.shape[0], dtype=bool)
    for c in range(k):
        order = np.argsort(dist[:, c], kind="stable")
        j = next(int(i) for i in order if not taken[i])
        taken[j] = True
        chosen.append(j)
    return np.array(sorted(chosen), dtype=np.int64)


def nearest(queries: np.ndarray, bank: np.ndarray, k: int, *, query_texts: list[str] | None = None,
            bank_texts: list[str] | None = None) -> list[list[int]]:
    """For L2-normalised rows, the indices of the ``k`` most similar bank rows per query, best first.

    With ``query_texts`` and ``bank_texts``, a bank row with the query's own text is never among them
    (leave-one-out: a labelled row in the bank must not hand a query its own label)."""
    n = 0 if bank.shape[0] == 0 or k <= 0 else min(k, bank.shape[0])
    if n == 0:
        return [[] for _ in range(queries.shape[0])]
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(bank, dtype=np.float32).T
    if query_texts is not None and bank_texts is not None:
        where: dict[str, list[int]] = {}
        for j, t in enumerate(bank_texts):
            where.setdefault(t, []).append(j)
        for i, t in enumerate(query_texts):
            sims[i, where.get(t, [])] = -np.inf  # ranked last, and dropped below
    idx = top_candidates(sims, n)
    return [[int(j) for j in row if sims[i, j] > -np.inf] for i, row in enumerate(idx)]
