"""Multinomial logistic regression in torch: full-batch L-BFGS, L2 on the weights, per-row weights.

Plain functions, arrays in, arrays out. Used by the linear specialists (TF-IDF, embeddings).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


def fit_logistic_regression(
    features,
    y: np.ndarray,
    n_classes: int,
    *,
    sample_weight: np.ndarray | None = None,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit weights ``W`` (d, K) and bias ``b`` (K,) minimising weighted mean cross-entropy + l2/2 * |W|^2.

    ``features`` is a dense array/tensor (n, d) or a torch sparse tensor. Classes absent from ``y``
    keep a column whose probability ends near 0. With fewer than two classes present there is
    nothing to separate: ``W`` stays 0 and ``b`` is the log of the add-one smoothed class prior.
    """
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n = len(y_t)
    w = torch.ones(n) if sample_weight is None else torch.as_tensor(np.asarray(sample_weight), dtype=torch.float32)
    X = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features, dtype=np.float32))
    X = X.float()
    d = X.shape[1]

    counts = torch.zeros(n_classes).index_add_(0, y_t, w)
    prior = (counts + 1.0) / (counts.sum() + n_classes)
    if int((counts > 0).sum()) < 2:
        warnings.warn(
            f"only {int((counts > 0).sum())} class present in the training set: the classifier predicts the "
            "smoothed class prior for every text; label rows of other classes to make it useful",
            RuntimeWarning,
            stacklevel=3,
        )
        return np.zeros((d, n_classes), np.float32), prior.log().numpy().astype(np.float32)

    W = torch.zeros(d, n_classes, requires_grad=True)
    b = prior.log().clone().requires_grad_(True)
    w_norm = w / w.sum()
    matmul = torch.sparse.mm if X.is_sparse else torch.matmul
    opt = torch.optim.LBFGS(
        [W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-6, tolerance_change=1e-10,
    )

    def closure():
        opt.zero_grad()
        logits = matmul(X, W) + b
        loss = (F.cross_entropy(logits, y_t, reduction="none") * w_norm).sum() + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32)


def predict_proba_linear(features, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Softmax(features @ W + b) as float32 (n, K)."""
    X = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features, dtype=np.float32))
    Wt, bt = torch.as_tensor(W), torch.as_tensor(b)
    with torch.no_grad():
        logits = (torch.sparse.mm(X.float(), Wt) if X.is_sparse else X.float() @ Wt) + bt
        return torch.softmax(logits.double(), dim=1).float().numpy()
