"""Opening masked values on a sub-ring: each party's ``x_b + r_b mod 2^bits``, packed.

A value of ``bits`` bits travels in the smallest unsigned type that holds it, packed into
whole int64 words (CrypTen's communicator counts words, so the packing shows in its byte
counts too); the receiver adds every party's part mod 2^bits. The opened value is the
masked one, ``x + r``: uniform wherever ``r`` is, which is the gates' business.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np


class MaskKey(Protocol):
    """A gate key's side of an opening: its share of the mask, used for one input only."""

    mask: np.ndarray
    opened: bool

    @property
    def size(self) -> int: ...

    @property
    def party(self) -> int: ...


def mask_once(key: MaskKey, share: np.ndarray, bits: int, gate: str) -> np.ndarray:
    """This party's part of an opening: ``x_b + r_b mod 2^bits`` (uint64); ValueError for a share of
    another size or a key that opened before (a second opening under one mask would show the
    difference of two inputs)."""
    if share.shape != (key.size,):
        raise ValueError(f"{gate} key holds {key.size} values, got a share of shape {share.shape}")
    if key.opened:
        raise ValueError(f"{gate} key of party {key.party} opened twice: its mask hides one input only")
    key.opened = True
    masked: np.ndarray = (share + key.mask) & low_bits(bits)
    return masked


def low_bits(bits: int) -> np.uint64:
    """The mask of the ``bits`` low bits."""
    return np.uint64((1 << bits) - 1)


def wire_dtype(bits: int) -> np.dtype:
    """The smallest unsigned type that holds ``bits``-bit values."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= 8 * np.dtype(dtype).itemsize:
            return np.dtype(dtype)
    raise ValueError(f"no wire type for {bits} bits")


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (below 2^bits) in the smallest type, padded and viewed as int64 words; ValueError
    for a value of more bits (its high bits, a carry of the masked sum, would go out too)."""
    if bits < 64 and values.size and int(values.max()) >> bits:
        raise ValueError(f"an opening of {bits} bits holds a value of more bits")
    narrow = values.astype(wire_dtype(bits))
    per_word = 8 // narrow.itemsize
    padded = np.zeros(math.ceil(values.size / per_word) * per_word, narrow.dtype)
    padded[: values.size] = narrow
    return padded.view(np.int64)


def unpack(words: np.ndarray, bits: int, size: int) -> np.ndarray:
    return words.view(wire_dtype(bits))[:size].astype(np.uint64)


def combine(parts: list[np.ndarray], bits: int, size: int) -> np.ndarray:
    """The opened value mod 2^bits from every party's packed part."""
    total = np.zeros(size, np.uint64)
    for words in parts:
        total += unpack(words, bits, size)
    opened: np.ndarray = total & low_bits(bits)
    return opened
