"""The ABAW expression score: the unweighted mean of the per-class F1 over the 8 classes."""

from __future__ import annotations

import numpy as np

from fer_dist.affwild2 import NUM_CLASSES


def confusion(labels: np.ndarray, preds: np.ndarray, n: int = NUM_CLASSES) -> np.ndarray:
    """[true, predicted] counts; unlabelled (-1) frames are never scored."""
    keep = labels >= 0
    return np.bincount(labels[keep] * n + preds[keep], minlength=n * n).reshape(n, n)


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1 of each class; 0 where a class has neither true nor predicted frames (as scikit-learn)."""
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(f1_per_class(confusion(labels, preds)).mean())
