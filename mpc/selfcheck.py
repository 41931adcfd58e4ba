"""A network self-check: parties secret-share private inputs and compute on them.

Run by ``medmpc selfcheck``; hospital IT can use it to prove that the parties
reach each other and that secret-shared arithmetic matches plaintext.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch

from medmpc.mpc import comparison, crypten_compat
from medmpc.mpc.compile import Precision, max_pool2d


def private_input(rank: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(size, generator=g) * 3


def arithmetic(*, rank: int, world_size: int, size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Every party contributes one private vector; reveal sum, product and ReLU of the first two."""
    mine = private_input(rank, size, seed)
    shared = [crypten_compat.encrypt(mine if src == rank else torch.zeros(size), src=src) for src in range(world_size)]
    total = shared[0]
    for s in shared[1:]:
        total = total + s
    x, y = shared[0], shared[1]
    image = _as_image(x - y)
    # at encrypted inference's activation precision: CrypTen's own sign test (three or more
    # parties, CUDA) once returned its bit scaled by 2^(16 - bits) there
    fine = [
        crypten_compat.encrypt(mine if src == rank else torch.zeros(size), src=src, precision=Precision().activations)
        for src in (0, 1)
    ]
    fine_difference = fine[0] - fine[1]
    return {
        "input": mine,
        "sum": total.get_plain_text(),
        "product": (x * y).get_plain_text(),
        "relu": comparison.relu(x - y).get_plain_text(),
        # large magnitudes exercise the top bits of the 40-bit comparison ring
        "relu_wide": (comparison.relu((x - y) * WIDE) / WIDE).get_plain_text(),
        "maxpool": torch.cat([max_pool2d(image, *config).get_plain_text().flatten() for config in POOLS]),
        # CrypTen's Beaver convolution, with the list arguments its nn.Conv2d passes
        "conv": image.conv2d(_kernel(x), padding=[1, 1]).get_plain_text(),
        **{
            f"relu_edges_{bits}": _revealed(comparison.relu(_shared(edge_values(bits)), bits=bits))
            for bits in EDGE_BITS
        },
        "clamp": _revealed(comparison.clamp(_shared(CLAMP_VALUES), *CLAMP_RANGE)),
        "relu_inference_precision": comparison.relu(fine_difference).get_plain_text(),
        "maxpool_inference_precision": max_pool2d(_as_image(fine_difference), *POOLS[0]).get_plain_text().flatten(),
        # one step past a 40-bit ring's edge, and 1.2e7: signs a 40-bit ring gets wrong (a control)
        "relu_beyond_40": _revealed(comparison.relu(_shared(BEYOND_40), bits=40)),
    }


# ReLU and max-pooling at encrypted inference's activation precision (mpc.compile.Precision)
AT_INFERENCE_PRECISION = ("relu_inference_precision", "maxpool_inference_precision")
# comparison rings: below CrypTen's encoding, the smallest the bounds of a small CNN give, the full ring
EDGE_BITS = (12, 21, 40, 64)
CLAMP_RANGE = (-2.0, 3.0)
_UNIT = 2**16  # CrypTen's fixed-point scale
# ring elements a client could send: both ends of the ring, the value the 40-bit ring used to
# get wrong (1.2e7), and both edges of the clamp range with their neighbours
CLAMP_VALUES = torch.tensor(
    [
        -(2**63),
        -(2**63) + 1,
        2**63 - 1,
        -1,
        0,
        1,
        12_000_000 * _UNIT,
        -12_000_000 * _UNIT,
        -2 * _UNIT - 1,
        -2 * _UNIT,
        3 * _UNIT,
        3 * _UNIT + 1,
    ],
)


BEYOND_40 = torch.tensor([2**39, 12_000_000 * _UNIT])


def edge_values(bits: int) -> torch.Tensor:
    """The ends of the signed range a ``bits``-bit comparison ring proves correct, and around 0."""
    top = 2 ** (bits - 1)
    return torch.tensor([-top, -top + 1, -1, 0, 1, top - 1], dtype=torch.int64)


def _shared(ring: torch.Tensor) -> Any:
    """Party 0's public ring elements, shared with a random sharing of zero (not as 0 and v)."""
    crypten = crypten_compat.patched()
    from crypten.mpc.primitives import ArithmeticSharedTensor

    zero = ArithmeticSharedTensor.PRZS(ring.size()).share
    share = zero + ring if crypten.communicator.get().get_rank() == 0 else zero
    return crypten.mpc.MPCTensor.from_shares(share, precision=16)


def _revealed(x: Any) -> torch.Tensor:
    plain: torch.Tensor = x._tensor.reveal()
    return plain


def mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error (float results) or number of differing ring elements (int64 results)."""
    if want.dtype == torch.int64:
        return float((got != want).sum())
    return float((got - want).abs().max())


WIDE = 2**18  # an integer: scaling by it is exact on shares

# (kernel, stride, padding): ResNet's stem pooling, and a non-square overlapping one
POOLS = [((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 2), (0, 1))]


def _as_image(v: Any) -> Any:
    """A vector as one single-channel image 4 rows high."""
    return v[: 4 * (v.size(0) // 4)].reshape(1, 1, 4, -1)


def _kernel(v: Any) -> Any:
    """A vector's first nine values as one 3x3 convolution kernel."""
    return v[:9].reshape(1, 1, 3, 3)


def expected(world_size: int, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = [private_input(r, size, seed) for r in range(world_size)]
    x, y = inputs[0], inputs[1]
    image = _as_image(x - y)
    step = 2.0 ** -Precision().activations
    fine = torch.trunc(x / step) * step - torch.trunc(y / step) * step  # as CrypTen encodes them
    pools = torch.cat([torch.nn.functional.max_pool2d(image, k, s, p).flatten() for k, s, p in POOLS])
    return {
        "sum": functools.reduce(operator.add, inputs),
        "product": x * y,
        "relu": torch.relu(x - y),
        "relu_wide": torch.relu(x - y),
        "maxpool": pools,
        "conv": torch.nn.functional.conv2d(image, _kernel(x), padding=1),
        **{f"relu_edges_{bits}": edge_values(bits).clamp(min=0) for bits in EDGE_BITS},
        "clamp": _clamped(world_size),
        "relu_inference_precision": torch.relu(fine),
        "maxpool_inference_precision": torch.nn.functional.max_pool2d(_as_image(fine), *POOLS[0]).flatten(),
    }


def _clamped(world_size: int) -> torch.Tensor:
    """CLAMP_VALUES clamped as the parties do: exactly with two (the dealer's one-round gate); with
    more, the split into ``relu(x)`` and ``relu(-x)`` takes -2^63 (its own negation) to 0."""
    exact = CLAMP_VALUES.clamp(*(int(v * _UNIT) for v in CLAMP_RANGE))
    return exact if world_size == 2 else torch.where(CLAMP_VALUES == -(2**63), 0, exact)


def crash_on_rank1(*, rank: int, world_size: int) -> None:
    """For failure drills: party 1 dies mid-protocol; the others must not hang."""
    x = crypten_compat.encrypt(torch.ones(4), src=0)
    if rank == 1:
        raise SystemExit("party 1 stopped on purpose")
    (x * x).get_plain_text()
