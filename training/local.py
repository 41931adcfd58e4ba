"""One hospital's (or a centralised) training loop, and batched prediction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imaging.transforms import Augmentation, Preprocessing


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment: bool = True
    class_weighting: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"epochs, batch_size and lr must be positive: {self}")


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights from per-class counts (mean 1 over samples), so rare classes count as much."""
    counts = counts.double()
    w = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), 0.0)
    return w.float()


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, prep: Preprocessing, *, batch_size: int = 256
) -> torch.Tensor:
    """Logits for uint8 images."""
    model.eval()
    out = [model(prep(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prep: Preprocessing,
    cfg: TrainConfig,
    *,
    num_classes: int,
    class_weight: torch.Tensor | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    desc: str = "training",
) -> list[float]:
    """Train in place with AdamW and a one-cycle schedule; returns the mean loss of each epoch.

    ``class_weight`` overrides the weights derived from ``labels`` (a hospital uses
    weights from the securely aggregated class counts of all hospitals).
    """
    if len(images) == 0:
        raise ValueError("no training images")
    g = torch.Generator().manual_seed(cfg.seed)
    weight = None
    if cfg.class_weighting:
        weight = class_weight if class_weight is not None else class_weights(torch.bincount(labels, minlength=num_classes))
    augment = Augmentation() if cfg.augment else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    losses = []
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = prep(images[idx])
            if augment is not None:
                x = augment(x, g)
            loss = F.cross_entropy(model(x), labels[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        losses.append(total / len(images))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    bar.close()
    return losses
