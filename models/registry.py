"""Architectures by name. Every model takes ``(N, 1, S, S)`` greyscale input."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups is the usual choice; small layers fall back to fewer groups
    return nn.GroupNorm(min(32, channels // 2) or 1, channels)


def _resnet18(num_classes: int, norm: Callable[[int], nn.Module] | None = None) -> nn.Module:
    # imported here: torchvision costs every process that imports it half a second, and most
    # parties of a small-CNN run never build a ResNet
    from medmpc.models.resnet import resnet18

    return resnet18(num_classes, norm)


def small_cnn(num_classes: int, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """Four conv blocks and a linear head: about 0.1M parameters, fast on CPU and in MPC.

    ReLU follows max-pooling (equivalent, and 4x fewer secure comparisons).
    """
    widths = (1, 16, 32, 64, 128)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            norm(c_out),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": _resnet18,
    "resnet18_gn": partial(_resnet18, norm=_group_norm),
    "cnn": small_cnn,
    "cnn_gn": partial(small_cnn, norm=_group_norm),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def architecture(name: str, num_classes: int) -> nn.Module:
    """``name``'s layers with every parameter and buffer zero, for weights that come from elsewhere
    (a checkpoint, or secret shares). Built on the meta device, so no initialisation draws random
    numbers: an MPC party's process draws none but from its CSPRNG."""
    with torch.device("meta"):
        model = build_model(name, num_classes)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.zero_()
    return model


def build_model(name: str, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """Build ``name``; with ``seed`` the initial weights are reproducible."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    if seed is None:
        return MODELS[name](num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_classes)
