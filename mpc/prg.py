"""Cryptographically secure randomness for secret sharing.

Seeds come from the operating system (``os.urandom``); a seed is expanded into
as many ring elements as needed with the ChaCha20 stream cipher. Never
``torch.Generator`` (Mersenne Twister/Philox) or NumPy's default generator:
their outputs are predictable from a few observed values.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # each seed is used for exactly one stream, so a fixed nonce is safe
# The plaintext a keystream is read through. cryptography >= 51 refuses to encrypt a buffer in
# place, and a zero buffer as large as each request would double the memory of a large one.
_ZEROS = memoryview(bytes(1 << 20))


def keystream(cipher: CipherContext, n: int) -> bytearray:
    """The next ``n`` bytes of a stream cipher's keystream (its encryption of zeros)."""
    out = bytearray(n)
    view = memoryview(out)
    for start in range(0, n, len(_ZEROS)):
        chunk = view[start : start + len(_ZEROS)]
        cipher.update_into(_ZEROS[: len(chunk)], chunk)
    return out


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def expand(seed: bytes, n: int) -> torch.Tensor:
    """``n`` uniformly random int64 ring elements from a 32-byte seed (deterministic)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    out = keystream(Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor(), 8 * n)
    return torch.frombuffer(out, dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)


def random_ring(n: int) -> torch.Tensor:
    """``n`` uniformly random int64 ring elements from a fresh OS-seeded stream."""
    return expand(new_seed(), n)


def random_words(n: int) -> np.ndarray:
    """``n`` uniformly random uint64 words (NumPy) from a fresh OS-seeded stream."""
    words: np.ndarray = random_ring(n).numpy().view(np.uint64)
    return words


def additive_shares(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 arrays, each uniformly random, that sum to ``values`` mod 2^64."""
    first = random_words(values.size).reshape(values.shape)
    return first, values - first


def uniform(n: int) -> torch.Tensor:
    """``n`` float64 samples uniform in (0, 1] (never 0) from a fresh stream, 53 random bits each:
    the smallest is 2^-53."""
    return (random_ring(n) >> 11).double().add_(2.0**52 + 1).mul_(2.0**-53)


def gaussian(n: int, std: float) -> torch.Tensor:
    """``n`` float64 samples of N(0, std^2) from a fresh OS-seeded ChaCha20 stream (Box-Muller, both
    outputs of each pair).

    The radius sqrt(-2 ln u) ends where the uniforms do: at sqrt(106 ln 2) = 8.57 sigma for 53-bit
    uniforms. Always float64 (cast the result): 24-bit float32 uniforms would cut the tails at
    5.77 sigma, and a cut at t sigma adds about sqrt(d) phi(t) / z to the delta of each step of a
    d-dimensional Gaussian mechanism with noise multiplier z (the neighbour's output, shifted by
    1/z in all, can land beyond the cut): 8e-5 at t = 5.77, d = 11.2M, z = 1; 1.5e-13 at t = 8.57.

    DP noise must come from a CSPRNG too: predictable noise can be subtracted.
    """
    half = (n + 1) // 2
    u1, u2 = uniform(2 * half).view(2, half)
    radius = u1.log_().mul_(-2).sqrt_().mul_(std)
    angle = u2.mul_(2 * torch.pi)
    out = torch.empty(2 * half, dtype=torch.float64)
    torch.mul(radius, torch.cos(angle), out=out[:half])
    torch.mul(radius, angle.sin_(), out=out[half:])
    return out[:n]


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
