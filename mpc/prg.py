"""Cryptographically secure randomness for secret sharing.

Seeds come from the operating system (``os.urandom``); a seed is expanded into
as many ring elements as needed with the ChaCha20 stream cipher. Never
``torch.Generator`` (Mersenne Twister/Philox) or NumPy's default generator:
their outputs are predictable from a few observed values.
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # each seed is used for exactly one stream, so a fixed nonce is safe


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def expand(seed: bytes, n: int) -> torch.Tensor:
    """``n`` uniformly random int64 ring elements from a 32-byte seed (deterministic)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    out = bytearray(8 * n)
    Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update_into(bytes(8 * n), out)
    return torch.frombuffer(out, dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)


def random_ring(n: int) -> torch.Tensor:
    """``n`` uniformly random int64 ring elements from a fresh OS-seeded stream."""
    return expand(new_seed(), n)


def uniform(n: int) -> torch.Tensor:
    """``n`` float64 samples uniform in (0, 1] (53 random bits each, never 0) from a fresh stream."""
    return (((random_ring(n) >> 11) & ((1 << 53) - 1)).double() + 1) / 2.0**53


def gaussian(n: int, std: float) -> torch.Tensor:
    """``n`` float64 samples of N(0, std^2) from a fresh OS-seeded ChaCha20 stream (Box-Muller).

    DP noise must come from a CSPRNG too: predictable noise can be subtracted.
    """
    u1, u2 = uniform(2 * n).view(2, n)
    return std * torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)


def discrete_gaussian(n: int, sigma: float) -> torch.Tensor:
    """``n`` int64 samples of the discrete Gaussian N_Z(0, sigma^2), P(k) ~ exp(-k^2 / (2 sigma^2)).

    Canonne, Kamath and Steinke (2020), Algorithm 3: a discrete Laplace proposal of scale
    t = floor(sigma) + 1 (the difference of two geometric variables), accepted with
    probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)); the Bernoulli trials use CSPRNG
    uniforms in float64 rather than exact rational arithmetic.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    t = math.floor(sigma) + 1
    out = torch.empty(0, dtype=torch.int64)
    while out.numel() < n:
        m = 2 * (n - out.numel()) + 16  # more than one round's need: acceptance is above 1/2
        g1, g2 = torch.floor(-t * torch.log(uniform(2 * m))).view(2, m)  # geometric, P(k) ~ exp(-k/t)
        y = g1 - g2
        accept = uniform(m) <= torch.exp(-((y.abs() - sigma**2 / t) ** 2) / (2 * sigma**2))
        out = torch.cat([out, y[accept].long()])
    return out[:n]
