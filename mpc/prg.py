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
