import numpy as np

from labelwright.orchestrator.seed import diverse_sample, kmeans, nearest


def blobs(n_per=30, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, 8)) * 10
    x = np.concatenate([c + rng.normal(size=(n_per, 8)) for c in centers])
    return x, np.repeat(np.arange(k), n_per)


def test_kmeans_recovers_separated_blobs():
    x, y = blobs()
    _, assign = kmeans(x, 4)
    # each found cluster is pure
    for c in range(4):
        assert len(set(y[assign == c])) == 1


def test_diverse_sample_covers_every_blob_with_distinct_rows():
    x, y = blobs()
    idx = diverse_sample(x, 4)
    assert len(set(idx.tolist())) == 4
    assert sorted(y[idx].tolist()) == [0, 1, 2, 3]
    assert len(diverse_sample(x[:3], 10)) == 3  # never more rows than exist


def test_nearest_best_first():
    bank = np.eye(3, dtype=np.float32)
    q = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]], dtype=np.float32)
    assert nearest(q, bank, 2) == [[0, 1], [2, 1]]
    assert nearest(q, bank[:0], 2) == [[], []]


def test_nearest_leaves_out_the_querys_own_text():
    """A gold row in the demonstration bank must never be shown its own label: the next nearest takes its place."""
    bank = np.eye(3, dtype=np.float32)
    q = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]], dtype=np.float32)
    texts = ["a", "b", "c"]
    assert nearest(q, bank, 2, query_texts=["a", "z"], bank_texts=texts) == [[1, 2], [2, 1]]
    assert nearest(q, bank, 3, query_texts=["a", "c"], bank_texts=texts) == [[1, 2], [1, 0]]  # fewer than k left
    assert nearest(q, bank, 1, query_texts=["a", "a"], bank_texts=["a", "a", "c"]) == [[2], [2]]  # duplicates too
