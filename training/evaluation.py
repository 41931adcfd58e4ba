"""Scoring a trained model on labelled images, and choosing among a run's models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from medmpc.imaging.dataset import ImageSet
from medmpc.imaging.transforms import Preprocessing
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.local import predict
from medmpc.training.metrics import classification_metrics
from medmpc.training.reports import dataset_summary


@dataclass
class Selection:
    """Model selection by validation MCC: the best epoch or round so far (the first of equals),
    and, where the caller keeps it, that model's weights."""

    at: int | None = None
    mcc: float = -math.inf
    state: dict[str, Any] | None = None

    def offer(self, at: int, metrics: dict[str, Any]) -> bool:
        """Whether the model of epoch or round ``at``, with these validation metrics, is the best yet."""
        if not metrics["mcc"] > self.mcc:
            return False
        self.at, self.mcc = at, float(metrics["mcc"])
        return True

    def summary(self, unit: str) -> dict[str, Any]:
        return {unit: self.at, "by": "validation MCC", "mcc": self.mcc if self.at is not None else None}


def shift_check(model: nn.Module, prep: Preprocessing, data: ImageSet) -> dict[str, Any]:
    """Metrics on a labelled set from another acquisition, at the model's own image size."""
    m = classification_metrics(predict(model, data.images, prep), data.labels, data.classes)
    return m | {"dataset": dataset_summary(data)}


def headline(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The few numbers of a metrics dict a checkpoint keeps."""
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("accuracy", "mcc", "pneumonia_roc_auc")} | {"source": metrics["dataset"]["source"]}


def evaluate_checkpoint(ckpt: Checkpoint, data: ImageSet) -> dict[str, Any]:
    if tuple(data.classes) != tuple(ckpt.classes):
        raise ValueError(f"data classes {data.classes} differ from the model's {ckpt.classes}")
    logits = predict(ckpt.build(), data.images, ckpt.preprocessing)
    m = classification_metrics(logits, data.labels, ckpt.classes)
    m["dataset"] = dataset_summary(data)
    return m
