"""Fixed-point encoding in the 64-bit ring and additive secret sharing.

A float vector ``x`` is encoded as ``round(x * 2**f)`` in Z_{2^64} (int64 with
wrap-around) and split into K shares that sum to it. Shares 1..K-1 are the
ChaCha20 expansion of fresh OS seeds, so they travel as 32-byte seeds; share 0
is ``x - sum(others)``. Every share on its own, and any K-1 of them together,
is uniformly random and independent of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from medmpc.mpc import kernels, prg

DEFAULT_FRACTIONAL_BITS = 16
OVERFLOW_BITS = 62  # sums must stay below 2^62 in magnitude to decode unambiguously
_CHUNK = 1 << 16


class EncodingError(ValueError):
    """A value cannot be encoded safely (NaN/Inf, or a sum that could overflow).

    ``category``: what is wrong, without any number derived from the values (the message has
    them, for the data holder's own log; what other parties are told is the category)."""

    def __init__(self, message: str, *, category: str) -> None:
        super().__init__(message)
        self.category = category


NOT_FINITE = "NaN/Inf values"
OUT_OF_RANGE = "values that could overflow the fixed-point sum"


def check_encodable(x: torch.Tensor, *, n_summands: int, fractional_bits: int, name: str) -> None:
    """Refuse values whose sum over ``n_summands`` contributors could overflow the ring."""
    peak = 0.0
    if x.numel():
        # one pass, unlike abs().max(): aminmax propagates NaN, and Inf is its own extreme
        lo, hi = torch.aminmax(x)
        peak = max(-float(lo), float(hi))
    if not math.isfinite(peak):
        bad = int((~torch.isfinite(x)).sum())
        raise EncodingError(f"{name}: update has {bad} NaN/Inf value(s)", category=NOT_FINITE)
    limit = 2.0**OVERFLOW_BITS / (n_summands * 2.0**fractional_bits)
    if peak >= limit:
        raise EncodingError(
            f"{name}: max |value| {peak:.3g} could overflow the fixed-point sum "
            f"({n_summands} x {peak:.3g} x 2^{fractional_bits} >= 2^{OVERFLOW_BITS}); "
            "clip the update or lower the fractional bits",
            category=OUT_OF_RANGE,
        )


def encode(x: torch.Tensor, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> torch.Tensor:
    """``round(x * 2^f)`` as int64 (half to even; scaling by a power of two is exact)."""
    out = torch.empty(x.numel(), dtype=torch.int64)
    for _ in encode_pieces(x, fractional_bits, out=out, subtract=False):
        pass
    return out.reshape(x.shape)


def encode_pieces(
    x: torch.Tensor, fractional_bits: int, *, out: torch.Tensor, subtract: bool
) -> Iterator[torch.Tensor]:
    """:func:`encode` into ``out`` (flat int64), yielding each finished piece of ``out`` as soon
    as it is encoded, so that it can be sent while the next one is computed.

    With ``subtract``: ``round(x * 2^f) - out``, written over ``out``. That is how a mask is
    applied: its memory is already paged in, and encoding and masking are one pass."""
    flat = x.detach().cpu().reshape(-1)
    if out.dtype != torch.int64 or out.numel() != flat.numel():
        raise ValueError(f"mask has {out.numel()} {out.dtype} values, expected {flat.numel()} int64")
    # checked here, not in the generator, which would only run at the first piece
    return _encode_pieces(flat, fractional_bits, out.view(-1), subtract)


def _encode_pieces(
    flat: torch.Tensor, fractional_bits: int, out: torch.Tensor, subtract: bool
) -> Iterator[torch.Tensor]:
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float64)  # other dtypes (bfloat16 among them) have no exact NumPy view
    values, dest = flat.numpy(), out.numpy()
    for start in range(0, values.size, _CHUNK):
        end = min(start + _CHUNK, values.size)
        kernels.encode_into(values[start:end], 2.0**fractional_bits, dest[start:end], subtract)
        yield out[start:end]


def decode(x: torch.Tensor, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> torch.Tensor:
    return x.to(torch.float32).mul_(2.0**-fractional_bits)


@dataclass
class Shares:
    """K additive shares of one vector: share 0 in full, shares 1..K-1 as seeds."""

    masked: torch.Tensor
    seeds: list[bytes]


@dataclass
class Mask:
    """Shares 1..K-1 of a vector not yet known: their seeds and their sum.

    Independent of the data, so it can be made (and the seeds sent) ahead of time;
    share 0 is then one subtraction away once the vector exists.
    """

    seeds: list[bytes]
    total: torch.Tensor


def new_mask(n_parties: int, numel: int) -> Mask:
    if n_parties < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, got {n_parties}")
    seeds = [prg.new_seed() for _ in range(n_parties - 1)]
    total = prg.expand(seeds[0], numel)
    for seed in seeds[1:]:
        total.add_(prg.expand(seed, numel))
    return Mask(seeds, total)


def apply_mask(encoded: torch.Tensor, mask: Mask) -> Shares:
    if encoded.dtype != torch.int64:
        raise TypeError(f"shares live in the int64 ring, got {encoded.dtype}")
    flat = encoded.reshape(-1)
    if flat.numel() != mask.total.numel():
        raise ValueError(f"mask was made for {mask.total.numel()} values, got {flat.numel()}")
    return Shares(flat.sub(mask.total), mask.seeds)


def split(encoded: torch.Tensor, n_parties: int) -> Shares:
    return apply_mask(encoded, new_mask(n_parties, encoded.numel()))


def share_of(shares: Shares, party: int) -> torch.Tensor:
    """The ring vector party ``party`` holds."""
    if party == 0:
        return shares.masked
    return prg.expand(shares.seeds[party - 1], shares.masked.numel())


def reconstruct(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total.add_(p)
    return total
