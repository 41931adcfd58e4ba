"""Dividing an additively shared ring value by a public integer, without communication.

Each of the K parties floor-divides its own share by the public divisor d. The
shares wrap around 2^64: their integer sum is ``x + m * 2^64`` for some unknown
``m`` with ``|m| < K``, so the quotients sum to ``x/d + m * 2^64/d`` less a
rounding part below K. Whoever reconstructs knows, from the encoding guard
(mpc.sharing), that ``|x| < 2^62``; two different corrections ``m * 2^64/d``
differ by at least ``2^64/d`` modulo 2^64 (or not at all), so exactly one of them
brings the sum into ``|x/d| < 2^62/d``, and the top bits of the sum name it.

Why not CrypTen's truncation: for K > 2 it needs a dealer round over the whole
vector (a full extra round of communication and dealer work), and its two-party version (each party
divides locally, no correction) is wrong by about 2^64/d with probability
``|x| / 2^64`` per element, i.e. up to 1 in 4 at the values the guard admits.

Extra precision: floor-dividing puts the quotient on the sum's grid (2^-f), which for a
weighted average of small model updates is coarse (an error of 3e-5 where float32
FedAvg's is 1e-7 relative). So each party computes ``floor(share * 2^e / d)`` instead,
with ``e`` (:func:`extra_bits`) as large as the divisor allows: the quotient gains
``e`` fractional bits (``2^e <= d / 4K``: 8 bits for d = 3900, K = 2), still fits the
ring, and the wrap corrections ``j * 2^(64+e)/d`` stay far apart. Same bytes, same
ring, same shares.

What the reconstructing party learns is the quotient ``x * 2^e / d`` up to the
rounding part; as ``2^e < d``, that is no more than the sum itself, which the public
divisor makes equivalent to the average: nothing beyond what the protocol reveals.
"""

from __future__ import annotations

import numpy as np
import torch

from medmpc.mpc import kernels

MAX_DIVISOR = 1 << 28  # keeps the top-bits estimate of m within 1/16 of the truth


def check_divisor(divisor: int) -> None:
    if not 1 <= divisor <= MAX_DIVISOR:
        raise ValueError(f"divisor must be an integer in [1, 2^28], got {divisor}")


def extra_bits(divisor: int, n_parts: int) -> int:
    """Fractional bits the quotient of a sum shared among ``n_parts`` parties gains when
    divided by ``divisor``: the largest ``e`` with ``2^e * 4 * n_parts <= divisor``, else 0.
    Both the dividing parties and the reconstructing one derive it from these public values."""
    check_divisor(divisor)
    return max(0, (divisor // (4 * n_parts)).bit_length() - 1)


def divide_in_place(values: np.ndarray, divisor: int, extra: int = 0) -> None:
    """One party's step on (a range of) its int64 share: ``floor(share * 2^extra / divisor)``."""
    check_divisor(divisor)
    if divisor == 1:
        return
    # NumPy's integer division (libdivide) is faster than torch's or a loop's
    if not extra:
        np.floor_divide(values, divisor, out=values)
        return
    # share = q*d + r with 0 <= r < d, so floor(share * 2^e / d) = q * 2^e + floor(r * 2^e / d),
    # without the 128-bit product
    q = np.floor_divide(values, divisor)
    r = values - q * divisor
    np.left_shift(r, extra, out=r)
    np.floor_divide(r, divisor, out=r)
    np.left_shift(q, extra, out=values)
    values += r


def _wrap(v: int) -> int:
    """A Python integer as the int64 with the same value modulo 2^64."""
    return ((v + (1 << 63)) % (1 << 64)) - (1 << 63)


class QuotientDecoder:
    """The reconstructing party's step, range by range: ``sum * 2^extra / divisor`` from every
    party's divided share, within ``K/2 + 1`` units of the last place of the true quotient for
    any ``|sum| < 2^62``. With ``scale``, the quotient times ``scale`` in float32 (fixed-point
    decoding in the same pass). Ranges can be decoded as the shares arrive."""

    def __init__(self, n_parts: int, divisor: int, *, extra: int = 0, scale: float | None = None) -> None:
        check_divisor(divisor)
        if not 0 <= extra <= extra_bits(divisor, n_parts):
            raise ValueError(f"{extra} extra bits are too many for divisor {divisor} among {n_parts} parties")
        self.n_parts, self.divisor, self.extra, self.scale = n_parts, divisor, extra, scale
        # round(j * 2^(64+e) / d) for every j the top bits can name: |j| < K, or |j| <= d/2 + 1 if
        # that is smaller (e = 0 only); the floor parts sum to [0, K), so the error is centred by K // 2
        self.bound = n_parts if extra else min(n_parts, divisor // 2 + 1)
        self.table = np.array(
            [
                _wrap(((j << (64 + extra)) + divisor // 2) // divisor - n_parts // 2)
                for j in range(-self.bound, self.bound + 1)
            ],
            dtype=np.int64,
        )
        # j = round(sum * d / 2^(64+e)), read from the sum's top 32 bits; adding this offset
        # before the final shift rounds, and moves the table's centre to index 0
        self.shift = 32 + extra
        self.offset = (1 << (self.shift - 1)) + (self.bound << self.shift)

    def empty(self, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=torch.int64 if self.scale is None else torch.float32)

    def decode(self, parts: list[torch.Tensor], out: torch.Tensor, start: int, end: int) -> None:
        """Elements ``start:end`` of ``out`` from the same elements of every (flat) part.

        Raises ValueError where the shares cannot come from a sum below 2^62."""
        arrays = tuple(p.numpy() for p in parts)
        correction = (self.divisor, self.shift, self.offset, self.table)
        if self.scale is None:
            bad = kernels.decode_quotients(arrays, start, end, *correction, out.numpy())
        else:
            bad = kernels.decode_scaled(arrays, start, end, *correction, self.scale, out.numpy())
        if bad >= 0:
            raise ValueError(
                f"shares do not reconstruct a sum below 2^62 (element {bad}): "
                "inconsistent shares, or a sum that overflowed the ring"
            )
