"""Opening masked values on a sub-ring: each party's ``x_b + r_b mod 2^bits``, packed.

A value of ``bits`` bits travels in exactly ``bits`` bits: ``n`` values fill
``ceil(n bits / 64)`` int64 words, value ``i`` at bit ``i bits`` (CrypTen's communicator
counts words, so the packing shows in its byte counts too); the receiver adds every party's
part mod 2^bits. The opened value is the
masked one, ``x + r``: uniform wherever ``r`` is, which is the gates' business.
"""

from __future__ import annotations

import math
from typing import Protocol

import numba
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


def words_for(size: int, bits: int) -> int:
    """int64 words that ``size`` values of ``bits`` bits take on the wire."""
    return math.ceil(size * bits / 64)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (below 2^bits) at ``bits`` bits each, as int64 words; ValueError for a value of
    more bits (its high bits, a carry of the masked sum, would go out too)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"an opening of {bits} bits: 1 to 64")
    if values.dtype != np.uint64 or values.ndim != 1:
        raise ValueError(f"an opening packs a 1-D array of uint64, got {values.ndim}-D {values.dtype}")
    if bits < 64 and values.size and int(values.max()) >> bits:
        raise ValueError(f"an opening of {bits} bits holds a value of more bits")
    words = np.zeros(words_for(values.size, bits), np.uint64)
    _pack(np.ascontiguousarray(values), bits, words)
    return words.view(np.int64)


def unpack(words: np.ndarray, bits: int, size: int) -> np.ndarray:
    """The ``size`` values of ``bits`` bits that :func:`pack` put in ``words``."""
    if words.size != words_for(size, bits):
        raise ValueError(f"{words.size} words for {size} values of {bits} bits, expected {words_for(size, bits)}")
    out = np.empty(size, np.uint64)
    _unpack(np.ascontiguousarray(words).view(np.uint64), bits, low_bits(bits), out)
    return out


@numba.njit(cache=True, nogil=True)
def _pack(values: np.ndarray, bits: int, words: np.ndarray) -> None:
    width = np.uint64(bits)
    for i in range(values.shape[0]):
        at = np.uint64(i) * width
        word, shift = at >> np.uint64(6), at & np.uint64(63)
        words[word] |= values[i] << shift
        if shift + width > np.uint64(64):  # the value's high bits start the next word
            words[word + np.uint64(1)] |= values[i] >> (np.uint64(64) - shift)


@numba.njit(cache=True, nogil=True)
def _unpack(words: np.ndarray, bits: int, mask: np.uint64, out: np.ndarray) -> None:
    width = np.uint64(bits)
    for i in range(out.shape[0]):
        at = np.uint64(i) * width
        word, shift = at >> np.uint64(6), at & np.uint64(63)
        value = words[word] >> shift
        if shift + width > np.uint64(64):
            value |= words[word + np.uint64(1)] << (np.uint64(64) - shift)
        out[i] = value & mask


def combine(parts: list[np.ndarray], bits: int, size: int) -> np.ndarray:
    """The opened value mod 2^bits from every party's packed part."""
    total = np.zeros(size, np.uint64)
    for words in parts:
        total += unpack(words, bits, size)
    opened: np.ndarray = total & low_bits(bits)
    return opened
