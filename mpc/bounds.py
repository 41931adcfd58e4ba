"""Proven bounds on every value a model computes, and the comparison ring each ReLU needs.

Interval arithmetic over the prepared graph (mpc.compile.prepare), from a bound ``r`` on
every input element (the input is clamped to its valid range inside MPC first):

* convolution and linear: ``|W x + b|_i <= sum_j |W_ij| r + |b_i|`` (row by row, the max);
* ReLU, max- and average-pooling, flattening: no larger than their input;
* residual add: the sum of both bounds.

A comparison of values bounded by ``B`` needs a ring of ``L`` bits with
``B 2^f + slack < 2^(L-1)`` (``f`` fractional bits, ``slack`` for the truncation's last-place
errors); max-pooling compares differences of two values, ``2B``. Bounds this crude grow
geometrically with depth: where one exceeds the 64-bit ring (ResNet-18's do), that
comparison runs on the full ring, which is exact for every ring element, and the bound is
reported as unproven instead: the fixed-point values themselves could then wrap, exactly
as they would in plaintext fixed point.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch import nn

FULL_RING = 64
_SLACK = 4  # ulps: CrypTen's local truncation is off by at most one per product, a few in a row


def activation_bounds(gm: fx.GraphModule, input_bound: float) -> dict[str, float]:
    """``max |value|`` of every node of ``gm`` (by name) over all inputs with ``|x_i| <= input_bound``."""
    modules = dict(gm.named_modules())
    bound: dict[str, float] = {}
    for node in gm.graph.nodes:
        inputs = [bound[a.name] for a in node.args if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            bound[node.name] = float(input_bound)
        elif node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            bound[node.name] = _affine_bound(modules[node.target], inputs[0])
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            bound[node.name] = sum(inputs)
        elif inputs:  # ReLU, pooling, flatten, identity: never larger than their input
            bound[node.name] = max(inputs)
    return bound


def _affine_bound(layer: nn.Conv2d | nn.Linear, input_bound: float) -> float:
    rows = layer.weight.detach().double().abs().flatten(1).sum(1) * input_bound
    if layer.bias is not None:
        rows = rows + layer.bias.detach().double().abs()
    return float(rows.max())


def ring_bits(bound: float, *, fractional_bits: int) -> int:
    """The fewest bits ``L`` whose signed range holds every value up to ``bound``; 64 (exact for
    any ring element) where none does."""
    units = bound * 2.0**fractional_bits + _SLACK
    # one bit more than the bound needs: the truncations' errors grow through the layers too
    return min(FULL_RING, max(2, math.floor(math.log2(units)) + 3))


def fits(bound: float, *, fractional_bits: int) -> bool:
    """Whether values up to ``bound`` fit the 64-bit ring's signed range (the bound is proven)."""
    return bound * 2.0**fractional_bits + _SLACK < 2.0 ** (FULL_RING - 2)
