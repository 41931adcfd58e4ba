"""Per-sample clipping in one backward pass ("book-keeping", Bu et al. 2023).

DP-SGD needs sum_n c_n g_n, where g_n is sample n's gradient and
c_n = min(1, C / ||g_n||). Opacus materialises every g_n (batch x parameters
floats) or, with ghost clipping, runs a second full backward pass. Here the
forward pass runs with the parameters frozen, so the one backward pass computes
only activation gradients, and every trainable layer keeps its input A and the
gradient G of its output. From those:

1. each sample's squared gradient norm per layer, summed over layers: ||g_n||,
   hence c_n. Convolutions take the cheaper of two routes: per-sample gradients in
   one grouped convolution (early layers: many positions, few channels), or the
   "ghost" norm ||G^T A||^2 = <A A^T, G G^T> that needs none (deep layers);
2. each layer's clipped gradient sum: the per-sample gradients weighted by c_n
   where they exist, else one weight-gradient computation with G scaled by c_n.

The update equals clipping materialised per-sample gradients (tests/test_dp.py
checks it against one-sample-at-a-time backward passes), at about the cost of
one non-private step plus the norms.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.grad
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.linear import compute_linear_norm_sample
from torch import nn

# per layer: each sample's squared gradient norm [n], and a function from the clipping
# factors [n] to the layer's clipped gradient sum (one tensor per parameter)
LayerClip = tuple[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]]]


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _weighted(factors: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    return torch.einsum("n,n...->...", factors, per_sample)


def _from_per_sample(grads: list[torch.Tensor]) -> LayerClip:
    squared = functools.reduce(operator.add, [gs.reshape(len(gs), -1).pow(2).sum(1) for gs in grads])
    return squared, lambda c: [_weighted(c, gs) for gs in grads]


def _conv2d(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> LayerClip:
    if isinstance(layer.padding, str):
        raise ValueError(f"DP-SGD cannot clip per-sample gradients of a convolution with padding={layer.padding!r}")
    n, c_in, c_out = a.shape[0], layer.in_channels, layer.out_channels
    args = (layer.stride, layer.padding, layer.dilation)
    d_in, positions = c_in * layer.kernel_size[0] * layer.kernel_size[1], g.shape[2] * g.shape[3]
    bias = [g.sum(dim=(2, 3))] if layer.bias is not None else []  # per-sample bias gradients
    if positions * (d_in + c_out) >= d_in * c_out:
        # few channels, many positions: per-sample weight gradients, all in one grouped
        # convolution (the batch as groups), faster there than unfold + batched matmul
        w = torch.nn.grad.conv2d_weight(
            a.reshape(1, n * c_in, *a.shape[2:]),
            (n * c_out, c_in, *layer.kernel_size),
            g.reshape(1, n * c_out, *g.shape[2:]),
            *args,
            n,
        )
        return _from_per_sample([w.reshape(n, *layer.weight.shape), *bias])
    # many channels, few positions: the "ghost" norm, ||G^T A||^2 = <A A^T, G G^T>, without
    # per-sample gradients; the clipped sum is one weight gradient with G scaled per sample
    u = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    gf = g.reshape(n, c_out, positions)
    squared = (torch.bmm(u.transpose(1, 2), u) * torch.bmm(gf.transpose(1, 2), gf)).sum(dim=(1, 2))
    squared = squared + sum(b.pow(2).sum(1) for b in bias)

    def clipped(c: torch.Tensor) -> list[torch.Tensor]:
        scaled = g * c.view(-1, 1, 1, 1)
        weight = torch.nn.grad.conv2d_weight(a, layer.weight.shape, scaled, *args)
        return [weight] + [_weighted(c, b) for b in bias]

    return squared, clipped


def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> LayerClip:
    squared = sum(v.pow(2) for v in compute_linear_norm_sample(layer, [a], g).values())

    def clipped(c: torch.Tensor) -> list[torch.Tensor]:
        scaled = (g * c.view(-1, *([1] * (g.dim() - 1)))).reshape(-1, g.shape[-1])
        return [scaled.t() @ a.reshape(-1, a.shape[-1])] + ([scaled.sum(0)] if layer.bias is not None else [])

    return squared, clipped


def _layer_clip(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> LayerClip:
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and not isinstance(layer.padding, str):
        return _conv2d(layer, a, g)
    if isinstance(layer, nn.Linear):
        return _linear(layer, a, g)
    # small layers (GroupNorm, ...): Opacus's per-sample gradients
    grads = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [a], g)
    return _from_per_sample([grads[p] for p in _own_parameters(layer)])


class BookKeepingModule(nn.Module):
    """Wraps a model; after ``backward()`` of its mean batch loss, :meth:`clip_and_sum` leaves
    ``p.grad = sum_n c_n g_n`` (clipped to ``max_grad_norm``) for DPOptimizerFastGradientClipping."""

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        super().__init__()
        self._module = module
        self.max_grad_norm = max_grad_norm
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self._layers = [m for m in module.modules() if _own_parameters(m)]
        for layer in self._layers:
            if type(layer) not in GradSampleModule.GRAD_SAMPLERS:
                raise ValueError(f"DP-SGD cannot clip per-sample gradients of layer {type(layer).__name__}")
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._seen: set[int] = set()
        self._recording = False
        self._handles = [layer.register_forward_hook(self._capture) for layer in self._layers]

    def forward(self, x: torch.Tensor) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(x)
        params = [p for layer in self._layers for p in _own_parameters(layer)]
        self._records.clear()
        self._seen.clear()
        for p in params:  # autograd then computes activation gradients only
            p.requires_grad_(False)
        self._recording = True
        try:
            return self._module(x.detach().requires_grad_(True))
        finally:
            self._recording = False
            for p in params:
                p.requires_grad_(True)

    def _capture(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self._recording:
            return
        if id(layer) in self._seen:
            raise ValueError(
                f"layer {type(layer).__name__} runs twice in one forward pass; shared weights are not supported"
            )
        self._seen.add(id(layer))
        a = inputs[0].detach()
        output.register_hook(lambda g: self._records.append((layer, a, g.detach())))

    def clip_and_sum(self, batch_size: int) -> None:
        # the loss was a batch mean: sample n's own gradient is batch_size times its share
        clips = [(layer, _layer_clip(layer, a, g * batch_size)) for layer, a, g in self._records]
        self._records.clear()
        squared = torch.stack([sq for _, (sq, _) in clips]).sum(0)
        self.per_sample_gradient_norms = squared.clamp(min=0).sqrt()
        factors = (self.max_grad_norm / (self.per_sample_gradient_norms + 1e-6)).clamp(max=1.0)
        for layer, (_, clipped) in clips:
            for p, grad in zip(_own_parameters(layer), clipped(factors)):
                p.grad = grad.detach()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()


class ClippedLoss:
    """A batch loss whose ``backward()`` leaves the clipped per-sample gradient sum in ``p.grad``."""

    def __init__(self, loss: torch.Tensor, module: BookKeepingModule, batch_size: int) -> None:
        self._loss, self._module, self._batch_size = loss, module, batch_size

    def backward(self) -> None:
        self._loss.backward()
        self._module.clip_and_sum(self._batch_size)

    def item(self) -> float:
        return self._loss.item()


def clipped_cross_entropy(module: BookKeepingModule, logits: torch.Tensor, targets: torch.Tensor) -> ClippedLoss:
    return ClippedLoss(F.cross_entropy(logits, targets), module, len(targets))
