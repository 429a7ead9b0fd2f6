"""Which rows to ask the controller about, and which labelled rows to show it.

The seed set (a small, diverse set labelled first), the rows an active round buys (``acquire``: by
uncertainty, diversity or both, LLMaAA's strategies) and the nearest labelled rows shown as demonstrations.
Plain functions over probabilities and embeddings, usable without Ray.
"""

from __future__ import annotations

import numpy as np

from labelwright.orchestrator.voting import top_candidates

STRATEGIES = ("random", "entropy", "least_confidence", "margin", "kmeans", "kcenter", "hybrid")
UNCERTAINTY = ("entropy", "least_confidence", "margin")


def kmeans(x: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means (scikit-learn's: k-means++, one start; mini-batches past 20,000 rows) on the rows of ``x``.
    Returns (centroids (k, d), assignment (n,))."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    model = (MiniBatchKMeans(n_clusters=k, n_init=1, random_state=seed, batch_size=4096) if n > 20_000
             else KMeans(n_clusters=k, n_init=1, random_state=seed))
    assign = model.fit_predict(x)
    return model.cluster_centers_.astype(np.float32), assign.astype(np.int64)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x**2).sum(1, keepdims=True) - 2 * x @ c.T + (c**2).sum(1), 0.0)


def diverse_sample(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` distinct rows of ``x``: the row nearest each k-means centroid."""
    x = np.asarray(x, dtype=np.float32)
    k = min(k, x.shape[0])
    centroids, _ = kmeans(x, k, seed=seed)
    dist = _sq_dist(x, centroids)
    chosen: list[int] = []
    taken = np.zeros(x.shape[0], dtype=bool)
    for c in range(k):
        order = np.argsort(dist[:, c], kind="stable")
        j = next(int(i) for i in order if not taken[i])
        taken[j] = True
        chosen.append(j)
    return np.array(sorted(chosen), dtype=np.int64)


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """Per row, how unsure the model is (higher: more worth asking): ``entropy`` of its distribution,
    ``least_confidence`` one minus its top probability, ``margin`` minus the gap between its top two."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    if strategy == "entropy":
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    if strategy == "least_confidence":
        return 1.0 - p.max(1)
    if strategy == "margin":
        top2 = -np.sort(-p, axis=1)[:, :2]
        return -(top2[:, 0] - (top2[:, 1] if p.shape[1] > 1 else 0.0))
    raise ValueError(f"unknown uncertainty {strategy!r}; choose one of {', '.join(UNCERTAINTY)}")


def k_center_greedy(x: np.ndarray, k: int, *, labelled: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Greedy k-center (Sener & Savarese 2018): each pick is the row farthest from every labelled row and
    every row picked before it (the first is random when nothing is labelled)."""
    x = np.asarray(x, dtype=np.float32)
    k = min(k, x.shape[0])
    if k == 0:
        return np.zeros(0, np.int64)
    if labelled is not None and len(labelled):
        dist = _sq_dist(x, np.asarray(labelled, np.float32)).min(1)
        chosen = []
    else:
        first = int(np.random.default_rng(seed).integers(x.shape[0]))
        dist, chosen = _sq_dist(x, x[first:first + 1])[:, 0], [first]
    while len(chosen) < k:
        j = int(np.argmax(dist))
        chosen.append(j)
        dist = np.minimum(dist, _sq_dist(x, x[j:j + 1])[:, 0])
    return np.array(sorted(chosen), dtype=np.int64)


def acquire(strategy: str, k: int, *, probs: np.ndarray | None = None, embeddings: np.ndarray | None = None,
            labelled: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Indices (sorted, distinct) of the ``k`` rows of an unlabelled pool to ask about next.

    ``probs`` (n, labels): the task model's predictions on the pool (the uncertainty strategies and
    ``hybrid``); ``embeddings`` (n, d): the pool's (``kmeans``, ``kcenter``, ``hybrid``); ``labelled`` (m, d):
    the embeddings of the rows already labelled (``kcenter`` starts from them). Strategies:
    ``random``; ``entropy``, ``least_confidence``, ``margin`` (the most uncertain rows); ``kmeans`` (the row
    nearest each of k centroids); ``kcenter`` (greedy k-center); ``hybrid`` (k-means into k clusters, then
    the most uncertain row, by entropy, of each: uncertain rows that are not all alike)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown acquisition strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    pool = probs if probs is not None else embeddings
    if pool is None:
        raise ValueError("acquire needs the pool's probs or embeddings")
    n = len(pool)
    k = max(0, min(int(k), n))
    needs_probs = strategy in UNCERTAINTY or strategy == "hybrid"
    needs_emb = strategy in ("kmeans", "kcenter", "hybrid")
    if needs_probs and probs is None:
        raise ValueError(f"acquisition {strategy!r} needs the task model's probabilities on the pool")
    if needs_emb and embeddings is None:
        raise ValueError(f"acquisition {strategy!r} needs the pool's embeddings")
    if k == 0:
        return np.zeros(0, np.int64)
    if strategy == "random":
        return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)
    if strategy in UNCERTAINTY:
        return np.sort(np.argsort(-uncertainty(probs, strategy), kind="stable")[:k]).astype(np.int64)
    if strategy == "kmeans":
        return diverse_sample(embeddings, k, seed=seed)
    if strategy == "kcenter":
        return k_center_greedy(embeddings, k, labelled=labelled, seed=seed)
    _, assign = kmeans(embeddings, k, seed=seed)
    score = uncertainty(probs, "entropy")
    chosen = [int(members[np.argmax(score[members])]) for c in range(k)
              if len(members := np.flatnonzero(assign == c))]
    if len(chosen) < k:  # an empty cluster: fill up with the most uncertain rows not yet chosen
        rest = [int(i) for i in np.argsort(-score, kind="stable") if int(i) not in set(chosen)]
        chosen += rest[:k - len(chosen)]
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
