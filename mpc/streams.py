"""Keyed ChaCha20 streams: the randomness source behind every CrypTen share and triple.

CrypTen draws its correlated randomness from ``torch.Generator`` (MT19937 on CPU,
Philox on CUDA) seeded with 64-bit values: 624 consecutive 32-bit outputs of an
MT19937 give its whole state, so a party that sees a few thousand of its peer's
draws (as the first AND of a two-party comparison shows it) predicts every later
one. A :class:`ChaChaStream` replaces each of those generators (mpc.crypten_compat
installs them): a 256-bit key from ``os.urandom`` (or agreed with the peer that
shares the stream), the ChaCha20 keystream read in order. Predicting its next word
from any number of earlier ones is as hard as breaking ChaCha20.

Invariant: one (key, device) pair is one stream; each stream's keystream is read
once, front to back. The device's name goes into the nonce, so the CPU and CUDA
streams of one key never repeat each other. Words are drawn on the CPU and moved
to the device (CUDA has no ChaCha20 here; the online phase draws little).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from medmpc.mpc import prg

KEY_BYTES = 32
# ChaCha20's 32-bit block counter: 2^32 blocks of 64 bytes, then the keystream would repeat
_MAX_BYTES = 2**32 * 64


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_to_tensor(key: bytes) -> torch.Tensor:
    """A key as four int64 words, to send over a tensor channel."""
    return torch.frombuffer(bytearray(key), dtype=torch.int64).clone()


def key_from_tensor(words: torch.Tensor) -> bytes:
    if words.dtype != torch.int64 or words.numel() * 8 != KEY_BYTES:
        raise ValueError(f"a stream key is {KEY_BYTES // 8} int64 words, got {words.numel()} of {words.dtype}")
    return words.cpu().contiguous().numpy().tobytes()


class ChaChaStream:
    """Uniform ring elements and bits from the ChaCha20 keystream of ``key`` on ``device``."""

    def __init__(self, key: bytes, device: torch.device | str = "cpu") -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key must be {KEY_BYTES} bytes ({8 * KEY_BYTES} bits), got {len(key)}")
        self.device = torch.device(device)
        nonce = bytes(4) + hashlib.sha256(str(self.device).encode()).digest()[:12]  # counter 0, then the device
        self._cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._used = 0

    def _bytes(self, n: int) -> torch.Tensor:
        self._used += n
        if self._used > _MAX_BYTES:
            raise RuntimeError("ChaCha20 stream exhausted (256 GiB): its keystream would repeat")
        out = prg.keystream(self._cipher, n)
        return torch.frombuffer(out, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)

    def ring(self, size: Sequence[int]) -> torch.Tensor:
        """Uniform int64 (the ring Z/2^64) of ``size``, on this stream's device."""
        n = math.prod(size)
        return self._bytes(8 * n).view(torch.int64).reshape(tuple(size)).to(self.device)

    def bits(self, size: Sequence[int], bitlength: int) -> torch.Tensor:
        """Uniform integers in [0, 2^bitlength) as int64 of ``size``, on this stream's device."""
        if not 1 <= bitlength <= 64:
            raise ValueError(f"bitlength must be in 1..64, got {bitlength}")
        if bitlength == 64:
            return self.ring(size)
        n = math.prod(size)
        words = self._bytes(n).long() if bitlength <= 8 else self._bytes(8 * n).view(torch.int64)
        return (words & ((1 << bitlength) - 1)).reshape(tuple(size)).to(self.device)


# What mpc.crypten_compat builds each generator with. Tests swap in a deliberately weak
# stream in their party processes to show that their attacks detect one.
keyed: Callable[[bytes, torch.device | str], ChaChaStream] = ChaChaStream
