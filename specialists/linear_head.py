"""The multinomial logistic-regression head of the linear specialists (TF-IDF, embeddings), by scikit-learn.

Plain functions, arrays in, arrays out. The fit is scikit-learn's ``LogisticRegression`` (L-BFGS, L2 on
the weights, the intercept unpenalised); what is kept is only its weights ``W`` (d, K) and bias ``b``
(K,), so a checkpoint is two arrays and loading it runs no pickle.
"""

from __future__ import annotations

import warnings

import numpy as np

from labelwright.specialists.base import softmax_rows

MAX_ITER = 500


def fit_linear_head(features, y: np.ndarray, n_classes: int, *, sample_weight: np.ndarray | None = None,
                    l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """``W`` (d, K) and ``b`` (K,) minimising the weighted mean cross-entropy + l2/2 * |W|^2.

    ``features`` is a dense array or a scipy sparse matrix (n, d); ``y`` holds label indices in
    ``[0, n_classes)``. In scikit-learn's terms that is ``C = 1 / l2`` with the row weights normalised to
    sum 1, and ``C = 2 / l2`` for two classes (scikit-learn then fits the one difference vector v of the two
    columns, whose penalty at the multinomial optimum is l2/4 * |v|^2). Classes absent from ``y`` get a bias of -30 (probability ~1e-13), so every label keeps a
    column. With fewer than two classes present there is nothing to separate: ``W`` is 0 and ``b`` the log
    of the add-one smoothed class prior, with a warning.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=np.int64)
    w = np.ones(len(y), np.float64) if sample_weight is None else np.asarray(sample_weight, np.float64)
    d = features.shape[1]
    counts = np.bincount(y, weights=w, minlength=n_classes)
    present = np.flatnonzero(counts > 0)
    if len(present) < 2:
        warnings.warn(
            f"only {len(present)} class present in the training set: the classifier predicts the smoothed class "
            "prior for every text; label rows of other classes to make it useful",
            RuntimeWarning, stacklevel=3,
        )
        prior = (counts + 1.0) / (counts.sum() + n_classes)
        return np.zeros((d, n_classes), np.float32), np.log(prior).astype(np.float32)
    c = (2.0 if len(present) == 2 else 1.0) / max(l2, 1e-12)
    model = LogisticRegression(C=c, max_iter=MAX_ITER, tol=1e-6)
    with warnings.catch_warnings():
        # Stopping at MAX_ITER on a tiny L2 leaves the weights a little short of the optimum; the
        # predictions are those of a strongly fitted model either way.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # Many labels and few rows (77 intents, 100 rows) is the normal case here, not a regression problem.
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        model.fit(features, y, sample_weight=w / w.sum())
    W = np.zeros((d, n_classes), np.float32)
    b = np.full(n_classes, -30.0, np.float32)
    if len(model.classes_) == 2:  # scikit-learn keeps one weight vector for two classes: p1 = sigmoid(x.w + c)
        W[:, model.classes_[1]] = model.coef_[0]
        b[model.classes_] = [0.0, model.intercept_[0]]
    else:
        W[:, model.classes_] = model.coef_.T
        b[model.classes_] = model.intercept_
    return W, b


def predict_linear_head(features, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """softmax(features @ W + b) as float32 (n, K); ``features`` dense or scipy sparse."""
    logits = np.asarray(features @ W, dtype=np.float64) + b
    return softmax_rows(logits).astype(np.float32)


def standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features - mean) / scale`` column by column, ``scale`` the column's standard deviation times sqrt(d) (so a
    row's squared norm is about 1, as for the L2-normalised sentence embeddings the heads' L2 strengths were measured
    on); returns the standardised features, ``mean`` and ``scale``. For features whose columns differ in size by
    orders of magnitude (a causal LM's hidden states), where an L2 penalty would otherwise fall on the wrong ones."""
    X = np.asarray(features, np.float64)
    mean = X.mean(0)
    scale = (X.std(0) + 1e-6) * np.sqrt(X.shape[1])
    return ((X - mean) / scale).astype(np.float32), mean, scale


def unstandardised(W: np.ndarray, b: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head fitted on ``standardise``d features, as one on the raw features: ``predict_linear_head`` then needs
    no statistics besides ``W`` and ``b``."""
    W2 = (np.asarray(W, np.float64) / scale[:, None])
    return W2.astype(np.float32), (np.asarray(b, np.float64) - (mean / scale) @ np.asarray(W, np.float64)).astype(np.float32)


# Weights tried for the rows that are always trained on (labels of unknown quality: the controller's) against
# the cross-fitted rows (the trusted ones), largest first: a tie keeps more data.
OTHER_ROW_WEIGHTS = (1.0, 0.5, 0.2, 0.0)


def cross_fit_head(features, y: np.ndarray, weights: np.ndarray, folds: np.ndarray, n_classes: int, *,
                   l2: float, other_weights: tuple[float, ...] = OTHER_ROW_WEIGHTS
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Fit the head on every row and score each held row (``folds >= 0``) with a head fitted without its fold.

    The rows with ``folds < 0`` are always trained on; their weights are scaled by each of ``other_weights``
    in turn, and the scale whose out-of-fold predictions give the held rows the best log-likelihood is kept
    (0 leaves them out): where the held rows are gold and the others the controller's answers, this is how
    much the controller's labels are worth, measured. Returns ``W``, ``b``, the out-of-fold probabilities
    (n, K; NaN on the rows always trained on) and the chosen scale."""
    y = np.asarray(y, dtype=np.int64)
    weights, folds = np.asarray(weights, np.float64), np.asarray(folds)
    always, held = folds < 0, folds >= 0
    choices = other_weights if always.any() else (1.0,)
    best = None
    for scale in choices:
        w = np.where(always, weights * scale, weights)
        oof = np.full((len(y), n_classes), np.nan, np.float32)
        for k in np.unique(folds[held]):
            train = (folds != k) & (w > 0)
            W, b = fit_linear_head(features[train], y[train], n_classes, sample_weight=w[train], l2=l2)
            oof[folds == k] = predict_linear_head(features[folds == k], W, b)
        loss = -float(np.mean(np.log(np.clip(oof[held, y[held]], 1e-12, 1.0)))) if held.any() else 0.0
        if best is None or loss < best[0]:
            best = (loss, scale, oof)
    _, scale, oof = best
    w = np.where(always, weights * scale, weights)
    W, b = fit_linear_head(features[w > 0], y[w > 0], n_classes, sample_weight=w[w > 0], l2=l2)
    return W, b, oof, float(scale)
