"""Proven bounds on every value a model computes, and the comparison ring each ReLU needs.

Interval arithmetic over the prepared graph (mpc.compile.prepare), one interval
``[lo_c, hi_c]`` per channel (per feature after flattening), from the input's valid range
(the input is clamped to it inside MPC first), for the values MPC computes: activations with
``f`` fractional bits, weights with ``g >= f``, each as it is encoded (``trunc(w 2^g) / 2^g``,
biases ``trunc(b 2^f) / 2^f``) and two last places (``2^-f``) more on each side after every
affine layer, whose product is truncated by ``2^g`` (in one step or, on CrypTen's own path, in
two):

* convolution and linear, the exact image of a box under an affine map: with ``W+`` and ``W-``
  the positive and negative weights summed over the kernel,
  ``hi_o = sum_c W+_oc hi_c + W-_oc lo_c + b_o`` and ``lo_o = sum_c W+_oc lo_c + W-_oc hi_c + b_o``
  (zero padding widens each input interval to hold 0), then the truncation's last places;
* ReLU: ``[max(lo, 0), max(hi, 0)]``; max-pooling and flattening: the input's interval;
  average-pooling: the input's interval (widened to 0 by zero padding) and a last place;
* residual add: ``[lo1 + lo2, hi1 + hi2]``.

After a ReLU every input is non-negative, so a convolution's bound counts only its positive or
its negative weights, not both: about one bit a layer tighter than bounding ``|W x|`` by
``sum |W| max|x|``.

A comparison of values bounded by ``B`` in magnitude needs a ring of ``L`` bits with
``B 2^f + slack < 2^(L-1)`` (``f`` fractional bits, ``slack`` for the truncation's last-place
errors); max-pooling compares differences of two values, at most ``max hi - min lo``. Bounds
still grow geometrically with depth: where one exceeds the 64-bit ring, that comparison runs on
the full ring, which is exact for every ring element, and the bound is reported as unproven
instead: the fixed-point values themselves could then wrap, exactly as they would in plaintext
fixed point.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

FULL_RING = 64
_SLACK = 4  # ulps: CrypTen's local truncation is off by at most one per product, a few in a row


@dataclass(frozen=True)
class Interval:
    """``lo[c] <= value <= hi[c]`` for every element of channel (or feature) ``c``; a single entry
    holds for every channel."""

    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def magnitude(self) -> float:
        """``max |value|``."""
        return float(torch.maximum(self.lo.abs(), self.hi.abs()).max())

    def with_zero(self) -> Interval:
        return Interval(self.lo.clamp(max=0), self.hi.clamp(min=0))

    def widened(self, by: float) -> Interval:
        return Interval(self.lo - by, self.hi + by)

    def channels(self, n: int) -> Interval:
        """The interval of each of ``n`` inputs of a layer: one per channel, or each channel's
        entry repeated over the features a flattening made of it."""
        if self.lo.numel() == 1:
            return Interval(self.lo.expand(n), self.hi.expand(n))
        if n % self.lo.numel():
            raise ValueError(f"a layer of {n} inputs after {self.lo.numel()} channels")
        k = n // self.lo.numel()
        return Interval(self.lo.repeat_interleave(k), self.hi.repeat_interleave(k))


def activation_bounds(
    gm: fx.GraphModule, input_range: tuple[float, float], *, fractional_bits: int, weight_bits: int | None = None
) -> dict[str, Interval]:
    """The interval of every node of ``gm`` (by name) over all inputs in ``input_range``, for its
    values in fixed point with ``fractional_bits``, weights with ``weight_bits`` (default: as many)."""
    weight_bits = fractional_bits if weight_bits is None else weight_bits
    modules = dict(gm.named_modules())
    bound: dict[str, Interval] = {}
    flat: set[str] = set()  # nodes that flatten channels into features
    low, high = input_range
    ulp = 2.0**-fractional_bits
    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        inputs = [bound[a.name] for a in args]
        module = modules[str(node.target)] if node.op == "call_module" else None
        if node.op == "placeholder":
            bound[node.name] = Interval(torch.tensor([float(low)]).double(), torch.tensor([float(high)]).double())
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            unflattened = isinstance(module, nn.Linear) and inputs[0].lo.numel() not in (1, module.in_features)
            if unflattened and args[0].name not in flat:
                raise ValueError(f"layer {node.target!r}: a linear layer on channels that were not flattened")
            bound[node.name] = _affine(module, inputs[0], weight_bits, fractional_bits).widened(2 * ulp)
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            bound[node.name] = Interval(inputs[0].lo + inputs[1].lo, inputs[0].hi + inputs[1].hi)
        elif is_relu(node, modules):
            bound[node.name] = Interval(inputs[0].lo.clamp(min=0), inputs[0].hi.clamp(min=0))
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):  # a sum, then a division
            padded = isinstance(module, nn.AvgPool2d) and module.padding
            bound[node.name] = (inputs[0].with_zero() if padded else inputs[0]).widened(ulp)
        elif inputs:  # max-pooling, flatten, identity: within their input's interval
            bound[node.name] = inputs[0]
            if isinstance(module, nn.Flatten) or node.target is torch.flatten or args[0].name in flat:
                flat.add(node.name)
    return bound


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    return node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu)


def _zero_padded(layer: nn.Conv2d) -> bool:
    if layer.padding_mode != "zeros":
        return False  # reflected or replicated borders hold input values
    return layer.padding == "same" if isinstance(layer.padding, str) else any(p > 0 for p in layer.padding)


def _encoded(t: torch.Tensor, fractional_bits: int) -> torch.Tensor:
    """``t`` as fixed point holds it: CrypTen's encoder truncates ``t 2^f`` toward zero."""
    scale = 2.0**fractional_bits
    return torch.trunc(t.detach().double() * scale) / scale


def _affine(layer: nn.Conv2d | nn.Linear, x: Interval, weight_bits: int, fractional_bits: int) -> Interval:
    w = _encoded(layer.weight, weight_bits)
    if isinstance(layer, nn.Conv2d):
        if _zero_padded(layer):
            x = x.with_zero()
        groups, per_group = layer.groups, layer.in_channels // layer.groups
        x = x.channels(layer.in_channels)
        # output o sees input channels (o // (out / groups)) * per_group + j
        group = torch.arange(layer.out_channels) // (layer.out_channels // groups)
        index = group[:, None] * per_group + torch.arange(per_group)[None, :]
        lo, hi = x.lo[index], x.hi[index]
        w = w.flatten(2)
        pos, neg = w.clamp(min=0).sum(2), w.clamp(max=0).sum(2)
    else:
        x = x.channels(layer.in_features)
        lo, hi = x.lo[None, :], x.hi[None, :]
        pos, neg = w.clamp(min=0), w.clamp(max=0)
    top = (pos * hi + neg * lo).sum(1)
    bottom = (pos * lo + neg * hi).sum(1)
    if layer.bias is not None:
        b = _encoded(layer.bias, fractional_bits)
        top, bottom = top + b, bottom + b
    return Interval(bottom, top)


def ring_bits(bound: float, *, fractional_bits: int) -> int:
    """The fewest bits ``L`` whose signed range holds every value up to ``bound``; 64 (exact for
    any ring element) where none does."""
    units = bound * 2.0**fractional_bits + _SLACK
    # one bit more than the bound needs: the truncations' errors grow through the layers too
    return min(FULL_RING, max(2, math.floor(math.log2(units)) + 3))


def fits(bound: float, *, fractional_bits: int) -> bool:
    """Whether values up to ``bound`` fit the 64-bit ring's signed range (the bound is proven)."""
    return bound * 2.0**fractional_bits + _SLACK < 2.0 ** (FULL_RING - 2)
