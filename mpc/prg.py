"""Cryptographically secure randomness for secret sharing.

Seeds come from the operating system (``os.urandom``); a seed is expanded into
as many ring elements as needed with the ChaCha20 stream cipher. Never
``torch.Generator`` (Mersenne Twister/Philox) or NumPy's default generator:
their outputs are predictable from a few observed values.
"""

from __future__ import annotations

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


def gaussian(n: int, std: float) -> torch.Tensor:
    """``n`` float64 samples of N(0, std^2) from a fresh OS-seeded ChaCha20 stream (Box-Muller).

    DP noise must come from a CSPRNG too: predictable noise can be subtracted.
    """
    bits = random_ring(2 * n).view(2, n)
    # 53 random bits each -> uniform in (0, 1], never 0 (log(0) is undefined)
    u1, u2 = ((((b >> 11) & ((1 << 53) - 1)).double() + 1) / 2.0**53 for b in bits)
    return std * torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)
