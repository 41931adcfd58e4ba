"""One hospital's (or a centralised) training loop, and batched prediction."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from medmpc.imaging.transforms import Preprocessing, augmentation


@dataclass(frozen=True)
class TrainConfig:
    """One training run's recipe. ``augment``: a name in imaging.transforms.AUGMENTATIONS;
    ``mixup``: the Beta(a, a) parameter of MixUp (0: off); ``precision``: a name in PRECISIONS,
    the floating point of the training passes; the rest as named."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment: str = "affine"
    mixup: float = 0.0
    class_weighting: bool = True
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"epochs, batch_size and lr must be positive: {self}")
        if not self.weight_decay >= 0 or not self.mixup >= 0:
            raise ValueError(f"weight decay and mixup must be at least 0, got {self.weight_decay} and {self.mixup}")
        augmentation(self.augment)
        check_precision(self.precision)


# "bf16": convolutions and matrix products in bfloat16 (torch.autocast), the model in channels-last
# layout while it trains; weights, optimizer state, loss and evaluation stay float32. Several times
# faster where the CPU multiplies bfloat16 in hardware (AMX), slower where it does not.
PRECISIONS = ("fp32", "bf16")

BF16_WITH_DP = (
    "precision bf16 with DP: per-sample gradient norms from bfloat16 activations could understate a "
    "gradient's norm, and DP's guarantee rests on that norm being at most the clipping bound: use fp32 with DP"
)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown training precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


MIXUP_WITH_DP = (
    "MixUp makes each training example from two patients' images, so DP-SGD's per-example clipping would no "
    "longer bound one patient's influence: use mixup 0 with DP"
)


def check_private_recipe(*, mixup: float, precision: str) -> None:
    """Refuse (ValueError, with the reason) a recipe DP-SGD cannot train with."""
    if mixup > 0:
        raise ValueError(MIXUP_WITH_DP)
    if precision != "fp32":
        raise ValueError(BF16_WITH_DP)


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights from per-class counts (mean 1 over samples), so rare classes count as much."""
    counts = counts.double()
    w = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), 0.0)
    return w.float()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, prep: Preprocessing, *, batch_size: int = 256) -> torch.Tensor:
    """Logits for uint8 images."""
    model.eval()
    out = [model(prep(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


class PrivateTraining(Protocol):
    """What DP-SGD changes in the loop (implemented in training.dp)."""

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Per-sample gradients, clipping and noise."""

    def batches(self, labels: torch.Tensor, weight: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """One epoch of sample indices, Poisson-sampled (class weights act through the sampling rates)."""

    def backward(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward passes over one batch, leaving the sum of clipped per-sample gradients
        for the optimizer's step to noise; returns the batch's mean loss."""

    def unwrap(self, model: nn.Module) -> None:
        """Detach what ``wrap`` attached to the model."""


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return iter(order.split(batch_size))


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prep: Preprocessing,
    cfg: TrainConfig,
    *,
    num_classes: int,
    class_weight: torch.Tensor | None = None,
    private: PrivateTraining | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    desc: str = "training",
) -> list[float]:
    """Train in place with AdamW and a one-cycle schedule; returns the mean loss of each epoch.

    ``class_weight`` overrides the weights derived from ``labels`` (a hospital uses
    weights from the securely aggregated class counts of all hospitals).
    ``private`` turns the loop into DP-SGD.
    """
    if len(images) == 0:
        raise ValueError("no training images")
    if private is not None:
        check_private_recipe(mixup=cfg.mixup, precision=cfg.precision)
    g = torch.Generator().manual_seed(cfg.seed)
    weight = None
    if cfg.class_weighting:
        weight = (
            class_weight if class_weight is not None else class_weights(torch.bincount(labels, minlength=num_classes))
        )
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    with _privately(private, model, opt) as (model, opt):
        return _epochs(
            model,
            images,
            labels,
            prep,
            cfg,
            opt=opt,
            sched=sched,
            generator=g,
            weight=weight,
            private=private,
            on_epoch=on_epoch,
            desc=desc,
        )


@contextlib.contextmanager
def _privately(
    private: PrivateTraining | None, model: nn.Module, opt: torch.optim.Optimizer
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    if private is None:
        yield model, opt
        return
    wrapped, private_opt = private.wrap(model, opt)
    try:
        yield wrapped, private_opt
    finally:
        private.unwrap(wrapped)


def _epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prep: Preprocessing,
    cfg: TrainConfig,
    *,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    weight: torch.Tensor | None,
    private: PrivateTraining | None,
    on_epoch: Callable[[int, float], None] | None,
    desc: str,
) -> list[float]:
    augment = augmentation(cfg.augment)
    mixing = np.random.default_rng(cfg.seed)  # MixUp's weights: Beta draws, which torch cannot seed
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    losses = []
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        total, seen = 0.0, 0
        if private is not None:
            batches = private.batches(labels, weight)
        else:
            batches = _shuffled_batches(len(images), cfg.batch_size, generator)
        with _layout(model, cfg.precision):
            for idx in batches:
                if len(idx) == 0:  # Poisson sampling drew nobody: the step releases nothing
                    sched.step()
                    bar.update()
                    continue
                pixels = prep.pixels(images[idx])
                if augment is not None:
                    pixels = augment(pixels, generator)
                x, targets = prep.normalise(pixels), labels[idx]
                opt.zero_grad(set_to_none=True)
                if private is not None:
                    # DP-SGD weights classes through its sampling rates: a loss weight would be
                    # undone by per-sample clipping, and would tie each sample's gradient to its batch
                    loss = private.backward(model, x, targets)
                else:
                    loss = _loss(
                        model,
                        x,
                        targets,
                        weight=weight,
                        mixup=cfg.mixup,
                        mixing=mixing,
                        generator=generator,
                        precision=cfg.precision,
                    )
                opt.step()
                sched.step()
                total += loss * len(idx)
                seen += len(idx)
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
        losses.append(total / max(seen, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    bar.close()
    return losses


def _loss(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    mixup: float,
    mixing: np.random.Generator,
    generator: torch.Generator,
    precision: str,
) -> float:
    """Forward and backward passes over one batch, with MixUp when ``mixup`` > 0; its mean loss."""
    if mixup > 0:
        lam = float(mixing.beta(mixup, mixup))
        partner = torch.randperm(len(targets), generator=generator)
        logits = _forward(model, lam * x + (1 - lam) * x[partner], precision)
        loss = lam * F.cross_entropy(logits, targets, weight=weight) + (1 - lam) * F.cross_entropy(
            logits, targets[partner], weight=weight
        )
    else:
        loss = F.cross_entropy(_forward(model, x, precision), targets, weight=weight)
    loss.backward()
    return float(loss.item())


def _forward(model: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Float32 logits; in bf16 the forward pass runs under autocast (its backward follows the casts)."""
    if precision == "fp32":
        logits: torch.Tensor = model(x)
        return logits
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = model(x)
    return logits.float()


@contextlib.contextmanager
def _layout(model: nn.Module, precision: str) -> Iterator[None]:
    """Channels-last while bf16 trains (the layout the CPU's bfloat16 convolutions run fastest in);
    the model is back in the default layout for whatever reads it between epochs. Parameters are
    converted in place, so the optimizer keeps its references."""
    if precision == "fp32":
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
