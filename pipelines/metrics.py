"""Slide-level classification metrics per fold and their mean ± sd over folds."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (one-vs-rest macro for more than two classes), accuracy, balanced accuracy, F1.

    Binary F1 is for class index 1; multi-class F1 is macro. AUC is NaN when the set holds a
    single class.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    auc = float("nan")
    present = np.unique(y_true)
    if len(present) == n_classes:
        auc = float(
            roc_auc_score(y_true, probs[:, 1])
            if n_classes == 2
            else roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=range(n_classes))
        )
    with warnings.catch_warnings():  # a fold may lack a predicted class: defined as 0, not a problem
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bacc = float(balanced_accuracy_score(y_true, pred))
    f1 = f1_score(
        y_true,
        pred,
        average="binary" if n_classes == 2 else "macro",
        labels=None if n_classes == 2 else list(range(n_classes)),
        zero_division=0,
    )
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": bacc,
        "f1": float(f1),
    }


def summarize(folds: Sequence[dict], keys: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """``{metric: {"mean", "std", "n"}}`` over folds (sample sd, ddof=1; NaN folds skipped)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in keys:
        vals = np.array([f[key] for f in folds if f.get(key) is not None], dtype=float)
        vals = vals[~np.isnan(vals)]
        if len(vals) == 0:
            out[key] = {"mean": None, "std": None, "n": 0}
            continue
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[key] = {"mean": float(vals.mean()), "std": std, "n": len(vals)}
    return out


def json_safe(value):
    """NaN/inf floats -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
