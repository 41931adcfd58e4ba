"""A model's floating-point state as one flat vector: what federated rounds exchange.

BatchNorm running statistics are included, so they are averaged like weights;
integer buffers (``num_batches_tracked``) stay local.
"""

from __future__ import annotations

import torch
from torch import nn


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def to_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).float() for _, v in _float_entries(model)])


def load_vector(model: nn.Module, vector: torch.Tensor) -> None:
    entries = _float_entries(model)
    total = sum(v.numel() for _, v in entries)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} values, the model has {total}")
    offset = 0
    with torch.no_grad():
        for _, v in entries:
            v.copy_(vector[offset : offset + v.numel()].view_as(v))
            offset += v.numel()
