"""Small trained checkpoints for the tests that need a real model."""

from __future__ import annotations

from pathlib import Path

from medmpc.imaging.dataset import ImageSet
from medmpc.imaging.transforms import Preprocessing
from medmpc.models import build_model
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.local import TrainConfig, train


def trained_cnn(data: ImageSet, *, epochs: int, path: Path) -> Path:
    """The small CNN (seed 0) trained on ``data`` for ``epochs``, saved at ``path``."""
    prep = Preprocessing.fit(data.images)
    model = build_model("cnn", 3, seed=0)
    train(model, data.images, data.labels, prep, TrainConfig(epochs=epochs), num_classes=3)
    info = {"dataset": {"source": data.source, "synthetic": data.is_synthetic}}  # as train and simulate record it
    Checkpoint("cnn", data.classes, prep, model.state_dict(), info=info).save(path)
    return path
