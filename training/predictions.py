"""Logits to what a user reads: the predicted class and class probabilities per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medmpc.imaging.images import read_images
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.local import predict


@dataclass
class Prediction:
    image: str
    prediction: str
    probabilities: dict[str, float]
    logits: list[float]

    def describe(self) -> str:
        probs = "  ".join(f"{c} {v:.3f}" for c, v in self.probabilities.items())
        return f"{self.image}: {self.prediction}  ({probs})"


def predictions(paths: Sequence[str | Path], logits: torch.Tensor, classes: Sequence[str]) -> list[Prediction]:
    probs = torch.softmax(logits, dim=1)
    return [
        Prediction(str(p), classes[int(pr.argmax())], dict(zip(classes, map(float, pr))), lg.tolist())
        for p, pr, lg in zip(paths, probs, logits)
    ]


def plaintext_logits(ckpt: Checkpoint, paths: Sequence[str | Path]) -> torch.Tensor:
    """The checkpoint's logits for image files, computed in the clear on this machine."""
    images, _, _ = read_images([Path(p) for p in paths], ckpt.preprocessing.image_size)
    return predict(ckpt.build(), images, ckpt.preprocessing)
