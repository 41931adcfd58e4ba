"""Classification metrics for a 2- or 3-class chest X-ray model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
)


def _auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Binary ROC-AUC, or None when only one class is present (AUC is undefined)."""
    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, score))


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """Every metric we report, from raw logits.

    ROC-AUC is one-vs-rest on softmax probabilities, macro-averaged over the
    classes present in ``labels`` (a class absent from the labels has no AUC; the
    per-class list shows it as null). The pneumonia-vs-normal view treats every
    non-normal class (index > 0) as pneumonia: its score is 1 - P(normal), and a
    prediction is "pneumonia" when the argmax is not normal.
    """
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty set")
    k = len(classes)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    y = labels.numpy()
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    tp = np.diag(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    per_class_auc = [_auc((y == c).astype(int), probs[:, c]) for c in range(k)]
    defined = [a for a in per_class_auc if a is not None]

    y_pn = (y > 0).astype(int)
    pred_pn = (pred > 0).astype(int)
    pn_pos, pn_neg = y_pn.sum(), (1 - y_pn).sum()

    def nan_to_none(v: float) -> float | None:
        return None if np.isnan(v) else float(v)

    present = sorted(np.unique(y).tolist())
    return {
        "n_images": int(len(y)),
        "classes": list(classes),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if present else None,
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)),
        "roc_auc": float(np.mean(defined)) if defined else None,
        "roc_auc_per_class": per_class_auc,
        "sensitivity_per_class": [nan_to_none(v) for v in sens],
        "specificity_per_class": [nan_to_none(v) for v in spec],
        "confusion_matrix": cm.tolist(),
        "pneumonia_sensitivity": float((pred_pn[y_pn == 1] == 1).mean()) if pn_pos else None,
        "pneumonia_specificity": float((pred_pn[y_pn == 0] == 0).mean()) if pn_neg else None,
        "pneumonia_roc_auc": _auc(y_pn, 1 - probs[:, 0]),
    }


def format_metrics(m: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"images {m['n_images']}  accuracy {f(m['accuracy'])}  balanced {f(m['balanced_accuracy'])}  "
        f"macro-F1 {f(m['macro_f1'])}  MCC {f(m['mcc'])}  ROC-AUC {f(m['roc_auc'])}",
        f"pneumonia vs normal: sensitivity {f(m['pneumonia_sensitivity'])}  "
        f"specificity {f(m['pneumonia_specificity'])}  ROC-AUC {f(m['pneumonia_roc_auc'])}",
    ]
    for c, name in enumerate(m["classes"]):
        lines.append(
            f"  {name:>10}: sensitivity {f(m['sensitivity_per_class'][c])}  "
            f"specificity {f(m['specificity_per_class'][c])}  AUC {f(m['roc_auc_per_class'][c])}"
        )
    lines.append("confusion matrix (rows true, columns predicted): " + str(m["confusion_matrix"]))
    return "\n".join(lines)
