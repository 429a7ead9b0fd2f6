import numpy as np

from labelwright.orchestrator.acquisition import diverse_sample, kmeans, nearest


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


# ---------------------------------------------------------------- acquisition strategies (LLMaAA)

import pytest  # noqa: E402

from labelwright.orchestrator.acquisition import STRATEGIES, acquire, k_center_greedy, uncertainty  # noqa: E402

PROBS = np.array([
    [1.0, 0.0, 0.0],    # sure
    [0.5, 0.5, 0.0],    # torn between two
    [1 / 3, 1 / 3, 1 / 3],  # knows nothing
    [0.6, 0.3, 0.1],
])


def test_uncertainty_scores_by_hand():
    ent = uncertainty(PROBS, "entropy")
    assert ent[0] == pytest.approx(0.0)
    assert ent[1] == pytest.approx(np.log(2))
    assert ent[2] == pytest.approx(np.log(3))
    assert ent[3] == pytest.approx(-(0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1)))
    assert uncertainty(PROBS, "least_confidence") == pytest.approx([0.0, 0.5, 2 / 3, 0.4])
    assert uncertainty(PROBS, "margin") == pytest.approx([-1.0, 0.0, 0.0, -0.3])


def test_uncertainty_strategies_pick_the_least_sure_rows():
    # a spread over three labels (row 3) has more entropy than a tie of two (row 1); its top is surer
    assert acquire("entropy", 2, probs=PROBS).tolist() == [2, 3]
    assert acquire("least_confidence", 2, probs=PROBS).tolist() == [1, 2]
    assert acquire("least_confidence", 1, probs=PROBS).tolist() == [2]
    assert acquire("margin", 3, probs=PROBS).tolist() == [1, 2, 3]


def test_random_is_distinct_and_repeatable():
    a = acquire("random", 5, probs=np.full((20, 2), 0.5), seed=3)
    assert len(set(a.tolist())) == 5 and a.tolist() == acquire("random", 5, probs=np.full((20, 2), 0.5), seed=3).tolist()
    assert len(acquire("random", 50, probs=np.full((20, 2), 0.5))) == 20  # never more rows than the pool has


def test_k_center_greedy_goes_farthest_from_what_is_labelled():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [5.0]])
    assert k_center_greedy(x, 1, labelled=np.array([[0.0]])).tolist() == [3]
    # 10 first; then 5 is farthest from {0, 10}; the pick order does not matter, the set does
    assert k_center_greedy(x, 2, labelled=np.array([[0.0]])).tolist() == [3, 4]
    assert acquire("kcenter", 2, embeddings=x, labelled=np.array([[0.0]])).tolist() == [3, 4]


def test_hybrid_takes_the_most_uncertain_row_of_each_cluster():
    x, y = blobs(n_per=10, k=2)
    probs = np.tile([0.95, 0.05], (20, 1))
    probs[3] = [0.55, 0.45]   # the unsure one of blob 0
    probs[7] = [0.7, 0.3]     # less unsure, same blob
    probs[15] = [0.6, 0.4]    # the unsure one of blob 1
    assert acquire("hybrid", 2, probs=probs, embeddings=x).tolist() == [3, 15]
    # entropy alone takes both from blob 0's neighbourhood of doubt
    assert acquire("entropy", 2, probs=probs).tolist() == [3, 15]
    assert acquire("entropy", 3, probs=probs).tolist() == [3, 7, 15]
    assert acquire("kmeans", 2, embeddings=x).tolist() != []


def test_acquire_says_what_is_missing():
    with pytest.raises(ValueError, match="unknown acquisition strategy 'best'"):
        acquire("best", 2, probs=PROBS)
    with pytest.raises(ValueError, match="needs the pool's embeddings"):
        acquire("kmeans", 2, probs=PROBS)
    with pytest.raises(ValueError, match="needs the task model's probabilities"):
        acquire("entropy", 2, embeddings=np.zeros((4, 2)))
    for s in STRATEGIES:
        assert acquire(s, 0, probs=PROBS, embeddings=np.eye(4)).tolist() == []
